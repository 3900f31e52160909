package embedded

import (
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/storetest"
)

// TestConformance runs the store conformance suite; the nodes are handles
// on one store in this process.
func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) *storetest.Harness {
		dir := t.TempDir()
		h := &storetest.Harness{Clock: storetest.NewClock(), Lease: time.Minute, ReceiveLease: 20 * time.Minute}
		var primary *Store
		closePrimary := func() {
			if primary != nil {
				primary.Close()
				primary = nil
			}
		}
		t.Cleanup(closePrimary)
		h.Open = func(t *testing.T, node string) store.Backend {
			if primary != nil {
				return primary.Handle(node)
			}
			s, err := Open(dir, Options{
				DirOptions:   DirOptions{InlineLimit: 16 << 10},
				Node:         node,
				Lease:        h.Lease,
				ReceiveLease: h.ReceiveLease,
				Now:          h.Clock.Now,
			})
			if err != nil {
				t.Fatal(err)
			}
			s.WaitLoaded()
			primary = s
			return s
		}
		// Leases live in memory: closing the store drops them as a crash
		// does.
		h.Crash = func(t *testing.T) { closePrimary() }
		return h
	})
}
