package admin

import (
	"errors"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/foxcpp/maddy/framework/log"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// captureLog collects what the package logs until the test ends.
func captureLog(t *testing.T) func() []string {
	t.Helper()
	var mu sync.Mutex
	var lines []string
	old := logger.Out
	logger.Out = log.FuncOutput(func(_ time.Time, _ bool, s string) {
		mu.Lock()
		lines = append(lines, s)
		mu.Unlock()
	}, func() error { return nil })
	t.Cleanup(func() { logger.Out = old })
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), lines...)
	}
}

// TestPeerCheck: only a process whose user the kernel reports, and that
// is the server's user or root, is served. Anyone else gets an error line
// saying why, the refusal is logged, and the request is not carried out.
func TestPeerCheck(t *testing.T) {
	q := newFakeQueue(t, msg("a@one.test", t0, "x@dest.test"))
	logged := captureLog(t)
	self := os.Geteuid()
	other := self + 1
	if other == 0 {
		other = 1
	}
	for _, tc := range []struct {
		name   string
		lookup func(*net.UnixConn) (Peer, error)
		want   string // in the error; "" when served
	}{
		{"no peer-credential call", func(*net.UnixConn) (Peer, error) {
			return Peer{}, errors.New("this system has none")
		}, "refused: cannot identify the connecting process: this system has none"},
		{"unknown without an error", func(*net.UnixConn) (Peer, error) {
			return Peer{UID: self}, nil
		}, "refused: cannot identify the connecting process"},
		{"another user", func(*net.UnixConn) (Peer, error) {
			return Peer{UID: other, PID: 42, Known: true}, nil
		}, "permission denied"},
		{"the server's user", func(*net.UnixConn) (Peer, error) {
			return Peer{UID: self, PID: 42, Known: true}, nil
		}, ""},
		{"root", func(*net.UnixConn) (Peer, error) {
			return Peer{UID: 0, PID: 42, Known: true}, nil
		}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old := peerLookup
			peerLookup = tc.lookup
			t.Cleanup(func() { peerLookup = old })
			// A server per case, started after the seam is set and
			// closed (its goroutines waited for) before the next one.
			path := serve(t, map[string]Queue{"q": q})
			before := len(logged())
			q.mu.Lock()
			applied := len(q.applied)
			q.mu.Unlock()

			resps, err := do(t, path, Request{Op: string(OpHold), Filter: Filter{IDs: []store.ID{1}}})
			q.mu.Lock()
			ran := len(q.applied) > applied
			q.mu.Unlock()
			if tc.want == "" {
				if err != nil || len(resps) != 1 || !ran {
					t.Fatalf("not served: %+v, %v (applied: %v)", resps, err, ran)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
			if ran {
				t.Fatal("the request was carried out")
			}
			var refusals []string
			for _, l := range logged()[before:] {
				if strings.Contains(l, "control socket: refused a connection") && strings.Contains(l, path) {
					refusals = append(refusals, l)
				}
			}
			if len(refusals) != 1 {
				t.Fatalf("log lines %q, want one refusal naming the socket", logged()[before:])
			}
		})
	}
}
