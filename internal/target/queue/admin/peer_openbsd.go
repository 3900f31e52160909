package admin

import "golang.org/x/sys/unix"

// OpenBSD: getsockopt(SOL_SOCKET, SO_PEERCRED) fills
// struct sockpeercred { uid_t uid; gid_t gid; pid_t pid; }.
const (
	credLevel   = unix.SOL_SOCKET
	credOpt     = unix.SO_PEERCRED
	credOptName = "SO_PEERCRED"
)

func credOf(w [8]uint32) (uid, pid uint32, err error) { return w[0], w[2], nil }
