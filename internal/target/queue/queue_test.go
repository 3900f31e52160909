package queue

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/exterrors"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/testutils"
)

var (
	temp451 = testutils.Temp(451, [3]int{4, 4, 1}, "try later")
	perm550 = testutils.Perm(550, [3]int{5, 1, 1}, "no such user")
)

func TestDeliverAllAndRemove(t *testing.T) {
	h := newHarness(t)
	h.submit("sender@example.org", rcpts("a@example.com", "b@example.com"), smtp.MailOptions{})
	h.waitAttempts(1)
	got := h.target.Deliveries()
	if len(got) != 1 || strings.Join(got[0].Rcpts, ",") != "a@example.com,b@example.com" {
		t.Fatalf("deliveries: %+v", got)
	}
	if string(got[0].Body) != testBody || got[0].Header.Get("Subject") != "test" {
		t.Fatalf("content changed: %q %q", got[0].Body, got[0].Header.Get("Subject"))
	}
	if len(h.queued()) != 0 {
		t.Fatal("delivered message still stored")
	}
	h.assertGauges(0, 0)
	if len(h.reports()) != 0 {
		t.Fatal("DSN sent for a plain successful delivery")
	}
}

func TestEnvelopeOptionsPassedOnEveryAttempt(t *testing.T) {
	h := newHarness(t)
	h.target.Rcpt = testutils.FailFirst(1, temp451)
	auth := "alice@example.org"
	mail := smtp.MailOptions{Body: smtp.Body8BitMIME, UTF8: true, RequireTLS: true, Return: smtp.DSNReturnHeaders, EnvelopeID: "env-42", Auth: &auth}
	rcptOpts := smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed},
		OriginalRecipientType: smtp.DSNAddressTypeRFC822, OriginalRecipient: "orig@example.com"}
	h.submit("sender@example.org", []rcpt{{"a@example.com", rcptOpts}}, mail)
	h.waitAttempts(1)
	h.advance(time.Minute)
	h.waitAttempts(1)
	recs := h.target.Records()
	if len(recs) != 2 {
		t.Fatalf("%d attempts", len(recs))
	}
	for i, r := range recs {
		o := r.MsgMeta.SMTPOpts
		if o.Body != mail.Body || !o.UTF8 || !o.RequireTLS || o.Return != mail.Return || o.EnvelopeID != mail.EnvelopeID || o.Auth == nil || *o.Auth != auth {
			t.Errorf("attempt %d: MAIL options %+v", i+1, o)
		}
		ro := r.Rcpts[0].Opts
		if fmt.Sprint(ro.Notify) != fmt.Sprint(rcptOpts.Notify) || ro.OriginalRecipient != "orig@example.com" || ro.OriginalRecipientType != smtp.DSNAddressTypeRFC822 {
			t.Errorf("attempt %d: RCPT options %+v", i+1, ro)
		}
		if r.From != "sender@example.org" {
			t.Errorf("attempt %d: from %q", i+1, r.From)
		}
	}
}

