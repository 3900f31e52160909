package admin

import (
	"net"

	"github.com/foxcpp/maddy/framework/log"
)

// peerLookup asks the kernel who is on the other end of a control
// connection; tests replace it.
var peerLookup = peerOf

// peerOf asks the kernel for the credentials of the process on the other
// end of c (peerCred, per system): they cannot be forged by the client.
func peerOf(c *net.UnixConn) (Peer, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return Peer{}, err
	}
	var p Peer
	var credErr error
	if err := raw.Control(func(fd uintptr) { p, credErr = peerCred(int(fd)) }); err != nil {
		return Peer{}, err
	}
	return p, credErr
}

// logger receives what the control socket refuses.
var logger = log.Logger{Name: "target.spool"}
