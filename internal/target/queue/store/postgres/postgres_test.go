package postgres

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/storetest"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

const (
	testLease        = time.Minute
	testReceiveLease = 5 * time.Minute
)

var ctx = context.Background()

// harness opens handles on one fresh database and crashes them.
type harness struct {
	dsn   string
	clock *storetest.Clock
	mu    sync.Mutex
	open  []*Store
}

func newHarness(t *testing.T) *harness {
	h := &harness{dsn: pgtest.Database(t), clock: storetest.NewClock()}
	t.Cleanup(func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, s := range h.open {
			s.Close()
		}
	})
	return h
}

// options are the handles' options: the suite's lease times and clock.
func (h *harness) options(t testing.TB, node string) Options {
	return Options{
		DSN:          h.dsn,
		Node:         node,
		Lease:        testLease,
		ReceiveLease: testReceiveLease,
		Now:          h.clock.Now,
		Logf:         t.Logf,
	}
}

func (h *harness) openWith(t testing.TB, opts Options) *Store {
	t.Helper()
	s, err := Open(ctx, opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", opts.Node, err)
	}
	h.mu.Lock()
	h.open = append(h.open, s)
	h.mu.Unlock()
	return s
}

func (h *harness) openNode(t testing.TB, node string) *Store {
	t.Helper()
	return h.openWith(t, h.options(t, node))
}

// crash ends every open handle without deregistering it.
func (h *harness) crash() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, s := range h.open {
		s.crash()
	}
	h.open = nil
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) *storetest.Harness {
		h := newHarness(t)
		return &storetest.Harness{
			Open:         func(t *testing.T, node string) store.Backend { return h.openNode(t, node) },
			Crash:        func(t *testing.T) { h.crash() },
			Clock:        h.clock,
			Lease:        testLease,
			ReceiveLease: testReceiveLease,
		}
	})
}
