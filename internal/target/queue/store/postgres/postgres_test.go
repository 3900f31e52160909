package postgres

import (
	"context"
	"os"
	"strings"
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
			// Content up to InlineLimit is received in memory (Create).
			InMemoryUntilCommit: DefaultInlineLimit,
		}
	})
}

// TestReader: a Reader sees what the nodes stored, leases included, and
// neither registers a node nor writes.
func TestReader(t *testing.T) {
	dsn := pgtest.Database(t)
	ctx := context.Background()
	// Content above InlineLimit: stored at Create, so visible while being
	// received.
	s, err := Open(ctx, Options{DSN: dsn, Node: "a", InlineLimit: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	m := &store.Message{From: "s@x.test", Arrival: time.Now(), NextAttempt: time.Now(), Rcpts: []store.Rcpt{{Addr: "r@x.test"}}}
	l, err := s.Create(ctx, m, []byte("Subject: x\r\n\r\n"), strings.NewReader("body"), 4)
	if err != nil {
		t.Fatal(err)
	}
	r, err := OpenReader(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got, err := r.Get(m.ID)
	if err != nil || got.Lease == nil || !got.Lease.Receiving || got.Lease.Owner != "a" {
		t.Fatalf("Get = %+v, %v", got, err)
	}
	c, err := r.Content(got)
	if err != nil || string(c.Header) != "Subject: x\r\n\r\n" {
		t.Fatalf("Content = %q, %v", c.Header, err)
	}
	n := 0
	if err := r.Walk(func(*store.Message) error { n++; return nil }); err != nil || n != 1 {
		t.Fatalf("Walk saw %d, %v", n, err)
	}
	var nodes int
	if err := s.pool.QueryRow(ctx, "SELECT count(*) FROM spool_nodes").Scan(&nodes); err != nil || nodes != 1 {
		t.Fatalf("%d nodes registered, %v", nodes, err)
	}
	if _, err := s.Commit(ctx, l); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenReader(ctx, pgtest.Database(t)); err == nil {
		t.Fatal("a Reader opened a database without a spool schema")
	}
}
