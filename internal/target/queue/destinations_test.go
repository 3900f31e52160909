package queue

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/testutils"
)

var refusedConn = testutils.Temp(451, [3]int{4, 4, 1}, "connection refused")

// TestSlowDestinationHoldsOnlyItsOwnSlots: attempts of a destination that
// does not answer hold at most max_parallelism_per_destination of the
// max_parallelism slots, and the other destinations' mail flows past.
func TestSlowDestinationHoldsOnlyItsOwnSlots(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		h.cfg.destinations = destinationDomain
		h.cfg.maxParallelism, h.cfg.perDestination = 4, 2
	})
	release := make(chan struct{})
	var slowNow, slowMax atomic.Int64
	h.target.Rcpt = func(_ int, rcpt string) error {
		if strings.HasSuffix(rcpt, "@slow.test") {
			n := slowNow.Add(1)
			for m := slowMax.Load(); n > m && !slowMax.CompareAndSwap(m, n); m = slowMax.Load() {
			}
			<-release
			slowNow.Add(-1)
		}
		return nil
	}
	for i := 0; i < 5; i++ {
		h.submit("s@example.org", rcpts(fmt.Sprintf("r%d@slow.test", i)), smtp.MailOptions{})
	}
	for i := 0; i < 10; i++ {
		h.submit("s@example.org", rcpts(fmt.Sprintf("r%d@fast.test", i)), smtp.MailOptions{})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := h.target.WaitDelivered(ctx, 10); err != nil {
		t.Fatalf("the fast destination's mail waited behind the slow one's: %v (slow attempts at once: %d)", err, slowMax.Load())
	}
	if n := slowMax.Load(); n > 2 {
		t.Fatalf("%d attempts of one destination at once, limit 2", n)
	}
	close(release)
	// (Some attempts end as releases: a claim took more of the slow
	// destination than its limit. Count deliveries, not attempts.)
	if _, err := h.target.WaitDelivered(ctx, 15); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if n := h.target.CountDelivered(fmt.Sprintf("r%d@slow.test", i)); n != 1 {
			t.Fatalf("r%d@slow.test delivered %d times", i, n)
		}
	}
}

// TestMessageStoredPerDestination: a message for several domains is
// stored once per domain, and each domain gets one transaction with its
// recipients.
func TestMessageStoredPerDestination(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.cfg.destinations = destinationDomain })
	h.target.Block()
	h.submit("s@example.org", rcpts("a@one.test", "c@two.test", "b@ONE.test"), smtp.MailOptions{})
	q := h.queued()
	if len(q) != 2 || q[0].Destination != "one.test" || q[1].Destination != "two.test" ||
		len(q[0].Rcpts) != 2 || len(q[1].Rcpts) != 1 || q[0].MsgID != q[1].MsgID {
		t.Fatalf("stored entries: %+v", q)
	}
	h.assertGauges(2, 3)
	h.target.Unblock()
	h.waitAttempts(2)
	var got []string
	for _, d := range h.target.Deliveries() {
		got = append(got, strings.Join(d.Rcpts, ","))
	}
	if len(got) != 2 || !(got[0] == "a@one.test,b@ONE.test" && got[1] == "c@two.test" || got[1] == "a@one.test,b@ONE.test" && got[0] == "c@two.test") {
		t.Fatalf("transactions: %q", got)
	}
	h.assertGauges(0, 0)
}

// deadDestinationHarness runs a queue whose destination dead.test refuses
// every connection while down is set.
func deadDestinationHarness(t *testing.T, mut func(h *harness)) (*harness, *atomic.Bool, *atomic.Int64) {
	var down atomic.Bool
	var reached atomic.Int64
	down.Store(true)
	h := newHarness(t, func(h *harness) {
		h.cfg.destinations = destinationDomain
		h.cfg.maxParallelism, h.cfg.perDestination = 4, 2
		h.cfg.deadAfter = 2
		h.cfg.backoffMin, h.cfg.backoffMax = 10*time.Second, 40*time.Second
		h.cfg.policy.Delays = []time.Duration{10 * time.Minute}
		h.cfg.policy.MaxTries = 5
		if mut != nil {
			mut(h)
		}
	})
	h.target.Rcpt = func(_ int, rcpt string) error {
		if strings.HasSuffix(rcpt, "@dead.test") {
			reached.Add(1)
			if down.Load() {
				return refusedConn
			}
		}
		return nil
	}
	return h, &down, &reached
}

