package admin

import "golang.org/x/sys/unix"

// peerPID returns the connecting process's ID (LOCAL_PEERPID), or 0.
func peerPID(fd int) int {
	pid, err := unix.GetsockoptInt(fd, unix.SOL_LOCAL, unix.LOCAL_PEERPID)
	if err != nil {
		return 0
	}
	return pid
}
