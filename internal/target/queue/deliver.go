package queue

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/target/queue/attempt"
	"github.com/maddy-spool/spool/internal/target/queue/fate"
	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// storeRetryDelay is how soon a message is tried again after its state
// could not be read or written (an I/O error rather than a delivery
// failure).
const storeRetryDelay = time.Minute

// reportRetryDelay is how soon a DSN that the bounce pipeline refused is
// tried again; reportGiveUp bounds how long past max_age that goes on.
const (
	reportRetryDelay = 5 * time.Minute
	reportGiveUp     = 24 * time.Hour
)

// attempt runs one claimed message, at most max_parallelism at once, as
// its destination's state decided (schedule.Destinations); it calls
// delivered once the nested target is done with the message, so the next
// delivery can start while the outcome is being saved. The message's
// lease is renewed while the attempt runs; when the attempt ends, the new
// state is saved under that lease, after any operator request recorded
// meanwhile is applied (see store.Backend.Save).
func (q *Queue) attempt(c store.Claim, dec schedule.Decision, delivered func()) {
	m := c.Message
	now := q.clock.Now()
	useFallback := q.fallback != nil && dec != schedule.Probe && q.pastFallback(m, now)
	switch {
	case dec == schedule.Release:
		delivered()
		req, err := q.store.Release(context.Background(), c.Lease)
		q.afterWrite(c.Lease, m, req, err, "a message whose destination had no room")
		return
	case dec == schedule.Postpone && !useFallback:
		delivered()
		q.cfg.rules().Postpone(m, q.dests.Reason(m.Destination), now, q.rand())
		q.logOutcomes(m, nil, "postponed: destination suspended")
		q.settle(q.stopping, c.Lease, m)
		q.releaseIfBack(m.Destination, true)
		return
	}

	ctx, cancel := context.WithCancel(q.attemptCtx)
	defer cancel()
	q.flights.add(c.Lease, cancel)
	defer q.flights.remove(c.Lease.ID)

	pendingBefore := len(m.Pending())
	var a fate.Attempt
	var err error
	if pendingBefore > 0 {
		a, err = q.deliver(ctx, m, useFallback)
	}
	outcome, reason := schedule.Neutral, (*store.SMTPStatus)(nil)
	if err == nil && !useFallback {
		outcome, reason = destinationOutcome(a)
	}
	switch q.dests.Done(m.Destination, dec, outcome, reason) {
	case schedule.Suspended:
		q.Log.Msg("destination suspended as dead: its mail waits for a probe to succeed", "destination", destinationName(m.Destination),
			"failures", q.cfg.deadAfter, "reason", reason.String())
	case schedule.Recovered:
		q.destinationBack(m.Destination)
	}
	suspended := q.dests.IsSuspended(m.Destination)
	delivered()
	switch {
	case errors.Is(err, errAttemptCancelled):
		q.endCancelled(c.Lease, m, pendingBefore)
	case err != nil:
		q.endUnattempted(c.Lease, m, err)
	default:
		q.settle(q.stopping, c.Lease, m)
	}
	q.releaseIfBack(m.Destination, suspended)
}

// releaseIfBack makes dest's waiting messages due if dest was suspended
// when the caller's message got its new retry time and no longer is now
// that the message is saved: the suspension ended (a probe worked, or an
// operator lifted it) while the message was leased, so the release the
// recovery made could not reach it, and its save put back a retry time
// chosen for a dead destination.
func (q *Queue) releaseIfBack(dest string, wasSuspended bool) {
	if wasSuspended && !q.dests.IsSuspended(dest) {
		q.destinationBack(dest)
	}
}

// pastFallback reports whether m's pending recipients go through the
// fallback target: past fallback_after, counted in tries (postponements
// of a suspended destination count as tries here, so its mail reaches the
// fallback too) or in age since arrival.
func (q *Queue) pastFallback(m *store.Message, now time.Time) bool {
	if q.cfg.fallbackAge > 0 {
		return now.Sub(m.Arrival) >= q.cfg.fallbackAge
	}
	tries := 0
	for _, idx := range m.Pending() {
		tries = max(tries, m.Rcpts[idx].Tries)
	}
	return tries+m.Postponed >= q.cfg.fallbackTries
}

