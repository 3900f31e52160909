// Package fate holds the per-recipient rules of target.spool as pure
// functions over a message's stored state: what an attempt's results do
// to each recipient (Apply, the one function that decides a recipient's
// fate), when retrying ends (max_tries, max_age), when the next attempt
// is, and which delivery status notifications each recipient is owed
// (Owed, MarkReported).
//
// Nothing here does I/O or reads a clock: every function takes the time,
// and Apply takes the random number that jitters the retry delay. Every
// store backend and every node applies the same rules to the same state.
package fate

import (
	"strings"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Rules are the retry and report settings of a queue.
type Rules struct {
	Policy schedule.Policy
	// DelayWarning is when, after arrival, a recipient still pending after
	// a temporary failure is owed a delay report; 0 disables delay
	// reports.
	DelayWarning time.Duration
	// DelayRepeat, if positive, repeats the delay report at this interval
	// after the first one while the recipient is pending.
	DelayRepeat time.Duration
}

// Attempt is the result of one delivery attempt of a message's pending
// recipients.
type Attempt struct {
	// Time is when the attempt started; Duration how long it took.
	Time     time.Time
	Duration time.Duration
	// Results holds one entry per recipient attempted, in the order of
	// Message.Pending() when the attempt started: nil means the target
	// accepted the recipient, otherwise the status it failed with.
	Results []*store.SMTPStatus
	// Via names, per result, the target that took the recipient when it
	// was not the usual one (the fallback target); nil or "" for the
	// usual target.
	Via []string
	// Cancelled is set when the attempt was cancelled by a shutdown
	// rather than answered: see Apply.
	Cancelled bool
}

func (a Attempt) via(i int) string {
	if i < len(a.Via) {
		return a.Via[i]
	}
	return ""
}

// Apply records attempt a of m's pending recipients in m and decides
// each recipient's fate:
//   - accepted: delivered, never sent again;
//   - a permanent error: failed;
//   - a temporary error: pending, retried at the next attempt, which the
//     retry policy sets (and moves earlier to a delay report's mark, so the
//     report goes out on time); once the most-tried pending recipient has
//     had Policy.MaxTries tries or the message is Policy.MaxAge old, every
//     temporarily failing recipient is failed instead, keeping its last
//     (4xx) status for the report.
//
// A cancelled attempt (a.Cancelled) is not a try: its errors are the
// cancellation's, not answers about the mail, so only recipients the
// target accepted before it are recorded (delivered); the others keep
// their state, and nothing else of m changes.
//
// rnd is a uniform random number in [0, 1) for the retry jitter.
func (r Rules) Apply(m *store.Message, a Attempt, rnd float64) {
	pending := m.Pending()
	if a.Cancelled {
		for i, idx := range pending {
			if a.Results[i] == nil {
				rc := &m.Rcpts[idx]
				rc.State, rc.LastError, rc.LastAttempt, rc.Via = store.RcptDelivered, nil, a.Time, a.via(i)
				rc.Tries++
				rc.AddHistory(store.RcptAttempt{Time: a.Time, Via: a.via(i)})
			}
		}
		return
	}

	rec := store.AttemptRecord{Time: a.Time, Duration: a.Duration}
	maxTries := 0
	for i, idx := range pending {
		rc := &m.Rcpts[idx]
		rc.Tries++
		rc.LastAttempt = a.Time
		rc.Via = a.via(i)
		maxTries = max(maxTries, rc.Tries)
		st := a.Results[i]
		rc.AddHistory(store.RcptAttempt{Time: a.Time, Status: st, Via: rc.Via})
		switch {
		case st == nil:
			rc.State, rc.LastError = store.RcptDelivered, nil
			rec.Delivered++
			continue
		case st.Temporary:
			rec.Temporary++
		default:
			rc.State = store.RcptFailed
			rec.Permanent++
		}
		c := *st
		rc.LastError = &c
		if rec.Error == "" {
			rec.Error = c.String()
		}
	}
	if m.FirstAttempt.IsZero() {
		m.FirstAttempt = a.Time
	}
	m.LastAttempt = a.Time
	m.Attempts++
	m.AddHistory(rec)

	if rec.Temporary == 0 {
		return
	}
	retry := r.Policy.AfterFailure(maxTries, m.Arrival, a.Time, rnd)
	if retry.GiveUp {
		for _, idx := range m.Pending() {
			m.Rcpts[idx].State = store.RcptFailed
		}
		return
	}
	m.NextAttempt = r.delayMarkBefore(m, a.Time, retry.At)
}

// Postpone records that m's destination is suspended as dead: no attempt
// is made and no try counted. Pending recipients that have no error yet
// get reason (the destination's last failure), so reports and operators
// say why they wait. Once the message is Policy.MaxAge old, retrying ends
// as after an attempt: the pending recipients fail with their last error.
// Otherwise the next attempt is spaced as tries would be (by tries and
// postponements together), moved earlier to a delay report's mark, and
// never past the deadline, so delay reports and the deadline keep their
// times while the destination is suspended. rnd jitters the delay.
func (r Rules) Postpone(m *store.Message, reason *store.SMTPStatus, now time.Time, rnd float64) {
	pending := m.Pending()
	if len(pending) == 0 {
		return
	}
	tries := 0
	for _, idx := range pending {
		rc := &m.Rcpts[idx]
		if rc.LastError == nil && reason != nil {
			c := *reason
			rc.LastError = &c
		}
		tries = max(tries, rc.Tries)
	}
	deadline := r.Policy.Until(m.Arrival)
	if !now.Before(deadline) {
		for _, idx := range pending {
			m.Rcpts[idx].State = store.RcptFailed
		}
		return
	}
	m.Postponed++
	next := now.Add(r.Policy.Delay(tries+m.Postponed, rnd))
	if next.After(deadline) {
		next = deadline
	}
	m.NextAttempt = r.delayMarkBefore(m, now, next)
}

// Bounce fails every pending recipient of m with the status st gives it
// (from its last error), as an operator's bounce does, and releases a
// held message. It returns how many recipients it failed.
func Bounce(m *store.Message, st func(last *store.SMTPStatus) *store.SMTPStatus) int {
	pending := m.Pending()
	if len(pending) == 0 {
		return 0
	}
	for _, i := range pending {
		rc := &m.Rcpts[i]
		rc.State, rc.LastError = store.RcptFailed, st(rc.LastError)
	}
	m.Held = false
	return len(pending)
}

// delayMarkBefore returns next, or the next delay report mark after now
// if one falls before it: reports are sent after attempts, and a report
// hours late is little use.
func (r Rules) delayMarkBefore(m *store.Message, now, next time.Time) time.Time {
	at := next
	for _, idx := range m.Pending() {
		rc := &m.Rcpts[idx]
		if !WantsReport(rc, Delay) {
			continue
		}
		if mark, ok := r.nextDelayMark(m, rc, now); ok && mark.Before(at) {
			at = mark
		}
	}
	return at
}

// Kind is a kind of delivery status notification. The values are bits
// of store.Rcpt.Reported: which reports a recipient has had, so none is
// sent twice, also across restarts.
type Kind uint8

const (
	Failure Kind = 1 << iota
	Delay
	Success
)

// WantsReport applies RFC 3461's NOTIFY rules to one kind of report.
// Without NOTIFY, failures and delays are reported (the customary default
// the RFC allows); NOTIFY=NEVER silences everything; otherwise only the
// kinds listed are reported.
func WantsReport(rc *store.Rcpt, kind Kind) bool {
	if len(rc.Notify) == 0 {
		return kind == Failure || kind == Delay
	}
	var want string
	switch kind {
	case Failure:
		want = "FAILURE"
	case Delay:
		want = "DELAY"
	case Success:
		want = "SUCCESS"
	}
	for _, n := range rc.Notify {
		if strings.EqualFold(n, "NEVER") {
			return false
		}
		if strings.EqualFold(n, want) {
			return true
		}
	}
	return false
}

// delayReportDue returns when rc's next delay report falls due: at
// DelayWarning after arrival, then (with DelayRepeat) every repeat
// interval after that. ok is false when none will.
func (r Rules) delayReportDue(m *store.Message, rc *store.Rcpt) (due time.Time, ok bool) {
	if r.DelayWarning <= 0 {
		return time.Time{}, false
	}
	first := m.Arrival.Add(r.DelayWarning)
	switch {
	case rc.Reported&uint8(Delay) == 0:
		return first, true
	case r.DelayRepeat <= 0:
		return time.Time{}, false
	}
	return first.Add(time.Duration(rc.DelayRepeats+1) * r.DelayRepeat), true
}

// nextDelayMark returns the first delay report time after now for rc,
// counting the one due now (if any) as sent: where the next attempt should
// be at the latest, so that report goes out on time.
func (r Rules) nextDelayMark(m *store.Message, rc *store.Rcpt, now time.Time) (time.Time, bool) {
	due, ok := r.delayReportDue(m, rc)
	if !ok || due.After(now) {
		return due, ok
	}
	if r.DelayRepeat <= 0 {
		return time.Time{}, false
	}
	first := m.Arrival.Add(r.DelayWarning)
	return first.Add((now.Sub(first)/r.DelayRepeat + 1) * r.DelayRepeat), true
}

// Owed returns, per recipient index, the report kind it is owed now (0 for
// none): one report per message per event, covering every recipient owed
// one.
func (r Rules) Owed(m *store.Message, now time.Time) map[int]Kind {
	owed := map[int]Kind{}
	for i := range m.Rcpts {
		rc := &m.Rcpts[i]
		var kind Kind
		switch {
		case rc.State == store.RcptFailed:
			kind = Failure
		case rc.State == store.RcptDelivered:
			kind = Success
		case rc.State == store.RcptPending && rc.LastError != nil:
			if due, ok := r.delayReportDue(m, rc); ok && !now.Before(due) {
				kind = Delay
			}
		}
		// Failure and success are reported once; delayReportDue already
		// says whether another delay report is due.
		if kind != 0 && (rc.Reported&uint8(kind) == 0 || kind == Delay) && WantsReport(rc, kind) {
			owed[i] = kind
		}
	}
	return owed
}

// MarkReported records that recipient i of m got (or was given up on
// for) a report of kind at now. A delay report covers every repeat
// interval that has begun by now, so a server that was down for days
// sends one report, not one per missed interval.
func (r Rules) MarkReported(m *store.Message, i int, kind Kind, now time.Time) {
	rc := &m.Rcpts[i]
	if kind == Delay && r.DelayRepeat > 0 {
		if first := m.Arrival.Add(r.DelayWarning); now.After(first) {
			rc.DelayRepeats = int(now.Sub(first) / r.DelayRepeat)
		}
	}
	rc.Reported |= uint8(kind)
}

// RetryUntil is when retrying of m ends (the reports' Will-Retry-Until).
func (r Rules) RetryUntil(m *store.Message) time.Time { return r.Policy.Until(m.Arrival) }
