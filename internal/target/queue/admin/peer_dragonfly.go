package admin

import "fmt"

// DragonFly: getsockopt(0, LOCAL_PEERCRED) fills
// struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; ... },
// which has no process ID. golang.org/x/sys/unix does not define
// LOCAL_PEERCRED here; <sys/un.h> has it as 0x001.
const (
	credLevel   = 0
	credOpt     = 0x001
	credOptName = "LOCAL_PEERCRED"
)

// credOf refuses a layout other than XUCRED_VERSION 0.
func credOf(w [8]uint32) (uid, pid uint32, err error) {
	if w[0] != 0 {
		return 0, 0, fmt.Errorf("unknown xucred version %d", w[0])
	}
	return w[1], 0, nil
}
