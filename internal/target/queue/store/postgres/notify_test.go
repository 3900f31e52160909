package postgres

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// notifications counts the notifications on a handle's channel, as
// another listener would see them.
type notifications struct {
	t       *testing.T
	h       *harness
	channel string
	conn    *pgx.Conn
}

func listenTo(t *testing.T, h *harness, s *Store) *notifications {
	n := &notifications{t: t, h: h, channel: s.channel, conn: h.db(t)}
	if _, err := n.conn.Exec(ctx, "LISTEN "+pgx.Identifier{s.channel}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	return n
}

// count returns how many notifications arrived since the last count. It
// sends a marker and reads up to it: notifications are delivered in
// commit order, so everything committed before is in.
func (n *notifications) count() int {
	n.t.Helper()
	n.h.exec(n.t, "SELECT pg_notify($1, 'marker')", n.channel)
	got := 0
	for {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		msg, err := n.conn.WaitForNotification(ctx)
		cancel()
		if err != nil {
			n.t.Fatal(err)
		}
		if msg.Payload == "marker" {
			return got
		}
		got++
	}
}

func TestNotifications(t *testing.T) {
	h := newHarness(t)
	a := h.openNode(t, "a")
	n := listenTo(t, h, a)

	// Creates notify nothing; concurrent Commits notify once per batch.
	const msgs = 32
	var leases []*store.Lease
	for i := 0; i < msgs; i++ {
		m := newMsg(h, "r@x.test")
		l, err := a.Create(ctx, m, []byte(hdr), strings.NewReader(""), 0)
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l)
	}
	if got := n.count(); got != 0 {
		t.Fatalf("%d notifications for creates", got)
	}
	before := a.batches.Load()
	var wg sync.WaitGroup
	for _, l := range leases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := a.Commit(ctx, l); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	batches := a.batches.Load() - before
	got := n.count()
	t.Logf("%d commits in %d batches: %d notifications", msgs, batches, got)
	if got < 1 || int64(got) > batches {
		t.Fatalf("%d notifications for %d commits in %d batches", got, msgs, batches)
	}

	// Saves due later, or held, notify nothing; a release due now does.
	cs, err := a.Claim(ctx, 3, nil)
	if err != nil || len(cs) != 3 {
		t.Fatal(cs, err)
	}
	cs[0].Message.NextAttempt = h.clock.Now().Add(time.Hour)
	cs[1].Message.Held = true
	for _, c := range cs[:2] {
		if _, err := a.Save(ctx, c.Lease, c.Message); err != nil {
			t.Fatal(err)
		}
	}
	if got := n.count(); got != 0 {
		t.Fatalf("%d notifications for saves not due now", got)
	}
	if _, err := a.Release(ctx, cs[2].Lease); err != nil {
		t.Fatal(err)
	}
	if got := n.count(); got != 1 {
		t.Fatalf("%d notifications for a release due now, want 1", got)
	}
}

// A request recorded under a lease that then expires is not lost: the
// next holder's Save returns it.
func TestRequestSurvivesTakeover(t *testing.T) {
	h := newHarness(t)
	a, b := h.openNode(t, "a"), h.openNode(t, "b")
	id := queueMsg(t, a, newMsg(h, "r@x.test"))
	if _, err := a.ClaimID(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := b.Request(ctx, id, store.RequestHold); err != nil {
		t.Fatal(err)
	}
	h.clock.Advance(testLease)
	if err := b.Request(ctx, id, store.RequestDelete); err != store.ErrNotLeased {
		t.Fatalf("Request on an expired lease = %v, want ErrNotLeased", err)
	}
	cs, err := b.Claim(ctx, 1, nil)
	if err != nil || len(cs) != 1 {
		t.Fatal(cs, err)
	}
	if r, err := b.Save(ctx, cs[0].Lease, cs[0].Message); err != nil || r != store.RequestHold {
		t.Fatalf("Save = %v, %v; want the hold recorded under the old lease", r, err)
	}
}

// TestOneReporter: exactly one of several handles reports the cluster's
// figures, and when it closes another takes over.
func TestOneReporter(t *testing.T) {
	dsn := pgtest.Database(t)
	var handles []*Store
	for _, node := range []string{"a", "b", "c"} {
		s, err := Open(context.Background(), Options{DSN: dsn, Node: node, PollInterval: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		handles = append(handles, s)
	}
	reporters := func(hs []*Store) (n int, who *Store) {
		for _, s := range hs {
			if s.ReportsCluster(context.Background()) {
				n, who = n+1, s
			}
		}
		return n, who
	}
	waitOne := func(hs []*Store) *Store {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			n, who := reporters(hs)
			if n > 1 {
				t.Fatalf("%d handles report the cluster", n)
			}
			if n == 1 {
				return who
			}
			if time.Now().After(deadline) {
				t.Fatal("no handle reports the cluster")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	first := waitOne(handles)
	first.Close()
	var rest []*Store
	for _, s := range handles {
		if s != first {
			rest = append(rest, s)
		}
	}
	if next := waitOne(rest); next == first {
		t.Fatal("a closed handle still reports")
	}
}
