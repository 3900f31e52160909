package admin

import (
	"os"
	"sync"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// TestLinuxServesItsOwnUser: with the kernel's real answer (SO_PEERCRED),
// a process of the server's own user is served, and the change is logged
// with its uid and pid.
func TestLinuxServesItsOwnUser(t *testing.T) {
	q := newFakeQueue(t, msg("a@one.test", t0, "x@dest.test"))
	path := serve(t, nil)
	var mu sync.Mutex
	var peers []Peer
	unreg, err := Register(path, "q", q, func(_ string, _ Op, p Peer, _ Filter, _ Result) {
		mu.Lock()
		peers = append(peers, p)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(unreg)
	resps, err := do(t, path, Request{Op: string(OpRetry), Filter: Filter{IDs: []store.ID{1}}})
	if err != nil || len(resps) != 1 || resps[0].Result.Changed != 1 {
		t.Fatalf("retry from the server's own user: %+v, %v", resps, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(peers) != 1 || !peers[0].Known || peers[0].UID != os.Geteuid() || peers[0].PID != os.Getpid() {
		t.Fatalf("logged peers %+v, want uid %d pid %d", peers, os.Geteuid(), os.Getpid())
	}
}
