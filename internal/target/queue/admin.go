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
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Operator changes never race with deliveries, on this node or any other:
// a change is made under the message's lease (see the store package). A
// message nobody holds is claimed for the change (ClaimID), changed and
// saved. For a message another party holds (an attempt in flight, on any
// node, or the session still receiving it), the change is recorded with
// the store as a request; the holder applies it when it saves the
// message, before giving the message up (applyRequest), and the operator
// waits for that for a while. The latest request wins.

// requestOps maps the requests recorded for held messages to operations.
var requestOps = map[store.Request]admin.Op{
	store.RequestHold:    admin.OpHold,
	store.RequestRelease: admin.OpRelease,
	store.RequestDelete:  admin.OpDelete,
	store.RequestBounce:  admin.OpBounce,
}

func requestFor(op admin.Op) store.Request {
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

// requestPoll is how often an operator waiting for a request checks
// whether its holder has applied it.
const requestPoll = 20 * time.Millisecond

// Apply implements admin.Queue: it runs op on the messages f selects.
// Messages another party holds get the operation when the holder saves
// them; Apply waits for that until ctx is done.
func (q *Queue) Apply(ctx context.Context, op admin.Op, f admin.Filter) (admin.Result, error) {
	res := admin.Result{Instance: q.label(), Op: op}
	if _, err := admin.ParseOp(string(op)); err != nil {
		return res, err
	}
	ids, err := admin.Select(q, f, q.clock.Now())
	if err != nil {
		return res, err
	}
	type waiting struct {
		id    store.ID
		token uint64
	}
	var deferred []waiting
	for _, id := range ids {
		o, detail, token := q.applyOne(ctx, id, op)
		if o == admin.Deferred {
			deferred = append(deferred, waiting{id, token})
			continue
		}
		res.Add(id, o, detail, f.Explicit())
	}
	for _, w := range deferred {
		detail := "being attempted; " + string(op) + " is applied when the attempt ends"
		if q.waitApplied(ctx, w.id, w.token) {
			detail = "applied after the attempt in flight: " + q.describe(w.id)
		}
		res.Add(w.id, admin.Deferred, detail, f.Explicit())
	}
	if n := res.Changed + res.Deferred; n > 0 {
		metrics.AdminOperations.WithLabelValues(q.label(), string(op)).Add(float64(n))
	}
	return res, nil
}

// applyOne runs op on one message: under a lease of its own, or by a
// request to the party holding it (Deferred, with the token of the lease
// the request waits for).
func (q *Queue) applyOne(ctx context.Context, id store.ID, op admin.Op) (admin.Outcome, string, uint64) {
	// The holder may end its lease between ClaimID and Request; each
	// round sees one of them succeed unless the message keeps changing
	// hands.
	for range 3 {
		c, err := q.store.ClaimID(ctx, id)
		switch {
		case err == nil:
			o, detail := q.applyClaimed(ctx, c.Lease, c.Message, op)
			return o, detail, 0
		case errors.Is(err, store.ErrNotFound):
			return admin.NotFound, "not queued", 0
		case !errors.Is(err, store.ErrLeased):
			return admin.Failed, err.Error(), 0
		}
		req := requestFor(op)
		if req == 0 {
			return admin.Unchanged, "being attempted now", 0
		}
		switch err := q.store.Request(ctx, id, req); {
		case err == nil:
			var token uint64
			if m, err := q.store.Get(ctx, id); err == nil && m.Lease != nil {
				token = m.Lease.Token
			}
			return admin.Deferred, "", token
		case errors.Is(err, store.ErrNotFound):
			return admin.NotFound, "not queued", 0
		case !errors.Is(err, store.ErrNotLeased):
			return admin.Failed, err.Error(), 0
		}
	}
	return admin.Failed, "the message kept changing hands; try again", 0
}

// waitApplied waits until the holder of the lease with token, which a
// request was recorded for, has ended it: the request is then applied (or
// the message is gone). A holder keeps its lease while it applies the
// request it took (see store.Backend.Save), so the request's field being
// cleared is not enough. False if ctx ended first.
func (q *Queue) waitApplied(ctx context.Context, id store.ID, token uint64) bool {
	t := time.NewTicker(requestPoll)
	defer t.Stop()
	for {
		m, err := q.store.Get(ctx, id)
		if err != nil || m.Lease == nil || m.Lease.Token != token {
			return true
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return false
		}
	}
}

// describe says where a message stands now, for operator feedback.
func (q *Queue) describe(id store.ID) string {
	m, err := q.store.Get(context.Background(), id)
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

// applyRequest applies a request the store returned to the holder of l
// (an attempt, or a session that committed), and logs it.
func (q *Queue) applyRequest(ctx context.Context, l *store.Lease, m *store.Message, req store.Request) {
	op := requestOps[req]
	o, detail := q.applyClaimed(ctx, l, m, op)
	q.Log.Msg("operator request applied", "queue_id", m.ID.String(), "op", string(op), "outcome", string(o), "detail", detail)
}

// applyClaimed changes m, held under l, as op asks, and ends the lease.
// A request recorded meanwhile is applied next.
func (q *Queue) applyClaimed(ctx context.Context, l *store.Lease, m *store.Message, op admin.Op) (admin.Outcome, string) {
	now := q.clock.Now()
	o, detail := admin.Changed, ""
	switch op {
	case admin.OpHold:
		if m.Held {
			o, detail = admin.Unchanged, "already held"
			break
		}
		m.Held, detail = true, "held"
	case admin.OpRelease:
		if !m.Held {
			o, detail = admin.Unchanged, "not held"
			break
		}
		m.Held, m.NextAttempt, detail = false, now, "released, due now"
		q.liftSuspension(m.Destination)
	case admin.OpRetry:
		switch {
		case m.Held:
			o, detail = admin.Unchanged, "held: release it to retry"
		case len(m.Pending()) == 0:
			o, detail = admin.Unchanged, "no recipient pending"
		default:
			m.NextAttempt, detail = now, "due now"
			q.liftSuspension(m.Destination)
		}
	case admin.OpDelete:
		if err := q.store.Delete(ctx, l); err != nil {
			return admin.Failed, err.Error()
		}
		return admin.Changed, "deleted"
	case admin.OpBounce:
		n := fate.Bounce(m, bounceStatus)
		if n == 0 {
			o, detail = admin.Unchanged, "no recipient pending"
			break
		}
		if err := q.settle(ctx, l, m); err != nil {
			return admin.Failed, fmt.Sprintf("reports sent, but the failed state could not be saved (%v); they may be sent again", err)
		}
		return admin.Changed, fmt.Sprintf("%d recipients failed, reports sent as requested", n)
	default:
		o, detail = admin.Failed, "unknown operation "+string(op)
	}
	var req store.Request
	var err error
	if o == admin.Changed {
		req, err = q.store.Save(ctx, l, m)
	} else {
		req, err = q.store.Release(ctx, l)
	}
	if err != nil {
		return admin.Failed, err.Error()
	}
	if req != 0 {
		q.applyRequest(ctx, l, m, req)
	}
	return o, detail
}

// The read side of admin.Queue.

// Walk implements admin.Reader.
func (q *Queue) Walk(fn func(*store.Message) error) error {
	return q.store.Walk(context.Background(), fn)
}

// Get implements admin.Reader.
func (q *Queue) Get(id store.ID) (*store.Message, error) {
	return q.store.Get(context.Background(), id)
}

// Content implements admin.Reader.
func (q *Queue) Content(m *store.Message) (store.Content, error) {
	return q.store.Content(context.Background(), m)
}

// Now implements admin.Queue.
func (q *Queue) Now() time.Time { return q.clock.Now() }

// Suspended implements admin.Queue.
func (q *Queue) Suspended() []admin.Suspended {
	var out []admin.Suspended
	for _, s := range q.dests.Suspended() {
		a := admin.Suspended{Destination: destinationName(s.Destination), Since: s.Since, NextProbe: s.NextProbe}
		if s.Reason != nil {
			a.Reason = s.Reason.String()
		}
		out = append(out, a)
	}
	return out
}

// liftSuspension ends the suspension of the destination of a message an
// operator retries or releases: the operator asks for the message to go
// now, so it goes out at once instead of waiting for the next probe.
// If it is delivered, the destination's other waiting messages follow
// (see destinationBack); if it fails, the destination is suspended again
// after dead_destination_after failures.
func (q *Queue) liftSuspension(dest string) {
	if q.dests.Lift(dest) {
		q.Log.Msg("operator lifted the suspension of a destination", "destination", destinationName(dest))
	}
}

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
