package queue

import (
	"context"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/testutils"
)

// fullDiskStore fails every change after an attempt while full is set,
// as a disk that filled up mid-run does.
type fullDiskStore struct {
	store.Store
	full    atomic.Bool
	refused atomic.Int64
}

func (s *fullDiskStore) Update(ctx context.Context, m *store.Message) error {
	if s.full.Load() {
		s.refused.Add(1)
		return syscall.ENOSPC
	}
	return s.Store.Update(ctx, m)
}

func (s *fullDiskStore) Delete(ctx context.Context, id store.ID) error {
	if s.full.Load() {
		s.refused.Add(1)
		return syscall.ENOSPC
	}
	return s.Store.Delete(ctx, id)
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
			fs := &fullDiskStore{Store: h.q.store}
			h.q.store = fs
			if tc.bFails {
				h.target.Rcpt = testutils.FailFirst(1, temp451, "b@x.test")
			}
			// From here on the saves after attempts fail (fullDiskStore
			// leaves Create alone: the message was accepted just before).
			fs.full.Store(true)
			h.submit("s@example.org", rcpts("a@x.test", "b@x.test"), smtp.MailOptions{})
			h.waitAttempts(1)
			if fs.refused.Load() == 0 {
				t.Fatal("the save was not attempted")
			}
			// The save is retried every storeRetryDelay without delivering
			// again while the disk stays full.
			h.advance(storeRetryDelay)
			h.waitAttempts(1)
			if n := h.target.CountDelivered("a@x.test"); n != 1 {
				t.Fatalf("a delivered %d times while the state could not be saved", n)
			}
			fs.full.Store(false)
			h.advance(storeRetryDelay)
			h.waitAttempts(1) // the save goes through (b, due by now, was retried on the way)
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
