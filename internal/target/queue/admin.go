package queue

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/target/queue/fate"
	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Operator changes never race with deliveries. A message is at any moment
// owned by exactly one party: the scheduler (waiting in its heap), a
// worker (in flight), the operators (held), or the client session that is
// still submitting it (stored by Body, not yet scheduled by Commit). A
// change to a waiting message takes it out of the heap first
// (schedule.Remove), which makes the operation its owner; a change to a
// message in flight is recorded with the scheduler, and the worker applies
// it when its attempt ends, before giving the message back (see finish). A
// stored message that is neither scheduled, in flight nor held belongs to
// its submitting session (or was not loaded at start-up) and is left
// alone. Changes are serialised by opMu, so two operators never act on one
// message at once.

// Requests recorded for a message in flight. The latest one wins.
const (
	requestHold schedule.Request = iota + 1
	requestRelease
	requestDelete
	requestBounce
)

var requestOps = map[schedule.Request]admin.Op{
	requestHold:    admin.OpHold,
	requestRelease: admin.OpRelease,
	requestDelete:  admin.OpDelete,
	requestBounce:  admin.OpBounce,
}

func requestFor(op admin.Op) schedule.Request {
	for r, o := range requestOps {
		if o == op {
			return r
		}
	}
	return 0 // retry: an attempt is running already
}

// bounceStatus is what recipients failed by an operator's bounce report.
// RFC 3463 has no code for "cancelled by the administrator"; 5.0.0 ("other
// or undefined status") with a plain text says it without claiming a
// cause the mail system did not see.
func bounceStatus(prev *store.SMTPStatus) *store.SMTPStatus {
	text := "Delivery cancelled by the mail system administrator"
	if prev != nil && prev.Message != "" {
		text += "; last error: " + prev.Message
	}
	return &store.SMTPStatus{Code: 550, Enhanced: [3]int{5, 0, 0}, Message: text}
}

// finish hands a message back to the scheduler after an attempt,
// applying first any operator request made while the attempt ran.
func (q *Queue) finish(id store.ID, reschedule bool, due time.Time) {
	for {
		req := q.sched.Finish(id, reschedule, due)
		if req == 0 {
			break
		}
		op := requestOps[req]
		var o admin.Outcome
		var detail string
		o, detail, reschedule, due = q.applyOp(q.attemptCtx, id, op, reschedule, due)
		q.Log.Msg("operator request applied after attempt", "queue_id", id.String(), "op", string(op), "outcome", string(o), "detail", detail)
	}
	q.wakeWaiters(id)
}

// Apply implements admin.Queue: it runs op on the messages f selects.
// Messages in flight get the operation when their attempt ends; Apply
// waits for that until ctx is done.
func (q *Queue) Apply(ctx context.Context, op admin.Op, f admin.Filter) (admin.Result, error) {
	res := admin.Result{Instance: q.label(), Op: op}
	if _, err := admin.ParseOp(string(op)); err != nil {
		return res, err
	}
	select {
	case <-q.loadDone:
	case <-ctx.Done():
		return res, errors.New("the queue is still loading its schedule; try again shortly")
	}
	ids, err := admin.Select(q, f, q.clock.Now())
	if err != nil {
		return res, err
	}
	type waiting struct {
		id store.ID
		ch chan struct{}
	}
	var deferred []waiting
	for _, id := range ids {
		o, detail, ch := q.applyOne(ctx, id, op)
		if o == admin.Deferred {
			deferred = append(deferred, waiting{id, ch})
			continue
		}
		res.Add(id, o, detail, f.Explicit())
	}
	for _, w := range deferred {
		detail := "being attempted; " + string(op) + " is applied when the attempt ends"
		select {
		case <-w.ch:
			detail = "applied after the attempt in flight: " + q.describe(w.id)
		case <-ctx.Done():
		}
		res.Add(w.id, admin.Deferred, detail, f.Explicit())
	}
	if n := res.Changed + res.Deferred; n > 0 {
		metrics.AdminOperations.WithLabelValues(q.label(), string(op)).Add(float64(n))
	}
	return res, nil
}

// describe says where a message stands now, for operator feedback.
func (q *Queue) describe(id store.ID) string {
	m, err := q.store.Get(id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return "no longer queued (delivered, bounced or deleted)"
	case err != nil:
		return "state unknown: " + err.Error()
	case m.Held:
		return fmt.Sprintf("held, %d pending recipient(s)", len(m.Pending()))
	default:
		return fmt.Sprintf("queued, %d pending recipient(s), next attempt %s", len(m.Pending()), m.NextAttempt.UTC().Format(time.RFC3339))
	}
}

// applyOne runs op on one message: now if it is waiting or held, or by a
// request to the worker if it is in flight (then the returned channel is
// closed when the worker has applied it).
func (q *Queue) applyOne(ctx context.Context, id store.ID, op admin.Op) (admin.Outcome, string, chan struct{}) {
	q.opMu.Lock()
	defer q.opMu.Unlock()
	req := requestFor(op)
	// Registered before Remove, so the worker cannot finish unseen in
	// between.
	ch, created := q.addWaiter(id)
	st, due := q.sched.Remove(id, req)
	if st == schedule.InFlight {
		if req == 0 {
			q.dropWaiter(id, ch, created)
			return admin.Unchanged, "being attempted now", nil
		}
		return admin.Deferred, "", ch
	}
	q.dropWaiter(id, ch, created)
	if st == schedule.Unknown {
		// Only held messages are the operators' when unscheduled.
		if m, err := q.store.Get(id); err == nil && !m.Held {
			return admin.Receiving, "not committed to the queue yet (still being received); try again", nil
		}
	}
	o, detail, resched, next := q.applyOp(ctx, id, op, st == schedule.Scheduled, due)
	if resched {
		q.sched.Add(id, next)
	}
	return o, detail, nil
}