// TestPerRecipientOutcomes checks which recipients are retried for each way
// an attempt can fail (the seed's attribution rules).
func TestPerRecipientOutcomes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		setup   func(*testutils.FakeTarget)
		retried []string // recipients of the second attempt
		failed  []string // recipients reported failed after the first
	}{
		{"Start fails temporarily: all retried", func(ft *testutils.FakeTarget) {
			ft.StartErr = testutils.AttemptErrors(temp451)
		}, []string{"a@x.test", "b@x.test", "c@x.test"}, nil},
		{"Start fails permanently: all failed", func(ft *testutils.FakeTarget) {
			ft.StartErr = testutils.AttemptErrors(perm550)
		}, nil, []string{"a@x.test", "b@x.test", "c@x.test"}},
		{"AddRcpt: one temporary, one permanent", func(ft *testutils.FakeTarget) {
			ft.Rcpt = testutils.ChainRcpt(testutils.FailFirst(1, temp451, "b@x.test"), testutils.FailRcpts(map[string]error{"c@x.test": perm550}))
		}, []string{"b@x.test"}, []string{"c@x.test"}},
		{"Body fails (atomic): all accepted retried", func(ft *testutils.FakeTarget) {
			ft.BodyErr = testutils.AttemptErrors(temp451)
		}, []string{"a@x.test", "b@x.test", "c@x.test"}, nil},
		{"BodyNonAtomic statuses: only the failed retried", func(ft *testutils.FakeTarget) {
			ft.Partial, ft.FailAt = true, testutils.FailAtBody
			ft.Rcpt = testutils.ChainRcpt(testutils.FailFirst(1, temp451, "a@x.test"), testutils.FailRcpts(map[string]error{"b@x.test": perm550}))
		}, []string{"a@x.test"}, []string{"b@x.test"}},
		{"unknown error is temporary", func(ft *testutils.FakeTarget) {
			ft.Rcpt = testutils.FailFirst(1, errors.New("something odd"), "a@x.test")
		}, []string{"a@x.test"}, nil},
		{"Commit fails: all retried", func(ft *testutils.FakeTarget) {
			ft.CommitErr = testutils.AttemptErrors(temp451)
		}, []string{"a@x.test", "b@x.test", "c@x.test"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			tc.setup(h.target)
			h.submit("s@example.org", rcpts("a@x.test", "b@x.test", "c@x.test"), smtp.MailOptions{})
			h.waitAttempts(1)
			if tc.retried != nil {
				h.advance(time.Minute)
				h.waitAttempts(1)
				recs := h.target.Records()
				var second []string
				for _, r := range recs[1].Rcpts {
					second = append(second, r.Rcpt)
				}
				if strings.Join(second, ",") != strings.Join(tc.retried, ",") {
					t.Fatalf("second attempt to %v, want %v", second, tc.retried)
				}
			}
			reps := h.reports()
			if tc.failed == nil {
				if len(reps) != 0 {
					t.Fatalf("unexpected DSN:\n%s", reportText(reps[0]))
				}
				return
			}
			if len(reps) != 1 {
				t.Fatalf("%d DSNs, want 1", len(reps))
			}
			text := reportText(reps[0])
			for _, f := range tc.failed {
				if !strings.Contains(text, "Final-Recipient: rfc822; "+f) {
					t.Errorf("DSN lacks %s:\n%s", f, text)
				}
			}
			if n := strings.Count(text, "Final-Recipient:"); n != len(tc.failed) {
				t.Errorf("DSN names %d recipients, want %d", n, len(tc.failed))
			}
		})
	}
}

func TestRetryScheduleAndGiveUpAfterMaxTries(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.cfg.policy.MaxTries = 3 })
	h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": temp451})
	h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
	h.waitAttempts(1)
	// Not yet due: 59 s later nothing happens.
	h.advance(59 * time.Second)
	h.clock.WaitTimers(1)
	if n := h.target.Attempts(); n != 1 {
		t.Fatalf("%d attempts before the retry delay", n)
	}
	h.advance(time.Second)
	h.waitAttempts(1)
	h.advance(10 * time.Minute)
	h.waitAttempts(1)
	if n := h.target.Attempts(); n != 3 {
		t.Fatalf("%d attempts, want 3", n)
	}
	if len(h.queued()) != 0 {
		t.Fatal("message kept after max_tries")
	}
	reps := h.reports()
	if len(reps) != 1 {
		t.Fatalf("%d DSNs", len(reps))
	}
	text := reportText(reps[0])
	for _, want := range []string{"Action: failed", "Status: 4.4.1", "Diagnostic-Code: smtp; 451 4.4.1 try later"} {
		if !strings.Contains(text, want) {
			t.Errorf("DSN lacks %q:\n%s", want, text)
		}
	}
	h.assertGauges(0, 0)
}

