package queue

import (
	"context"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/testutils"
)

// fullDiskStore fails every change after an attempt while full is set,
// as a disk that filled up mid-run does.
type fullDiskStore struct {
	store.Backend
	full    atomic.Bool
	refused atomic.Int64
}

func (s *fullDiskStore) Save(ctx context.Context, l *store.Lease, m *store.Message) (store.Request, error) {
	if s.full.Load() {
		s.refused.Add(1)
		return 0, syscall.ENOSPC
	}
	return s.Backend.Save(ctx, l, m)
}

func (s *fullDiskStore) Delete(ctx context.Context, l *store.Lease) error {
	if s.full.Load() {
		s.refused.Add(1)
		return syscall.ENOSPC
	}
	return s.Backend.Delete(ctx, l)
}

func TestStateSaveFailureNeitherLosesNorResends(t *testing.T) {
	for _, tc := range []struct {
		name string
		// bFails makes b's first attempt fail temporarily, so the
		// outcome to save is an Update; otherwise it is a Delete.
		bFails bool
	}{
		{"update after partial delivery", true},
		{"delete after full delivery", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			fs := &fullDiskStore{Backend: h.q.store}
			h.q.store = fs
			if tc.bFails {
				h.target.Rcpt = testutils.FailFirst(1, temp451, "b@x.test")
			}
			// From here on the saves after attempts fail (fullDiskStore
			// leaves Create alone: the message was accepted just before).
			fs.full.Store(true)
			h.submit("s@example.org", rcpts("a@x.test", "b@x.test"), smtp.MailOptions{})
			// The worker keeps the outcome and retries the save every
			// storeRetryDelay, without delivering again.
			h.advance(storeRetryDelay)
			h.clock.WaitTimers(1)
			if n := fs.refused.Load(); n != 2 {
				t.Fatalf("%d saves refused, want 2", n)
			}
			if n := h.target.CountDelivered("a@x.test"); n != 1 {
				t.Fatalf("a delivered %d times while the state could not be saved", n)
			}
			fs.full.Store(false)
			h.advance(storeRetryDelay)
			h.waitAttempts(1) // saved at last
			if tc.bFails {
				h.waitAttempts(1) // b, due by now, is retried at once
			}
			if a, b := h.target.CountDelivered("a@x.test"), h.target.CountDelivered("b@x.test"); a != 1 || b != 1 {
				t.Fatalf("delivered a %d, b %d times; want once each", a, b)
			}
			if q := h.queued(); len(q) != 0 {
				t.Fatalf("%d messages left", len(q))
			}
			h.assertGauges(0, 0)
		})
	}
}

// TestUnsavedOutcomesBounded: while outcomes cannot be saved (disk full),
// no more than (1+SavesPerSlot) × max_parallelism attempts are delivered
// and wait for their save; dispatch stops there, so a restart repeats at
// most that many deliveries, as the documentation promises.
func TestUnsavedOutcomesBounded(t *testing.T) {
	const parallel, messages = 2, 30
	bound := (1 + schedule.SavesPerSlot) * parallel
	h := newHarness(t, func(h *harness) { h.cfg.maxParallelism = parallel })
	fs := &fullDiskStore{Backend: h.q.store}
	h.q.store = fs
	fs.full.Store(true)
	for i := 0; i < messages; i++ {
		h.submit("s@example.org", rcpts(fmt.Sprintf("r%d@x.test", i)), smtp.MailOptions{})
	}
	if _, err := h.target.WaitDelivered(t.Context(), bound); err != nil {
		t.Fatal(err)
	}
	// Steady state: every save slot's worker sleeps before retrying its
	// save, and the delivery slots are held by workers waiting for a save
	// slot; nothing else can be dispatched.
	asleep := make(chan struct{})
	go func() { h.clock.WaitTimers(bound - parallel); close(asleep) }()
	select {
	case <-asleep:
	case <-time.After(20 * time.Second):
		t.Fatalf("dispatch went on while outcomes were unsaved: %d delivered, bound %d", len(h.target.Deliveries()), bound)
	}
	if n := len(h.target.Deliveries()); n != bound {
		t.Fatalf("%d deliveries with unsaved outcomes, bound %d", n, bound)
	}

	// A restart drops the unsaved outcomes: those messages are delivered
	// again, and no others twice.
	h.restart()
	h.waitAttempts(bound + messages) // the attempts given up at the shutdown, and all after it
	total := len(h.target.Deliveries())
	if total-messages > bound {
		t.Fatalf("%d deliveries repeated after restart, bound %d", total-messages, bound)
	}
	for i := 0; i < messages; i++ {
		if n := h.target.CountDelivered(fmt.Sprintf("r%d@x.test", i)); n < 1 {
			t.Fatalf("r%d never delivered", i)
		}
	}
	h.assertGauges(0, 0)
}
