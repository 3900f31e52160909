package admin

import (
	"net"

	"github.com/foxcpp/maddy/framework/log"
)

// peerLookup asks the kernel who is on the other end of a control
// connection; tests replace it.
var peerLookup = peerOf

// withFD runs fn on the descriptor of c.
func withFD(c *net.UnixConn, fn func(fd int) error) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var fnErr error
	if err := raw.Control(func(fd uintptr) { fnErr = fn(int(fd)) }); err != nil {
		return err
	}
	return fnErr
}

// logger receives what the control socket refuses.
var logger = log.Logger{Name: "target.spool"}
