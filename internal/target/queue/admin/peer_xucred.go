//go:build darwin || freebsd

package admin

import (
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// peerOf reads the connecting process's credentials from the kernel
// (LOCAL_PEERCRED, what getpeereid(3) uses here): they cannot be forged
// by the client.
func peerOf(c *net.UnixConn) (Peer, error) {
	var p Peer
	err := withFD(c, func(fd int) error {
		xu, err := unix.GetsockoptXucred(fd, unix.SOL_LOCAL, unix.LOCAL_PEERCRED)
		if err != nil {
			return fmt.Errorf("LOCAL_PEERCRED: %w", err)
		}
		// XUCRED_VERSION is 0; another layout is not what we read.
		if xu.Version != 0 {
			return fmt.Errorf("LOCAL_PEERCRED: unknown xucred version %d", xu.Version)
		}
		p = Peer{UID: int(xu.Uid), PID: peerPID(fd), Known: true}
		return nil
	})
	return p, err
}