// TestDeadDestinationSuspendedProbedAndReleased: a destination that
// keeps refusing is suspended after dead_destination_after attempts; its
// other messages are not attempted and count no try; a probe is sent when
// each suspension ends, and when one succeeds every waiting message is
// delivered at once, whatever its own retry time.
func TestDeadDestinationSuspendedProbedAndReleased(t *testing.T) {
	h, down, reached := deadDestinationHarness(t, nil)
	const n = 20
	// 2 failed attempts, 18 postponed (and a few released on the way: a
	// claim may take more of the destination than its limit).
	submitToDeadAndWait(t, h, n)
	// dead_destination_after failures suspend it; until the second one,
	// another attempt may start in the room the first left.
	before := reached.Load()
	if before < 2 || before > 3 {
		t.Fatalf("%d attempts reached the dead destination before its suspension, want 2 or 3", before)
	}
	sus := h.q.Suspended()
	if len(sus) != 1 || sus[0].Destination != "dead.test" || !strings.Contains(sus[0].Reason, "connection refused") ||
		!sus[0].NextProbe.Equal(t0.Add(10*time.Second)) {
		t.Fatalf("suspended: %+v", sus)
	}
	postponed := 0
	for _, m := range h.queued() {
		if m.Postponed == 1 && m.Rcpts[0].Tries == 0 {
			postponed++
			if rc := m.Rcpts[0]; rc.Tries != 0 || rc.LastError == nil || !strings.Contains(rc.LastError.Message, "connection refused") {
				t.Fatalf("postponed message: tries %d, last error %+v", rc.Tries, rc.LastError)
			}
		}
	}
	if postponed != n-int(before) {
		t.Fatalf("%d messages postponed, want %d", postponed, n-int(before))
	}

	drain(h)
	// Probes at 10s, then 20s and 40s later; the destination is back for
	// the third, and every message is released at once: no more time
	// passes.
	for i, wait := range []time.Duration{10 * time.Second, 20 * time.Second, 40 * time.Second} {
		if i == 2 {
			down.Store(false)
		}
		h.advance(wait)
		if i < 2 {
			h.waitAttempts(1)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := h.target.WaitDelivered(ctx, n); err != nil {
		t.Fatalf("after the successful probe: %v", err)
	}
	waitFor(t, func() bool { return len(h.queued()) == 0 && h.q.flights.len() == 0 })
	if got := reached.Load(); got != before+3+n-1 {
		t.Fatalf("%d attempts reached the destination; want %d before the suspension, 3 probes and %d deliveries after", got, before, n-1)
	}
	for i := 0; i < n; i++ {
		if c := h.target.CountDelivered(fmt.Sprintf("r%d@dead.test", i)); c != 1 {
			t.Fatalf("r%d delivered %d times", i, c)
		}
	}
	if sus := h.q.Suspended(); len(sus) != 0 {
		t.Fatalf("still suspended: %+v", sus)
	}
	h.assertGauges(0, 0)
}

// TestRetryLiftsSuspension: an operator's retry of a suspended
// destination's mail ends the suspension and sends the mail now, whether
// the retry names the domain or selects everything, and with destination
// single (the whole next hop suspended) too.
func TestRetryLiftsSuspension(t *testing.T) {
	for _, tc := range []struct {
		name   string
		dests  destinationMode
		filter admin.Filter
	}{
		{"domain, --to @domain", destinationDomain, admin.Filter{To: "@dead.test"}},
		{"domain, --all", destinationDomain, admin.Filter{}},
		{"single, --all", destinationSingle, admin.Filter{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, down, _ := deadDestinationHarness(t, func(h *harness) { h.cfg.destinations = tc.dests })
			submitToDeadAndWait(t, h, 6)
			if len(h.q.Suspended()) != 1 {
				t.Fatal("not suspended")
			}
			down.Store(false)
			// The lift lets the dispatcher send the first retried
			// message at once: some may be in flight by the time the
			// retry reaches them.
			if res := h.apply(admin.OpRetry, tc.filter); res.Matched != 6 || res.Failed != 0 {
				t.Fatalf("retry: %+v", res)
			}
			if len(h.q.Suspended()) != 0 {
				t.Fatalf("still suspended: %+v", h.q.Suspended())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if _, err := h.target.WaitDelivered(ctx, 6); err != nil {
				t.Fatalf("after the retry: %v", err)
			}
		})
	}
}

// TestSuspensionKeepsDeadlineAndDelayReports: mail for a suspended
// destination still gets its delay report on time and fails at max_age,
// with the destination's error, although it was never attempted.
func TestSuspensionKeepsDeadlineAndDelayReports(t *testing.T) {
	h, _, reached := deadDestinationHarness(t, func(h *harness) {
		h.cfg.deadAfter = 1
		h.cfg.policy.MaxAge = time.Hour
		h.cfg.delayWarning = 30 * time.Minute
		// No probe within the hour: only the message's own times count.
		h.cfg.backoffMin, h.cfg.backoffMax = 2*time.Hour, 2*time.Hour
	})
	h.submit("s@example.org", rcpts("first@dead.test"), smtp.MailOptions{})
	h.waitAttempts(1) // fails: suspended
	h.submit("s@example.org", rcpts("never@dead.test"), smtp.MailOptions{})
	h.waitAttempts(1) // postponed
	// Both come due every 10 minutes (the retry delay, and the spacing of
	// postponements): postponed each time, until the deadline ends them.
	for len(h.queued()) > 0 {
		h.advance(10 * time.Minute)
		h.waitAttempts(2)
	}
	if got := h.clock.Now().Sub(t0); got != time.Hour {
		t.Fatalf("retrying ended after %v, want max_age 1h", got)
	}
	if got := reached.Load(); got != 1 {
		t.Fatalf("%d attempts reached the suspended destination, want the first only", got)
	}
	var reps []string
	for _, r := range h.reports() {
		if txt := reportText(r); strings.Contains(txt, "never@dead.test") {
			reps = append(reps, txt)
		}
	}
	if len(reps) != 2 || !strings.Contains(reps[0], "Action: delayed") || !strings.Contains(reps[1], "Action: failed") ||
		!strings.Contains(reps[1], "connection refused") {
		t.Fatalf("reports for the never-attempted recipient: %d\n%s", len(reps), strings.Join(reps, "\n----\n"))
	}
}

// TestFallbackTarget: recipients still failing past fallback_after are
// sent through the fallback target, and their reports say so.
func TestFallbackTarget(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		h.fallback = &testutils.FakeTarget{InstName: "relay"}
		h.cfg.fallbackTries = 2
		h.cfg.deadAfter = 0
	})
	h.target.Rcpt = func(int, string) error { return refusedConn }
	notify := smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifySuccess, smtp.DSNNotifyFailure}}
	h.submit("s@example.org", []rcpt{{"a@x.test", notify}}, smtp.MailOptions{})
	h.waitAttempts(1)
	h.advance(time.Minute)
	h.waitAttempts(1)
	if n := len(h.fallback.Deliveries()); n != 0 {
		t.Fatalf("the fallback took the message before fallback_after: %d", n)
	}
	h.advance(10 * time.Minute)
	h.waitAttempts(1)
	if n := len(h.fallback.Deliveries()); n != 1 || h.target.Attempts() != 2 {
		t.Fatalf("after fallback_after: %d through the fallback, %d primary attempts", n, h.target.Attempts())
	}
	reps := h.reports()
	if len(reps) != 1 || !strings.Contains(reportText(reps[0]), "X-Spool-Via: fallback relay") ||
		!strings.Contains(reportText(reps[0]), "Action: relayed") {
		t.Fatalf("success report: %d\n%s", len(reps), reportText(reps[0]))
	}
}

// drain discards the attempt notifications so far, so the next wait
// counts from here.
func drain(h *harness) {
	for {
		select {
		case <-h.done:
		default:
			return
		}
	}
}

// submitToDeadAndWait submits n messages to dead.test, one recipient
// each, and waits until every one has been tried once or postponed once
// and no attempt is in flight.
func submitToDeadAndWait(t *testing.T, h *harness, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		h.submit("s@example.org", rcpts(fmt.Sprintf("r%d@dead.test", i)), smtp.MailOptions{})
	}
	waitFor(t, func() bool {
		done := 0
		for _, m := range h.queued() {
			if m.Postponed == 1 || m.Rcpts[0].Tries == 1 {
				done++
			}
		}
		return done == n && h.q.flights.len() == 0
	})
}
