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

// attempt is run by the scheduler for each due message, at most
// max_parallelism at once; it calls delivered once the nested target is
// done with the message, so the next delivery can start while the outcome
// is being saved. It ends with q.finish, which hands the message back to
// the scheduler after applying any operator request made while the
// attempt ran.
func (q *Queue) attempt(id store.ID, delivered func()) {
	resched, due := q.attemptOnce(id, delivered)
	q.finish(id, resched, due)
}

// attemptOnce runs the attempt and says whether and when the message is
// due again.
func (q *Queue) attemptOnce(id store.ID, delivered func()) (reschedule bool, due time.Time) {
	m, err := q.store.Get(id)
	if err != nil {
		return q.loadErrorDecision(id, err)
	}
	if m.Held {
		return false, time.Time{} // the operators' until released
	}
	pendingBefore := len(m.Pending())
	if pendingBefore > 0 {
		err := q.deliver(m)
		if errors.Is(err, errAttemptCancelled) {
			delivered()
			q.saveCancelled(m, pendingBefore)
			return false, time.Time{}
		}
		if err != nil {
			return q.loadErrorDecision(id, err)
		}
	}
	delivered()
	reschedule, due, err = q.settle(q.stopping, m, pendingBefore)
	if err != nil {
		// Not saved by the shutdown: the attempt is repeated after restart.
		return false, time.Time{}
	}
	return reschedule, due
}

func (q *Queue) loadErrorDecision(id store.ID, err error) (reschedule bool, due time.Time) {
	switch {
	case errors.Is(err, store.ErrNotFound):
		// Deleted meanwhile (e.g. by an operator): nothing to do.
		return false, time.Time{}
	case errors.Is(err, store.ErrCorrupt):
		// Quarantined by the store; onQuarantine counted and logged it.
		return false, time.Time{}
	default:
		q.Log.Error("cannot read queued message, will retry", err, "queue_id", id.String())
		return true, q.clock.Now().Add(storeRetryDelay)
	}
}

// errAttemptCancelled is what deliver returns for an attempt the shutdown
// cancelled: the attempt does not count (see fate.Rules.Apply).
var errAttemptCancelled = errors.New("attempt cancelled by shutdown")

// deliver runs one attempt for the pending recipients of m and records the
// outcome in m (not yet on disk).
func (q *Queue) deliver(m *store.Message) error {
	content, err := q.store.Content(m)
	if err != nil {
		return err
	}
	header, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(content.Header)))
	if err != nil {
		reason := fmt.Errorf("stored header cannot be parsed: %w", err)
		q.store.Quarantine(m.ID, reason)
		return fmt.Errorf("%w: %v", store.ErrCorrupt, reason)
	}

	pending := m.Pending()
	rcpts := make([]attempt.Recipient, len(pending))
	for i, idx := range pending {
		rcpts[i] = attempt.Recipient{Addr: m.Rcpts[idx].Addr, Opts: rcptOptions(&m.Rcpts[idx])}
	}
	now := q.clock.Now()
	started := time.Now()
	errs := attempt.Run(q.attemptCtx, q.target, attempt.Message{
		Meta:   q.nestedMeta(m),
		From:   m.From,
		Rcpts:  rcpts,
		Header: header,
		Body:   content.Body,
	})
	a := fate.Attempt{Time: now, Duration: time.Since(started), Results: make([]*store.SMTPStatus, len(errs))}
	for i, err := range errs {
		if err != nil {
			st := attempt.Status(err)
			a.Results[i] = &st
		}
	}
	if q.attemptCtx.Err() != nil {
		a.Cancelled = true
		q.cfg.rules().Apply(m, a, 0)
		return errAttemptCancelled
	}
	metrics.AttemptDuration.WithLabelValues(q.label()).Observe(a.Duration.Seconds())
	q.cfg.rules().Apply(m, a, q.rand())
	for i, idx := range pending {
		st, rc := a.Results[i], &m.Rcpts[idx]
		switch {
		case st == nil:
			metrics.Attempts.WithLabelValues(q.label(), metrics.ResultDelivered).Inc()
			continue
		case st.Temporary:
			metrics.Attempts.WithLabelValues(q.label(), metrics.ResultTemporary).Inc()
		default:
			metrics.Attempts.WithLabelValues(q.label(), metrics.ResultPermanent).Inc()
		}
		q.Log.Msg("delivery attempt failed", "queue_id", m.ID.String(), "msg_id", m.MsgID, "rcpt", rc.Addr,
			"temporary", st.Temporary, "smtp_code", st.Code, "reason", st.Message, "tries", rc.Tries)
	}
	return nil
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

