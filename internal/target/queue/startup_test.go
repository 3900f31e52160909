package queue

import (
	"context"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// pausingStore holds the start-up load (Schedule) back until resumed, so
// a test can submit mail while the load is under way.
type pausingStore struct {
	store.Store
	loading, resume chan struct{}
}

func (s *pausingStore) Schedule(fn func(store.SchedEntry) error) error {
	close(s.loading)
	<-s.resume
	return s.Store.Schedule(fn)
}

// TestStartupLoadDoesNotOverlapNewMail: the start-up load covers the
// messages stored before the start, and only those. A message committed
// while it runs is counted once, and one stored by Body but not committed
// (its session may still abort) is neither scheduled nor counted.
func TestStartupLoadDoesNotOverlapNewMail(t *testing.T) {
	h := newHarness(t)
	h.target.StartErr = func(attempt int) error {
		if attempt == 1 {
			return temp451
		}
		return nil
	}
	h.submit("s@example.org", rcpts("old@x.test"), smtp.MailOptions{})
	h.waitAttempts(1) // deferred to t0+1m

	ps := &pausingStore{loading: make(chan struct{}), resume: make(chan struct{})}
	h.wrapStore = func(st store.Store) store.Store { ps.Store = st; return ps }
	h.noWaitLoad = true
	h.target.Block() // keep what is dispatched in flight, still counted
	h.restart()
	<-ps.loading

	h.submit("s@example.org", rcpts("new@x.test"), smtp.MailOptions{})
	ctx := context.Background()
	d, err := h.q.Start(ctx, testMeta(), "s@example.org")
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddRcpt(ctx, "receiving@x.test", smtp.RcptOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := d.Body(ctx, testHeader(), testBuffer()); err != nil {
		t.Fatal(err)
	}
	receivingID := d.(*delivery).msg.ID

	close(ps.resume)
	h.q.WaitLoaded()
	h.assertGauges(2, 2) // old and new; not the uncommitted one, nothing twice
	if st, _ := h.q.sched.State(receivingID); st != schedule.Unknown {
		t.Fatalf("a message not yet committed was loaded by the start-up scan (scheduler state %v)", st)
	}
	if err := d.Abort(ctx); err != nil {
		t.Fatal(err)
	}

	h.target.Unblock()
	h.waitAttempts(1) // new
	h.advance(h.cfg.policy.Delays[0])
	h.waitAttempts(1) // old
	for addr, want := range map[string]int{"old@x.test": 1, "new@x.test": 1, "receiving@x.test": 0} {
		if n := h.target.CountDelivered(addr); n != want {
			t.Errorf("%s delivered %d times, want %d", addr, n, want)
		}
	}
	if q := h.queued(); len(q) != 0 {
		t.Fatalf("%d messages left", len(q))
	}
	h.assertGauges(0, 0)
}