func TestGiveUpAfterMaxAge(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		h.cfg.policy.MaxTries = 100
		h.cfg.policy.MaxAge = 15 * time.Minute
	})
	h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": temp451})
	h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
	h.waitAttempts(1)
	h.advance(time.Minute) // 2nd attempt at 1m
	h.waitAttempts(1)
	h.advance(14 * time.Minute) // 3rd at the 15m deadline (clamped from 11m+10m)
	h.waitAttempts(1)
	if n := h.target.Attempts(); n != 3 {
		t.Fatalf("%d attempts, want 3", n)
	}
	if len(h.queued()) != 0 || len(h.reports()) != 1 {
		t.Fatalf("after max_age: %d queued, %d DSNs", len(h.queued()), len(h.reports()))
	}
}

func TestDSNEnvelopeAndNullSender(t *testing.T) {
	for _, tc := range []struct {
		name    string
		from    string
		bounce  bool
		reports int
		reason  string
	}{
		{"report to the sender", "s@example.org", true, 1, ""},
		{"null sender gets none", "", true, 0, "null_sender"},
		{"no bounce pipeline", "s@example.org", false, 0, "no_bounce_pipeline"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(h *harness) {
				if !tc.bounce {
					h.bounce = nil
				}
			})
			h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": perm550})
			var before float64
			if tc.reason != "" {
				before = testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", tc.reason))
			}
			h.submit(tc.from, rcpts("a@x.test"), smtp.MailOptions{})
			h.waitAttempts(1)
			if tc.reason != "" {
				if got := testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", tc.reason)) - before; got != 1 {
					t.Fatalf("not-sent counter grew by %v", got)
				}
			}
			if !tc.bounce {
				return
			}
			reps := h.reports()
			if len(reps) != tc.reports {
				t.Fatalf("%d DSNs, want %d", len(reps), tc.reports)
			}
			if tc.reports == 0 {
				return
			}
			r := reps[0]
			if r.From != "" || len(r.Rcpts) != 1 || r.Rcpts[0] != tc.from {
				t.Fatalf("DSN envelope: from %q to %v", r.From, r.Rcpts)
			}
			if n := r.RcptOpts[tc.from].Notify; len(n) != 1 || n[0] != smtp.DSNNotifyNever {
				t.Fatalf("DSN NOTIFY = %v, want NEVER", n)
			}
			if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "multipart/report") {
				t.Fatalf("Content-Type %q", ct)
			}
			if to := r.Header.Get("To"); !strings.Contains(to, tc.from) {
				t.Fatalf("To %q", to)
			}
		})
	}
}

func TestNotifyRules(t *testing.T) {
	never := []smtp.DSNNotify{smtp.DSNNotifyNever}
	success := []smtp.DSNNotify{smtp.DSNNotifySuccess}
	failure := []smtp.DSNNotify{smtp.DSNNotifyFailure}
	h := newHarness(t)
	h.target.Rcpt = testutils.FailRcpts(map[string]error{"f1@x.test": perm550, "f2@x.test": perm550, "f3@x.test": perm550, "f4@x.test": perm550})
	h.submit("s@example.org", []rcpt{
		{"f1@x.test", smtp.RcptOptions{}},                 // absent NOTIFY: failure reported
		{"f2@x.test", smtp.RcptOptions{Notify: never}},    // NEVER: nothing
		{"f3@x.test", smtp.RcptOptions{Notify: success}},  // no FAILURE: nothing
		{"f4@x.test", smtp.RcptOptions{Notify: failure}},  // FAILURE: reported
		{"ok1@x.test", smtp.RcptOptions{Notify: success}}, // SUCCESS: relayed
		{"ok2@x.test", smtp.RcptOptions{}},                // nothing on success
	}, smtp.MailOptions{})
	h.waitAttempts(1)
	reps := h.reports()
	if len(reps) != 1 {
		t.Fatalf("%d reports, want one for the whole event", len(reps))
	}
	text := reportText(reps[0])
	for addr, want := range map[string]bool{"f1": true, "f2": false, "f3": false, "f4": true, "ok1": true, "ok2": false} {
		if got := strings.Contains(text, "Final-Recipient: rfc822; "+addr+"@x.test"); got != want {
			t.Errorf("%s in report = %v, want %v", addr, got, want)
		}
	}
	if !strings.Contains(text, "Action: relayed") {
		t.Errorf("no relayed action for NOTIFY=SUCCESS:\n%s", text)
	}
}

