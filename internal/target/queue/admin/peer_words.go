//go:build dragonfly || netbsd || openbsd

package admin

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// peerCred reads the peer's credentials with the getsockopt(2) call that
// getpeereid(3) makes on this system (credLevel, credOpt).
func peerCred(fd int) (Peer, error) {
	w, err := credWords(fd)
	if err == nil {
		var uid, pid uint32
		uid, pid, err = credOf(w)
		if err == nil {
			return Peer{UID: int(uid), PID: int(pid), Known: true}, nil
		}
	}
	return Peer{}, fmt.Errorf("%s: %w", credOptName, err)
}

// credWords reads the credential structure as native 32-bit words.
// golang.org/x/sys/unix (v0.48) has no typed getter for these structures
// on these systems, and OpenBSD allows system calls only through libc, so
// a raw getsockopt(2) is not an option there. GetsockoptICMPv6Filter is a
// plain getsockopt(2) (through libc where the system needs that) into a
// buffer of eight native uint32 words, 32 bytes; the kernel copies out as
// much of the structure as fits, and credOf reads the words by the layout
// the system's headers give. Every field read is a 32-bit uid_t, pid_t or
// u_int, so the words are those fields whatever the byte order.
func credWords(fd int) ([8]uint32, error) {
	f, err := unix.GetsockoptICMPv6Filter(fd, credLevel, credOpt)
	if err != nil {
		return [8]uint32{}, err
	}
	return f.Filt, nil
}