// saveCancelled saves the recipients a cancelled attempt delivered, so
// they are not sent again after the restart. Their reports, if owed, are
// sent by the first attempt after it, which also removes the message once
// nothing is pending.
func (q *Queue) saveCancelled(m *store.Message, pendingBefore int) {
	delivered := pendingBefore - len(m.Pending())
	if delivered == 0 {
		return
	}
	q.recipients.Add(-int64(delivered))
	if err := q.store.Update(context.Background(), m); err != nil && !errors.Is(err, store.ErrNotFound) {
		q.Log.Error("cannot save the recipients delivered by an attempt cancelled by shutdown; they are sent again after restart", err, "queue_id", m.ID.String())
	}
}

// settle sends the DSNs that m's state makes due, then removes the message
// if nothing is left to do, or saves it; it says whether and when the
// message is due again. DSNs go out before the state that records them is
// saved: a crash in between repeats a report rather than losing it.
// pendingBefore is the number of recipients pending before the change
// that led here, for the recipient gauge. A failed save is retried (see
// saveOutcome) until retry's context ends.
func (q *Queue) settle(retry context.Context, m *store.Message, pendingBefore int) (reschedule bool, due time.Time, err error) {
	now := q.clock.Now()
	reportPending := q.sendReports(m, now)
	pendingAfter := len(m.Pending())

	remove := pendingAfter == 0 && !reportPending
	if pendingAfter == 0 && !remove {
		m.NextAttempt = now.Add(reportRetryDelay)
	}
	switch err := q.saveOutcome(retry, m, remove); {
	case errors.Is(err, store.ErrNotFound):
		// Deleted meanwhile: it left the gauges then.
		return false, time.Time{}, nil
	case err != nil:
		return false, time.Time{}, err
	}
	q.recipients.Add(int64(pendingAfter - pendingBefore))
	if remove {
		q.forget(m)
		q.Log.Debugf("%v done after %d attempts", m.ID, m.Attempts)
		return false, time.Time{}, nil
	}
	return !m.Held, m.NextAttempt, nil
}

// saveOutcome writes m's new state, or removes m. A failed write is
// retried every storeRetryDelay by the caller's goroutine, which for an
// attempt keeps the message in flight and its scheduler slot taken
// meanwhile: outcomes not yet saved are bounded by the scheduler's slots
// (see schedule.SavesPerSlot), and once every slot waits for the disk no
// new attempt starts. It gives up when retry ends (shutdown, or an
// operator who stopped waiting) or the store has failed; the attempt is
// then repeated after restart.
func (q *Queue) saveOutcome(retry context.Context, m *store.Message, remove bool) error {
	for {
		var err error
		// Not retry: a write handed to the store is finished or failed as
		// a whole, and its result is what this says.
		if remove {
			err = q.store.Delete(context.Background(), m.ID)
		} else {
			err = q.store.Update(context.Background(), m)
		}
		if err == nil || errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrFailed) {
			return err // no retry can succeed on a failed store
		}
		q.Log.Error("cannot save queue state, will retry", err, "queue_id", m.ID.String())
		if !q.sleep(retry, storeRetryDelay) {
			return err
		}
	}
}

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

// forget updates the gauges for a message that has left the store (its
// pending recipients must already be subtracted).
func (q *Queue) forget(m *store.Message) {
	q.messages.Add(-1)
	if m.Held {
		q.held.Add(-1)
	}
}
