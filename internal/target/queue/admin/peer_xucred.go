//go:build darwin || freebsd

package admin

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// peerCred reads the peer's credentials with LOCAL_PEERCRED, as
// getpeereid(3) does here.
func peerCred(fd int) (Peer, error) {
	xu, err := unix.GetsockoptXucred(fd, unix.SOL_LOCAL, unix.LOCAL_PEERCRED)
	if err != nil {
		return Peer{}, fmt.Errorf("LOCAL_PEERCRED: %w", err)
	}
	// XUCRED_VERSION is 0; another layout is not what we read.
	if xu.Version != 0 {
		return Peer{}, fmt.Errorf("LOCAL_PEERCRED: unknown xucred version %d", xu.Version)
	}
	return Peer{UID: int(xu.Uid), PID: peerPID(fd), Known: true}, nil
}
