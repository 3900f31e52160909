package queue

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/target/queue/attempt"
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
	m, wasDirty, err := q.load(id)
	if err != nil {
		return q.loadErrorDecision(id, err)
	}
	pendingBefore := len(m.Pending())
	if m.Held || (wasDirty && pendingBefore > 0 && m.NextAttempt.After(q.clock.Now())) {
		// Only a save is overdue (or the message is held and must not be
		// attempted at all).
		if wasDirty {
			if err := q.store.Update(q.attemptCtx, m); err != nil {
				return q.keepDirty(m, err, q.clock.Now())
			}
			q.dropDirty(id)
		}
		return !m.Held, m.NextAttempt
	}
	if pendingBefore > 0 {
		if err := q.deliver(m); err != nil {
			return q.loadErrorDecision(id, err)
		}
	}
	delivered()
	return q.settle(m, pendingBefore)
}

// load returns the message's current state: the unsaved copy of a
// previous attempt if there is one, else the stored metadata. The caller
// may change the returned message freely.
func (q *Queue) load(id store.ID) (m *store.Message, dirty bool, err error) {
	q.dirtyMu.Lock()
	if d := q.dirty[id]; d != nil {
		m = cloneMessage(d)
	}
	q.dirtyMu.Unlock()
	if m != nil {
		return m, true, nil
	}
	m, err = q.store.Get(id)
	return m, false, err
}

// cloneMessage copies the parts of m that attempts and operators change,
// so the unsaved copy in q.dirty stays as it was if a change is not saved.
func cloneMessage(m *store.Message) *store.Message {
	c := *m
	c.Rcpts = append([]store.Rcpt(nil), m.Rcpts...)
	c.History = append([]store.AttemptRecord(nil), m.History...)
	return &c
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
	took := time.Since(started)
	metrics.AttemptDuration.WithLabelValues(q.label()).Observe(took.Seconds())

	rec := store.AttemptRecord{Time: now, Duration: took}
	maxTries := 0
	for i, idx := range pending {
		r := &m.Rcpts[idx]
		r.Tries++
		r.LastAttempt = now
		if r.Tries > maxTries {
			maxTries = r.Tries
		}
		if errs[i] == nil {
			r.State, r.LastError = store.RcptDelivered, nil
			rec.Delivered++
			metrics.Attempts.WithLabelValues(q.label(), metrics.ResultDelivered).Inc()
			continue
		}
		st := attempt.Status(errs[i])
		r.LastError = &st
		if rec.Error == "" {
			rec.Error = attempt.FormatStatus(st)
		}
		if st.Temporary {
			rec.Temporary++
			metrics.Attempts.WithLabelValues(q.label(), metrics.ResultTemporary).Inc()
		} else {
			r.State = store.RcptFailed
			rec.Permanent++
			metrics.Attempts.WithLabelValues(q.label(), metrics.ResultPermanent).Inc()
		}
		q.Log.Msg("delivery attempt failed", "queue_id", m.ID.String(), "msg_id", m.MsgID, "rcpt", r.Addr,
			"temporary", st.Temporary, "smtp_code", st.Code, "reason", st.Message, "tries", r.Tries)
	}
	if m.FirstAttempt.IsZero() {
		m.FirstAttempt = now
	}
	m.LastAttempt = now
	m.Attempts++
	m.AddHistory(rec)

	if rec.Temporary > 0 {
		retry := q.cfg.policy.AfterFailure(maxTries, m.Arrival, now, q.rand())
		if retry.GiveUp {
			// Out of tries or time: what is still temporary becomes
			// permanent, keeping the last (4xx) error for the DSN.
			for _, idx := range m.Pending() {
				m.Rcpts[idx].State = store.RcptFailed
			}
		} else {
			m.NextAttempt = q.delayWarningAttempt(m, now, retry.At)
		}
	}
	return nil
}

// delayWarningAttempt moves the next attempt earlier to the next delay
// report mark (delay_warning, then every delay_warning_repeat) when one
// would fall due before it: reports are sent after attempts, and a report
// hours late is little use.
func (q *Queue) delayWarningAttempt(m *store.Message, now, next time.Time) time.Time {
	at := next
	for _, idx := range m.Pending() {
		r := &m.Rcpts[idx]
		if !wantsReport(r, reportedDelay) {
			continue
		}
		if mark, ok := q.nextDelayReport(m, r, now); ok && mark.Before(at) {
			at = mark
		}
	}
	return at
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
// if nothing is left to do, or saves it; it says whether and when the
// message is due again. DSNs go out before the state that records them is
// saved: a crash in between repeats a report rather than losing it.
// pendingBefore is the number of recipients pending before the change
// that led here, for the recipient gauge.
func (q *Queue) settle(m *store.Message, pendingBefore int) (reschedule bool, due time.Time) {
	now := q.clock.Now()
	reportPending := q.sendReports(m, now)
	pendingAfter := len(m.Pending())
	q.recipients.Add(int64(pendingAfter - pendingBefore))

	if pendingAfter == 0 && !reportPending {
		if err := q.store.Delete(q.attemptCtx, m.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
			return q.keepDirty(m, err, now)
		}
		q.forget(m)
		q.Log.Debugf("%v done after %d attempts", m.ID, m.Attempts)
		return false, time.Time{}
	}
	if pendingAfter == 0 {
		m.NextAttempt = now.Add(reportRetryDelay)
	}
	if err := q.store.Update(q.attemptCtx, m); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			q.recipients.Add(-int64(pendingAfter))
			q.forget(m)
			return false, time.Time{}
		}
		return q.keepDirty(m, err, now)
	}
	q.dropDirty(m.ID)
	return !m.Held, m.NextAttempt
}

// forget updates the gauges and in-memory state for a message that has
// left the store (its pending recipients must already be subtracted).
func (q *Queue) forget(m *store.Message) {
	q.dropDirty(m.ID)
	q.messages.Add(-1)
	if m.Held {
		q.held.Add(-1)
	}
}

// keepDirty remembers an outcome that could not be saved and retries the
// save soon. Until it is saved, the in-memory copy is the truth:
// recipients recorded as delivered in it are not sent again while the
// server runs.
func (q *Queue) keepDirty(m *store.Message, err error, now time.Time) (reschedule bool, due time.Time) {
	q.Log.Error("cannot save queue state, will retry", err, "queue_id", m.ID.String())
	q.dirtyMu.Lock()
	q.dirty[m.ID] = m
	q.dirtyMu.Unlock()
	return true, now.Add(storeRetryDelay)
}

func (q *Queue) dropDirty(id store.ID) {
	q.dirtyMu.Lock()
	delete(q.dirty, id)
	q.dirtyMu.Unlock()
}
