package queue

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/testutils"
)

// apply runs an operator command and fails the test on an error.
func (h *harness) apply(op admin.Op, f admin.Filter) admin.Result {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := h.q.Apply(ctx, op, f)
	if err != nil {
		h.t.Fatalf("%s: %v", op, err)
	}
	return res
}

func ids(ms ...*store.Message) admin.Filter {
	var f admin.Filter
	for _, m := range ms {
		f.IDs = append(f.IDs, m.ID)
	}
	return f
}

// deferredMessage queues one message whose first attempt fails
// temporarily, and returns it as stored after that attempt.
func (h *harness) deferredMessage(from string, to ...string) *store.Message {
	h.t.Helper()
	before := len(h.queued())
	h.submit(from, rcpts(to...), smtp.MailOptions{})
	h.waitAttempts(1)
	q := h.queued()
	if len(q) != before+1 {
		h.t.Fatalf("%d messages queued, want %d", len(q), before+1)
	}
	return q[len(q)-1]
}

func TestAdminHoldRetryRelease(t *testing.T) {
	h := newHarness(t)
	h.target.Rcpt = testutils.FailFirst(1, temp451, "a@x.test")
	m := h.deferredMessage("s@example.org", "a@x.test")

	res := h.apply(admin.OpHold, ids(m))
	if res.Changed != 1 || res.Matched != 1 {
		t.Fatalf("hold: %+v", res)
	}
	if g := h.figures(); g.Held != 1 || g.Messages != 1 {
		t.Fatalf("gauges after hold: %+v", g)
	}
	if got := h.get(m.ID); !got.Held || got.Lease != nil {
		t.Fatalf("held message: held %v, lease %+v", got.Held, got.Lease)
	}
	// Retry does not override a hold.
	if res := h.apply(admin.OpRetry, ids(m)); res.Unchanged != 1 || res.Changed != 0 || !strings.Contains(res.Items[0].Detail, "held") {
		t.Fatalf("retry of a held message: %+v", res)
	}
	// A held message is neither attempted nor expired, however long it
	// waits: max_age is 2h here.
	h.clock.Advance(6 * time.Hour)
	if n := h.target.Attempts(); n != 1 {
		t.Fatalf("held message attempted: %d attempts", n)
	}
	// Holding survives a restart.
	h.restart()
	if g := h.figures(); g.Held != 1 {
		t.Fatalf("held gauge after restart: %+v", g)
	}
	if res := h.apply(admin.OpHold, ids(m)); res.Unchanged != 1 {
		t.Fatalf("second hold: %+v", res)
	}

	if res := h.apply(admin.OpRelease, ids(m)); res.Changed != 1 {
		t.Fatalf("release: %+v", res)
	}
	h.waitAttempts(1) // due at once
	if n := h.target.CountDelivered("a@x.test"); n != 1 {
		t.Fatalf("delivered %d times after release", n)
	}
	h.assertGauges(0, 0)
	if g := h.figures(); g.Held != 0 {
		t.Fatalf("held gauge after delivery: %d", g.Held)
	}
}

func TestAdminRetryMakesDueNow(t *testing.T) {
	h := newHarness(t)
	h.target.Rcpt = testutils.FailFirst(1, temp451, "a@x.test")
	m := h.deferredMessage("s@example.org", "a@x.test")
	if got := h.get(m.ID); got.Lease != nil || !got.NextAttempt.After(h.clock.Now()) {
		t.Fatalf("before retry: lease %+v, next attempt %v", got.Lease, got.NextAttempt)
	}
	before := testutil.ToFloat64(metrics.AdminOperations.WithLabelValues("test_queue", "retry"))
	res := h.apply(admin.OpRetry, admin.Filter{}) // every message
	if res.Changed != 1 {
		t.Fatalf("retry: %+v", res)
	}
	if got := testutil.ToFloat64(metrics.AdminOperations.WithLabelValues("test_queue", "retry")) - before; got != 1 {
		t.Fatalf("admin metric grew by %v", got)
	}
	h.waitAttempts(1) // without advancing the clock
	if n := h.target.CountDelivered("a@x.test"); n != 1 {
		t.Fatalf("delivered %d", n)
	}
}