func TestDelayWarning(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		h.cfg.delayWarning = 5 * time.Minute
		h.cfg.policy.Delays = []time.Duration{time.Minute, 10 * time.Minute}
	})
	h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": temp451})
	h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
	h.waitAttempts(1)
	h.advance(time.Minute) // 2nd attempt at 1m; next would be at 11m
	h.waitAttempts(1)
	if len(h.reports()) != 0 {
		t.Fatal("delay report before delay_warning")
	}
	// The next attempt is moved to the 5m mark so the report is on time.
	h.advance(4 * time.Minute)
	h.waitAttempts(1)
	reps := h.reports()
	if len(reps) != 1 || !strings.Contains(reportText(reps[0]), "Action: delayed") {
		t.Fatalf("%d reports after delay_warning", len(reps))
	}
	if !strings.Contains(reportText(reps[0]), "Will-Retry-Until:") {
		t.Fatal("delayed report without Will-Retry-Until")
	}
	// Only once per recipient.
	h.advance(10 * time.Minute)
	h.waitAttempts(1)
	if len(h.reports()) != 1 {
		t.Fatalf("%d delay reports, want 1", len(h.reports()))
	}
}

func TestRestartResumesWithoutResending(t *testing.T) {
	h := newHarness(t)
	h.target.Rcpt = testutils.FailFirst(1, temp451, "b@x.test")
	h.submit("s@example.org", rcpts("a@x.test", "b@x.test"), smtp.MailOptions{})
	h.waitAttempts(1)
	h.assertGauges(1, 1)
	h.restart()
	h.assertGauges(1, 1)
	h.advance(time.Minute)
	h.waitAttempts(1)
	if n := h.target.CountDelivered("a@x.test"); n != 1 {
		t.Fatalf("a delivered %d times across the restart", n)
	}
	if n := h.target.CountDelivered("b@x.test"); n != 1 {
		t.Fatalf("b delivered %d times", n)
	}
	h.assertGauges(0, 0)
}

func TestAbortRemovesStoredMessage(t *testing.T) {
	h := newHarness(t)
	h.target.Block()
	d, _ := h.q.Start(t.Context(), testMeta(), "s@example.org")
	d.AddRcpt(t.Context(), "a@x.test", smtp.RcptOptions{})
	if err := d.Body(t.Context(), testHeader(), largeBuffer()); err != nil {
		t.Fatal(err)
	}
	if len(h.queued()) != 1 {
		t.Fatal("Body did not store the message")
	}
	if err := d.Abort(t.Context()); err != nil {
		t.Fatal(err)
	}
	if len(h.queued()) != 0 {
		t.Fatal("Abort left the message stored")
	}
	h.assertGauges(0, 0)
}

func TestDuplicateRecipientsDeliveredOnce(t *testing.T) {
	h := newHarness(t)
	h.submit("s@example.org", rcpts("a@x.test", "a@x.test"), smtp.MailOptions{})
	h.waitAttempts(1)
	if n := h.target.CountDelivered("a@x.test"); n != 1 {
		t.Fatalf("delivered %d times", n)
	}
}

func TestParallelismLimit(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.cfg.maxParallelism = 3 })
	h.target.Block()
	for i := 0; i < 20; i++ {
		h.submit("s@example.org", rcpts(fmt.Sprintf("r%d@x.test", i)), smtp.MailOptions{})
	}
	if err := h.target.WaitBlocked(t.Context(), 3); err != nil {
		t.Fatal(err)
	}
	h.target.Unblock()
	h.waitAttempts(20)
	if m := h.target.MaxConcurrent(); m > 3 {
		t.Fatalf("%d attempts at once, max_parallelism 3", m)
	}
	if len(h.target.Deliveries()) != 20 {
		t.Fatalf("%d delivered", len(h.target.Deliveries()))
	}
}

