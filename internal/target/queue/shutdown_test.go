package queue

import (
	"context"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// TestShutdownCancelledAttemptIsNotATry: an attempt cancelled because the
// queue shuts down counts no try and sends no report, even on the last
// try; only recipients the target accepted before the cancellation are
// recorded, and the rest is delivered after the restart.
func TestShutdownCancelledAttemptIsNotATry(t *testing.T) {
	for _, tc := range []struct {
		name string
		// acceptA makes the target accept a@ and be held up at b@, so the
		// cancelled attempt still delivers a@; otherwise the whole
		// attempt is held up in Body.
		acceptA bool
	}{
		{"whole attempt cancelled", false},
		{"one recipient accepted before the cancel", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(h *harness) {
				h.cfg.policy.MaxTries = 1 // the cancelled attempt is the last try
				h.cfg.shutdownTimeout = time.Millisecond
			})
			to := rcpts("a@x.test", "b@x.test")
			// The attempt is held up, until the shutdown cancels it, at
			// b@ (a@ already accepted) or in the body.
			if tc.acceptA {
				h.target.BlockRcpt("b@x.test")
			} else {
				h.target.BlockBody()
			}
			h.submit("s@example.org", to, smtp.MailOptions{})
			if err := h.target.WaitBlocked(context.Background(), 1); err != nil {
				t.Fatal(err)
			}
			if err := h.q.Close(); err != nil {
				t.Fatal(err)
			}
			h.waitAttempts(1) // the cancelled one
			h.target.Unblock()
			// The message is due at once after the restart: hold the next
			// attempt until the state and gauges are checked.
			h.target.Block()
			if n := len(h.reports()); n != 0 {
				t.Fatalf("%d reports sent for an attempt cancelled by shutdown", n)
			}

			h.open()
			q := h.queued()
			if len(q) != 1 {
				t.Fatalf("%d messages stored after the shutdown, want 1", len(q))
			}
			m := q[0]
			if m.Attempts != 0 || len(m.History) != 0 {
				t.Errorf("the cancelled attempt was recorded: attempts %d, history %+v", m.Attempts, m.History)
			}
			for _, r := range m.Rcpts {
				wantState, wantTries := store.RcptPending, 0
				if tc.acceptA && r.Addr == "a@x.test" {
					wantState, wantTries = store.RcptDelivered, 1
				}
				if r.State != wantState || r.Tries != wantTries || (r.State == store.RcptPending && r.LastError != nil) {
					t.Errorf("%s after the cancelled attempt: %v, %d tries, last error %+v; want %v, %d tries, none",
						r.Addr, r.State, r.Tries, r.LastError, wantState, wantTries)
				}
			}
			h.assertGauges(1, int64(len(m.Pending())))

			h.target.Unblock()
			h.waitAttempts(1)
			for _, r := range to {
				if n := h.target.CountDelivered(r.addr); n != 1 {
					t.Errorf("%s delivered %d times in all, want 1", r.addr, n)
				}
			}
			if n := len(h.reports()); n != 0 {
				t.Fatalf("%d reports after the restart", n)
			}
			h.assertGauges(0, 0)
		})
	}
}