func TestAdminDeleteSendsNoReport(t *testing.T) {
	h := newHarness(t)
	h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": temp451, "b@x.test": temp451})
	m := h.deferredMessage("s@example.org", "a@x.test", "b@x.test")
	h.apply(admin.OpHold, ids(m))
	res := h.apply(admin.OpDelete, ids(m))
	if res.Changed != 1 {
		t.Fatalf("delete: %+v", res)
	}
	if len(h.queued()) != 0 || len(h.reports()) != 0 {
		t.Fatalf("after delete: %d queued, %d reports", len(h.queued()), len(h.reports()))
	}
	h.assertGauges(0, 0)
	if g := h.figures(); g.Held != 0 {
		t.Fatalf("held gauge %d", g.Held)
	}
	if res := h.apply(admin.OpDelete, ids(m)); res.Matched != 0 {
		t.Fatalf("deleting a deleted message: %+v", res)
	}
}

func TestAdminBounceReportsFailure(t *testing.T) {
	h := newHarness(t)
	h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": temp451})
	m := h.deferredMessage("s@example.org", "a@x.test", "b@x.test") // b delivered
	res := h.apply(admin.OpBounce, ids(m))
	if res.Changed != 1 {
		t.Fatalf("bounce: %+v", res)
	}
	reps := h.reports()
	if len(reps) != 1 {
		t.Fatalf("%d reports, want 1", len(reps))
	}
	text := reportText(reps[0])
	for _, want := range []string{"Final-Recipient: rfc822; a@x.test", "Action: failed", "Status: 5.0.0", "administrator"} {
		if !strings.Contains(text, want) {
			t.Errorf("report lacks %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, "b@x.test") {
		t.Error("report names the delivered recipient")
	}
	if len(h.queued()) != 0 {
		t.Fatal("bounced message still queued")
	}
	h.assertGauges(0, 0)
}

func TestAdminFilters(t *testing.T) {
	h := newHarness(t)
	h.target.StartErr = func(int) error { return temp451 }
	m1 := h.deferredMessage("alice@a.test", "x@dest.test")
	h.clock.Advance(30 * time.Minute)
	h.waitAttempts(1) // m1 retried at 1m (clock moved past it)
	m2 := h.deferredMessage("bob@b.test", "y@other.test", "z@dest.test")
	h.apply(admin.OpHold, ids(m2))
	held, notHeld := true, false
	for _, tc := range []struct {
		name string
		f    admin.Filter
		want []*store.Message
	}{
		{"all", admin.Filter{}, []*store.Message{m1, m2}},
		{"from address, any case", admin.Filter{From: "ALICE@a.test"}, []*store.Message{m1}},
		{"from domain", admin.Filter{From: "@b.test"}, []*store.Message{m2}},
		{"to domain", admin.Filter{To: "@dest.test"}, []*store.Message{m1, m2}},
		{"to address", admin.Filter{To: "y@other.test"}, []*store.Message{m2}},
		{"to nobody", admin.Filter{To: "@nowhere.test"}, nil},
		{"older than", admin.Filter{OlderThan: 20 * time.Minute}, []*store.Message{m1}},
		{"held", admin.Filter{Held: &held}, []*store.Message{m2}},
		{"not held", admin.Filter{Held: &notHeld}, []*store.Message{m1}},
		{"ids and filter", admin.Filter{IDs: []store.ID{m1.ID, m2.ID}, From: "@a.test"}, []*store.Message{m1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			err := admin.List(h.q, "test_queue", tc.f, h.clock.Now(), func(mi admin.MessageInfo) error {
				got = append(got, mi.ID)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			for _, m := range tc.want {
				want = append(want, m.ID.String())
			}
			if strings.Join(got, ",") != strings.Join(want, ",") {
				t.Fatalf("listed %v, want %v", got, want)
			}
		})
	}
	st, err := admin.ComputeStats(h.q, "test_queue", h.clock.Now())
	if err != nil {
		t.Fatal(err)
	}
	if st.Messages != 2 || st.Held != 1 || st.Deferred != 1 || st.Recipients != 3 ||
		len(st.TopDomains) != 2 || st.TopDomains[0].Key != "dest.test" || st.TopDomains[0].Recipients != 2 ||
		len(st.TopErrors) != 1 || st.TopErrors[0].Recipients != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestAdminChangeDuringAttemptAppliedAfterIt(t *testing.T) {
	for _, tc := range []struct {
		name      string
		op        admin.Op
		rcptErr   error // the in-flight attempt's outcome
		wantQueue int
		wantHeld  bool
	}{
		{"hold, attempt fails temporarily", admin.OpHold, temp451, 1, true},
		{"hold, attempt delivers", admin.OpHold, nil, 0, false},
		{"delete, attempt fails temporarily", admin.OpDelete, temp451, 0, false},
		{"bounce, attempt fails temporarily", admin.OpBounce, temp451, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			if tc.rcptErr != nil {
				h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": tc.rcptErr})
			}
			h.target.Block()
			h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
			if err := h.target.WaitBlocked(t.Context(), 1); err != nil {
				t.Fatal(err)
			}
			m := h.queued()[0]
			type applied struct {
				res admin.Result
				err error
			}
			out := make(chan applied)
			go func() {
				res, err := h.q.Apply(t.Context(), tc.op, ids(m))
				out <- applied{res, err}
			}()
			// The request is recorded while the attempt is blocked; then
			// the attempt ends and the worker applies it.
			waitFor(t, func() bool {
				got := h.get(m.ID)
				return got.Lease != nil && got.Lease.Request != 0
			})
			h.target.Unblock()
			a := <-out
			if a.err != nil || a.res.Deferred != 1 || !strings.Contains(a.res.Items[0].Detail, "applied after the attempt") {
				t.Fatalf("result %+v, %v", a.res, a.err)
			}
			h.waitAttempts(1)
			q := h.queued()
			if len(q) != tc.wantQueue {
				t.Fatalf("%d queued, want %d", len(q), tc.wantQueue)
			}
			if tc.wantQueue == 1 {
				if q[0].Held != tc.wantHeld {
					t.Fatalf("held = %v", q[0].Held)
				}
				if got := h.get(m.ID); got.Lease != nil {
					t.Fatalf("held message still leased: %+v", got.Lease)
				}
			}
			if tc.op == admin.OpBounce && len(h.reports()) != 1 {
				t.Fatalf("%d reports after bounce", len(h.reports()))
			}
			if tc.op == admin.OpDelete && len(h.reports()) != 0 {
				t.Fatal("delete sent a report")
			}
			if want := int64(tc.wantQueue); h.figures().Messages != want {
				t.Fatalf("messages gauge %d, want %d", h.figures().Messages, want)
			}
		})
	}
}

// waitFor waits for a condition that another goroutine makes true; the
// state it watches has no channel to wait on.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestAdminChangeToMessageBeingReceived: a change aimed at a message whose
// client's transaction is not committed yet is recorded, and applied when
// the transaction commits.
func TestAdminChangeToMessageBeingReceived(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	d, err := h.q.Start(ctx, testMeta(), "s@example.org")
	if err != nil {
		t.Fatal(err)
	}
	d.AddRcpt(ctx, "a@x.test", smtp.RcptOptions{})
	if err := d.Body(ctx, textproto.Header{}, largeBuffer()); err != nil {
		t.Fatal(err)
	}
	ctxShort, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	res, err := h.q.Apply(ctxShort, admin.OpHold, admin.Filter{})
	if err != nil || res.Deferred != 1 {
		t.Fatalf("hold of a message being received: %+v, %v", res, err)
	}
	if err := d.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	m := h.queued()[0]
	if !m.Held || m.Lease != nil {
		t.Fatalf("after the commit: held %v, lease %+v", m.Held, m.Lease)
	}
	if g := h.figures(); g.Held != 1 || g.Messages != 1 {
		t.Fatalf("figures %+v", g)
	}
	if h.target.Attempts() != 0 {
		t.Fatal("a message held before its commit was attempted")
	}
}