// destinationOutcome says what an attempt tells of its destination (see
// schedule.Outcome): it answered if it delivered or refused a recipient
// for good; it failed if every recipient failed temporarily and at least
// one for a reason of the destination rather than of the recipient's
// mailbox or address (RFC 3463 classes x.1 and x.2), such as a refused
// connection or a deferred transaction.
func destinationOutcome(a fate.Attempt) (schedule.Outcome, *store.SMTPStatus) {
	if a.Cancelled || len(a.Results) == 0 {
		return schedule.Neutral, nil
	}
	var reason *store.SMTPStatus
	for _, st := range a.Results {
		switch {
		case st == nil || !st.Temporary:
			return schedule.Answered, nil
		case st.Enhanced[1] != 1 && st.Enhanced[1] != 2 && reason == nil:
			reason = st
		}
	}
	if reason == nil {
		return schedule.Neutral, nil
	}
	return schedule.Failed, reason
}

// destinationBack releases every message waiting for dest, which has just
// answered again after a suspension: they are due now, whatever their own
// retry times were.
func (q *Queue) destinationBack(dest string) {
	n, err := q.store.MakeDue(context.Background(), dest)
	if err != nil {
		q.Log.Error("destination answers again, but its waiting messages could not be made due; they follow their own retry times", err, "destination", destinationName(dest))
		return
	}
	q.Log.Msg("destination answers again; releasing the messages waiting for it", "destination", destinationName(dest), "messages", n)
}

// endCancelled saves the recipients an attempt cancelled by shutdown (or
// by the loss of its lease) delivered, so they are not sent again; the
// rest of the message is as it was. Reports owed to those recipients are
// sent by the next attempt, which also removes the message once nothing
// is pending.
func (q *Queue) endCancelled(l *store.Lease, m *store.Message, pendingBefore int) {
	var req store.Request
	var err error
	if len(m.Pending()) < pendingBefore {
		req, err = q.store.Save(context.Background(), l, m)
	} else {
		req, err = q.store.Release(context.Background(), l)
	}
	q.afterWrite(l, m, req, err, "a cancelled attempt (shutdown, or its lease lost)")
}

// endUnattempted ends an attempt that could not read the message. A
// damaged message has been quarantined (and its lease ended with it); one
// that could not be read for another reason (an I/O error, a database
// that cannot be reached) is tried again a little later, without counting
// a try.
func (q *Queue) endUnattempted(l *store.Lease, m *store.Message, err error) {
	if errors.Is(err, store.ErrCorrupt) || errors.Is(err, store.ErrNotFound) {
		return
	}
	q.Log.Error("cannot read queued message, will retry", err, "queue_id", m.ID.String())
	m.NextAttempt = q.clock.Now().Add(storeRetryDelay)
	req, err := q.store.Save(context.Background(), l, m)
	q.afterWrite(l, m, req, err, "a message that could not be read")
}

// afterWrite handles the result of a write that ends a lease: an operator
// request recorded meanwhile is applied, a lost lease means another node
// took the message over (its outcome stands, this one is dropped).
func (q *Queue) afterWrite(l *store.Lease, m *store.Message, req store.Request, err error, what string) {
	switch {
	case errors.Is(err, store.ErrLeaseLost):
		q.Log.Msg("lease lost; another node took the message over, dropping this node's outcome", "queue_id", m.ID.String(), "of", what)
	case err != nil:
		// The lease expires and the message is attempted again: at
		// least once.
		metrics.StoreErrors.WithLabelValues(q.label(), metrics.StoreSave).Inc()
		q.Log.Error("cannot save queue state", err, "queue_id", m.ID.String(), "of", what)
	case req != 0:
		q.applyRequest(context.Background(), l, m, req)
	}
}

// errAttemptCancelled is what deliver returns for an attempt cancelled by
// the shutdown or by the loss of its lease: the attempt does not count
// (see fate.Rules.Apply).
var errAttemptCancelled = errors.New("attempt cancelled (shutdown, or its lease lost)")

