//go:build !linux && !darwin && !freebsd && !dragonfly && !netbsd && !openbsd

package admin

import (
	"fmt"
	"runtime"
)

// peerCred cannot ask the kernel on this system, so every connection is
// refused (see server.serve).
func peerCred(int) (Peer, error) {
	return Peer{}, fmt.Errorf("Spool has no peer-credential call for %s", runtime.GOOS)
}
