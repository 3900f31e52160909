package admin

// NetBSD: getsockopt(0, LOCAL_PEEREID) fills
// struct unpcbid { pid_t unp_pid; uid_t unp_euid; gid_t unp_egid; }.
// golang.org/x/sys/unix does not define LOCAL_PEEREID; <sys/un.h> has it
// as 0x0003.
const (
	credLevel   = 0
	credOpt     = 0x0003
	credOptName = "LOCAL_PEEREID"
)

func credOf(w [8]uint32) (uid, pid uint32, err error) { return w[1], w[0], nil }