// deliver runs one attempt for the pending recipients of m and records the
// outcome in m (not yet on disk).
func (q *Queue) deliver(ctx context.Context, m *store.Message, useFallback bool) (fate.Attempt, error) {
	content, err := q.store.Content(ctx, m)
	if err != nil {
		return fate.Attempt{}, err
	}
	header, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(content.Header)))
	if err != nil {
		reason := fmt.Errorf("stored header cannot be parsed: %w", err)
		q.store.Quarantine(ctx, m.ID, reason)
		return fate.Attempt{}, fmt.Errorf("%w: %v", store.ErrCorrupt, reason)
	}

	pending := m.Pending()
	rcpts := make([]attempt.Recipient, len(pending))
	for i, idx := range pending {
		rcpts[i] = attempt.Recipient{Addr: m.Rcpts[idx].Addr, Opts: rcptOptions(&m.Rcpts[idx])}
	}
	target, via := q.target, ""
	if useFallback {
		target, via = q.fallback, fallbackName(q.fallback)
	}
	now := q.clock.Now()
	started := time.Now()
	errs := attempt.Run(ctx, target, attempt.Message{
		Meta:   q.nestedMeta(m),
		From:   m.From,
		Rcpts:  rcpts,
		Header: header,
		Body:   content.Body,
	})
	a := fate.Attempt{Time: now, Duration: time.Since(started), Results: make([]*store.SMTPStatus, len(errs))}
	if via != "" {
		a.Via = make([]string, len(errs))
	}
	for i, err := range errs {
		if err != nil {
			st := attempt.Status(err)
			a.Results[i] = &st
		}
		if via != "" {
			a.Via[i] = via
		}
	}
	if ctx.Err() != nil {
		a.Cancelled = true
		q.cfg.rules().Apply(m, a, 0)
		return a, errAttemptCancelled
	}
	metrics.AttemptDuration.WithLabelValues(q.label()).Observe(a.Duration.Seconds())
	q.cfg.rules().Apply(m, a, q.rand())
	for _, st := range a.Results {
		switch {
		case st == nil:
			metrics.Attempts.WithLabelValues(q.label(), metrics.ResultDelivered).Inc()
		case st.Temporary:
			metrics.Attempts.WithLabelValues(q.label(), metrics.ResultTemporary).Inc()
		default:
			metrics.Attempts.WithLabelValues(q.label(), metrics.ResultPermanent).Inc()
		}
	}
	q.logOutcomes(m, pending, "")
	return a, nil
}

// fallbackName names the fallback target in records and reports.
func fallbackName(t module.DeliveryTarget) string {
	if m, ok := t.(module.Module); ok && m.InstanceName() != "" {
		return "fallback " + m.InstanceName()
	}
	return "fallback"
}

// logOutcomes writes one line per recipient of m whose state an attempt
// (the recipients at idxs) or a postponement (idxs nil: every recipient
// still pending or just failed) decided: the record of what happened to
// each recipient, with the queue ID, the Message-ID header field, the
// destination, the tries, the arrival and the status.
func (q *Queue) logOutcomes(m *store.Message, idxs []int, note string) {
	if idxs == nil {
		for i := range m.Rcpts {
			if m.Rcpts[i].State != store.RcptDelivered {
				idxs = append(idxs, i)
			}
		}
	}
	for _, idx := range idxs {
		rc := &m.Rcpts[idx]
		status := "deferred"
		switch rc.State {
		case store.RcptDelivered:
			status = "delivered"
		case store.RcptFailed:
			status = "failed"
		}
		args := []interface{}{"queue_id", m.ID.String(), "message_id", m.HeaderMsgID, "msg_id", m.MsgID,
			"rcpt", rc.Addr, "destination", destinationName(m.Destination), "tries", rc.Tries, "queued", m.Arrival.UTC().Format(time.RFC3339),
			"status", status}
		if e := rc.LastError; e != nil && rc.State != store.RcptDelivered {
			args = append(args, "smtp_code", e.Code, "smtp_enchcode", fmt.Sprintf("%d.%d.%d", e.Enhanced[0], e.Enhanced[1], e.Enhanced[2]), "reason", e.Message)
		}
		if rc.Via != "" {
			args = append(args, "via", rc.Via)
		}
		if note != "" {
			args = append(args, "note", note)
		}
		q.Log.Msg("recipient outcome", args...)
	}
}