// applyOp changes a message its caller owns. keep and keepDue say whether
// and when the message would be due if op changed nothing; the results
// say it after op.
func (q *Queue) applyOp(ctx context.Context, id store.ID, op admin.Op, keep bool, keepDue time.Time) (o admin.Outcome, detail string, reschedule bool, due time.Time) {
	m, err := q.store.Get(id)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrCorrupt) {
			return admin.NotFound, "not queued", false, time.Time{}
		}
		return admin.Failed, err.Error(), keep, keepDue
	}
	now := q.clock.Now()
	save := func() error { return q.store.Update(ctx, m) }
	switch op {
	case admin.OpHold:
		if m.Held {
			return admin.Unchanged, "already held", false, time.Time{}
		}
		m.Held = true
		if err := save(); err != nil {
			return admin.Failed, err.Error(), keep, keepDue
		}
		q.held.Add(1)
		return admin.Changed, "held", false, time.Time{}

	case admin.OpRelease:
		if !m.Held {
			return admin.Unchanged, "not held", keep, keepDue
		}
		m.Held, m.NextAttempt = false, now
		if err := save(); err != nil {
			return admin.Failed, err.Error(), false, time.Time{}
		}
		q.held.Add(-1)
		return admin.Changed, "released, due now", true, now

	case admin.OpRetry:
		if m.Held {
			return admin.Unchanged, "held: release it to retry", false, time.Time{}
		}
		if len(m.Pending()) == 0 {
			return admin.Unchanged, "no recipient pending", keep, keepDue
		}
		m.NextAttempt = now
		if err := save(); err != nil {
			return admin.Failed, err.Error(), keep, keepDue
		}
		return admin.Changed, "due now", true, now

	case admin.OpDelete:
		if err := q.store.Delete(ctx, id); err != nil && !errors.Is(err, store.ErrNotFound) {
			return admin.Failed, err.Error(), keep, keepDue
		}
		q.recipients.Add(-int64(len(m.Pending())))
		q.forget(m)
		return admin.Changed, "deleted", false, time.Time{}

	case admin.OpBounce:
		wasHeld := m.Held
		n := fate.Bounce(m, bounceStatus)
		if n == 0 {
			return admin.Unchanged, "no recipient pending", keep, keepDue
		}
		if wasHeld {
			q.held.Add(-1)
		}
		reschedule, due, err = q.settle(ctx, m, n)
		if err != nil {
			return admin.Failed, fmt.Sprintf("reports sent, but the failed state could not be saved (%v); they may be sent again", err), keep, keepDue
		}
		return admin.Changed, fmt.Sprintf("%d recipients failed, reports sent as requested", n), reschedule, due
	}
	return admin.Failed, "unknown operation " + string(op), keep, keepDue
}

// Waiters: operators waiting for a request to be applied by a worker.

func (q *Queue) addWaiter(id store.ID) (ch chan struct{}, created bool) {
	q.opStateMu.Lock()
	defer q.opStateMu.Unlock()
	ch = q.waiters[id]
	if ch == nil {
		ch = make(chan struct{})
		q.waiters[id] = ch
		created = true
	}
	return ch, created
}

// dropWaiter removes a channel this operation created and did not need. A
// channel an earlier operation is still waiting on stays for the worker to
// close.
func (q *Queue) dropWaiter(id store.ID, ch chan struct{}, created bool) {
	q.opStateMu.Lock()
	defer q.opStateMu.Unlock()
	if created && q.waiters[id] == ch {
		delete(q.waiters, id)
	}
}

func (q *Queue) wakeWaiters(id store.ID) {
	q.opStateMu.Lock()
	defer q.opStateMu.Unlock()
	if ch := q.waiters[id]; ch != nil {
		close(ch)
		delete(q.waiters, id)
	}
}

// The read side of admin.Queue.

// Walk implements admin.Reader.
func (q *Queue) Walk(fn func(*store.Message) error) error { return q.store.Walk(fn) }

// Get implements admin.Reader; it returns the state of the latest attempt
// even when that could not be saved yet.
func (q *Queue) Get(id store.ID) (*store.Message, error) {
	m, err := q.store.Get(id)
	return m, err
}

// Content implements admin.Reader.
func (q *Queue) Content(m *store.Message) (store.Content, error) { return q.store.Content(m) }

// InFlight implements admin.Queue.
func (q *Queue) InFlight(id store.ID) bool {
	st, _ := q.sched.State(id)
	return st == schedule.InFlight
}

// Now implements admin.Queue.
func (q *Queue) Now() time.Time { return q.clock.Now() }

// logAdmin writes one log line per operator change: who, what, which.
func (q *Queue) logAdmin(instance string, op admin.Op, peer admin.Peer, f admin.Filter, res admin.Result) {
	ids := make([]string, 0, len(f.IDs))
	for i, id := range f.IDs {
		if i == 20 {
			ids = append(ids, fmt.Sprintf("... (%d in all)", len(f.IDs)))
			break
		}
		ids = append(ids, id.String())
	}
	q.Log.Msg("operator command", "op", string(op), "peer", peer.String(), "ids", strings.Join(ids, " "),
		"from", f.From, "to", f.To, "older_than", f.OlderThan.String(),
		"matched", res.Matched, "changed", res.Changed, "deferred", res.Deferred, "failed", res.Failed)
}

var _ admin.Queue = (*Queue)(nil)

// ParseDuration reads a duration as the configuration does: Go's units
// with an optional leading day count ("3d", "1d12h").
func ParseDuration(s string) (time.Duration, error) { return parseDuration(s) }