func TestShutdownWaitsForAttemptInFlight(t *testing.T) {
	h := newHarness(t)
	h.target.BlockBody()
	h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
	if err := h.target.WaitBlocked(t.Context(), 1); err != nil {
		t.Fatal(err)
	}
	closed := make(chan error)
	go func() { closed <- h.q.Close() }()
	h.target.Unblock()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	<-h.done
	if len(h.target.Deliveries()) != 1 {
		t.Fatal("attempt in flight did not finish")
	}
	h.open()
	if len(h.queued()) != 0 {
		t.Fatal("finished message still stored after shutdown")
	}
}

func TestShutdownTimeoutCancelsAndKeepsMessage(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.cfg.shutdownTimeout = 10 * time.Millisecond })
	h.target.BlockBody()
	h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
	if err := h.target.WaitBlocked(t.Context(), 1); err != nil {
		t.Fatal(err)
	}
	if err := h.q.Close(); err != nil {
		t.Fatal(err)
	}
	h.target.Unblock()
	h.target.Block() // the message is due at once after the restart
	h.open()
	if q := h.queued(); len(q) != 1 || q[0].Rcpts[0].State != store.RcptPending {
		t.Fatalf("message after cancelled attempt: %+v", q)
	}
	h.target.Unblock()
}

func TestStoreFailureIsTemporary451(t *testing.T) {
	h := newHarness(t)
	h.q.store.Close() // every write now fails
	err := h.trySubmit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{}, testBody)
	var se *exterrors.SMTPError
	if !errors.As(err, &se) || se.Code != 451 || se.EnhancedCode != (exterrors.EnhancedCode{4, 3, 1}) {
		t.Fatalf("submit on a broken store = %#v, want 451 4.3.1", err)
	}
}

func TestCorruptEntryQuarantinedOthersDelivered(t *testing.T) {
	h := newHarness(t)
	h.target.StartErr = testutils.AttemptErrors(temp451, temp451)
	h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
	h.submit("s@example.org", rcpts("b@x.test"), smtp.MailOptions{})
	h.waitAttempts(2)
	ids := h.queued()
	before := testutil.ToFloat64(metrics.Quarantined.WithLabelValues("test_queue"))
	h.q.store.Quarantine(context.Background(), ids[0].ID, errors.New("test damage"))
	if got := testutil.ToFloat64(metrics.Quarantined.WithLabelValues("test_queue")) - before; got != 1 {
		t.Fatalf("quarantine counter grew by %v", got)
	}
	h.assertGauges(1, 1)
	h.advance(time.Minute)
	h.waitAttempts(1) // the quarantined one left the queue
	if n := h.target.CountDelivered("b@x.test"); n != 1 {
		t.Fatalf("good message delivered %d times", n)
	}
	h.assertGauges(0, 0)
}

// TestJitterSpreadsRetryWave: messages that fail together (a next hop
// down) must not all come back at the same instant.
func TestJitterSpreadsRetryWave(t *testing.T) {
	const n = 200
	h := newHarness(t, func(h *harness) {
		h.cfg.maxParallelism = 16
		h.cfg.policy.Jitter = 0.1
		h.cfg.policy.Delays = []time.Duration{10 * time.Minute}
	})
	rng := rand.New(rand.NewPCG(1, 2))
	var mu sync.Mutex
	h.q.rand = func() float64 { mu.Lock(); defer mu.Unlock(); return rng.Float64() }
	h.target.StartErr = func(int) error { return temp451 }
	for i := 0; i < n; i++ {
		h.submit("s@example.org", rcpts(fmt.Sprintf("r%d@x.test", i)), smtp.MailOptions{})
	}
	h.waitAttempts(n)
	lo, hi := time.Duration(1<<62), time.Duration(0)
	distinct := map[time.Time]bool{}
	for _, m := range h.queued() {
		d := m.NextAttempt.Sub(t0)
		lo, hi = min(lo, d), max(hi, d)
		distinct[m.NextAttempt] = true
	}
	// ±10% of 10 minutes is 9m..11m; a uniform spread over 200 draws
	// covers most of it.
	if lo < 9*time.Minute || hi > 11*time.Minute || hi-lo < 90*time.Second || len(distinct) < n*9/10 {
		t.Fatalf("retry wave spread over [%v, %v] with %d distinct times", lo, hi, len(distinct))
	}
}