// nestedMeta rebuilds maddy's message metadata for the nested target. The
// connection state is not kept (it holds live objects), as in maddy's own
// queue: nested targets see a message without a client connection.
func (q *Queue) nestedMeta(m *store.Message) *module.MsgMetadata {
	meta := &module.MsgMetadata{
		ID:                 m.MsgID,
		OriginalFrom:       m.OriginalFrom,
		DontTraceSender:    m.DontTraceSender,
		Quarantine:         m.Quarantine,
		SMTPOpts:           smtpMailOptions(m.MailOpts),
		TLSRequireOverride: m.TLSRequireOverride,
	}
	for _, r := range m.Rcpts {
		if r.Original != "" {
			if meta.OriginalRcpts == nil {
				meta.OriginalRcpts = map[string]string{}
			}
			meta.OriginalRcpts[r.Addr] = r.Original
		}
	}
	return meta
}

// settle sends the DSNs that m's state makes due, then removes the message
// if nothing is left to do, or saves it, under the lease l; an operator
// request recorded meanwhile is then applied. DSNs go out before the state
// that records them is saved: a crash in between repeats a report rather
// than losing it. A failed write is retried (see saveOutcome) until
// retry's context ends.
func (q *Queue) settle(retry context.Context, l *store.Lease, m *store.Message) error {
	now := q.clock.Now()
	reportPending := q.sendReports(m, now)
	remove := len(m.Pending()) == 0 && !reportPending
	if len(m.Pending()) == 0 && !remove {
		m.NextAttempt = now.Add(reportRetryDelay)
	}
	req, err := q.saveOutcome(retry, l, m, remove)
	switch {
	case errors.Is(err, store.ErrLeaseLost):
		q.Log.Msg("lease lost; another node took the message over, dropping this node's outcome", "queue_id", m.ID.String())
		return err
	case err != nil:
		return err
	case remove:
		q.Log.Debugf("%v done after %d attempts", m.ID, m.Attempts)
	case req != 0:
		q.applyRequest(retry, l, m, req)
	}
	return nil
}

// saveOutcome writes m's new state under l, or removes m. A failed write
// is retried by the caller's goroutine, after a second, then twice as long
// each time up to storeRetryDelay (so a database back after an outage gets
// the outcome within a second or two, and a full disk is not hammered);
// for an attempt this keeps the message's lease and its dispatcher slot
// meanwhile: outcomes not yet saved are bounded by the dispatcher's slots
// (see schedule.SavesPerSlot), and once every slot waits for the store no
// new attempt starts. It gives up when retry ends (shutdown, or an
// operator who stopped waiting), when the store has failed, or the lease
// is lost; the attempt is then repeated (after restart, or by the node
// that took the message over).
func (q *Queue) saveOutcome(retry context.Context, l *store.Lease, m *store.Message, remove bool) (store.Request, error) {
	wait := firstSaveRetry
	for {
		// Not retry: a write handed to the store is finished or failed as
		// a whole, and its result is what this says.
		var req store.Request
		var err error
		if remove {
			err = q.store.Delete(context.Background(), l)
		} else {
			req, err = q.store.Save(context.Background(), l, m)
		}
		if err == nil || errors.Is(err, store.ErrLeaseLost) || errors.Is(err, store.ErrFailed) {
			return req, err // no retry can succeed
		}
		if errors.Is(err, store.ErrNotFound) {
			return 0, store.ErrLeaseLost
		}
		metrics.StoreErrors.WithLabelValues(q.label(), metrics.StoreSave).Inc()
		q.Log.Error("cannot save queue state, will retry", err, "queue_id", m.ID.String(), "in", wait.String())
		if !q.sleep(retry, wait) {
			return 0, err
		}
		wait = min(2*wait, storeRetryDelay)
	}
}

// firstSaveRetry is how soon a failed save is retried the first time.
const firstSaveRetry = time.Second

// sleep waits for d on the queue's clock; false if ctx ended first.
func (q *Queue) sleep(ctx context.Context, d time.Duration) bool {
	t := q.clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
		return true
	case <-ctx.Done():
		return false
	}
}
