package admin

import (
	"net"
	"syscall"
)

// peerOf reads the connecting process's credentials from the kernel
// (SO_PEERCRED): they cannot be forged by the client.
func peerOf(c *net.UnixConn) (Peer, error) {
	var p Peer
	err := withFD(c, func(fd int) error {
		cred, err := syscall.GetsockoptUcred(fd, syscall.SOL_SOCKET, syscall.SO_PEERCRED)
		if err != nil {
			return err
		}
		p = Peer{UID: int(cred.Uid), PID: int(cred.Pid), Known: true}
		return nil
	})
	return p, err
}
