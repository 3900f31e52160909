package queue

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/buffer"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/dsn"
	"github.com/maddy-spool/spool/internal/target/queue/attempt"
	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Bits of store.Rcpt.Reported: which reports a recipient has had, so none
// is sent twice, also across restarts.
const (
	reportedFailure uint8 = 1 << iota
	reportedDelay
	reportedSuccess
)

// wantsReport applies RFC 3461's NOTIFY rules to one kind of report.
// Without NOTIFY, failures and delays are reported (the customary default
// the RFC allows); NOTIFY=NEVER silences everything; otherwise only the
// kinds listed are reported.
func wantsReport(r *store.Rcpt, kind uint8) bool {
	if len(r.Notify) == 0 {
		return kind == reportedFailure || kind == reportedDelay
	}
	var want string
	switch kind {
	case reportedFailure:
		want = "FAILURE"
	case reportedDelay:
		want = "DELAY"
	case reportedSuccess:
		want = "SUCCESS"
	}
	for _, n := range r.Notify {
		if strings.EqualFold(n, "NEVER") {
			return false
		}
		if strings.EqualFold(n, want) {
			return true
		}
	}
	return false
}

// delayReportDue returns when r's next delay report falls due: at
// delay_warning after arrival, then (with delay_warning_repeat) every
// repeat interval after that. ok is false when none will.
func (q *Queue) delayReportDue(m *store.Message, r *store.Rcpt) (due time.Time, ok bool) {
	if q.cfg.delayWarning <= 0 {
		return time.Time{}, false
	}
	first := m.Arrival.Add(q.cfg.delayWarning)
	switch {
	case r.Reported&reportedDelay == 0:
		return first, true
	case q.cfg.delayRepeat <= 0:
		return time.Time{}, false
	}
	return first.Add(time.Duration(r.DelayRepeats+1) * q.cfg.delayRepeat), true
}

// nextDelayReport returns the first delay report time after now for r,
// counting the one due now (if any) as sent: where the next attempt should
// be at the latest, so that report goes out on time.
func (q *Queue) nextDelayReport(m *store.Message, r *store.Rcpt, now time.Time) (time.Time, bool) {
	due, ok := q.delayReportDue(m, r)
	if !ok || due.After(now) {
		return due, ok
	}
	if q.cfg.delayRepeat <= 0 {
		return time.Time{}, false
	}
	first := m.Arrival.Add(q.cfg.delayWarning)
	return first.Add((now.Sub(first)/q.cfg.delayRepeat + 1) * q.cfg.delayRepeat), true
}

// markReported records that r got (or was given up on for) a report of
// kind at now. A delay report covers every repeat interval that has begun
// by now, so a server that was down for days sends one report, not one
// per missed interval.
func (q *Queue) markReported(m *store.Message, r *store.Rcpt, kind uint8, now time.Time) {
	if kind == reportedDelay && q.cfg.delayRepeat > 0 {
		if first := m.Arrival.Add(q.cfg.delayWarning); now.After(first) {
			r.DelayRepeats = int(now.Sub(first) / q.cfg.delayRepeat)
		}
	}
	r.Reported |= kind
}

// owedReports returns, per recipient index, the report kind it is owed
// now (0 for none): one report per message per event, covering every
// recipient owed one.
func (q *Queue) owedReports(m *store.Message, now time.Time) map[int]uint8 {
	owed := map[int]uint8{}
	for i := range m.Rcpts {
		r := &m.Rcpts[i]
		var kind uint8
		switch {
		case r.State == store.RcptFailed:
			kind = reportedFailure
		case r.State == store.RcptDelivered:
			kind = reportedSuccess
		case r.State == store.RcptPending && r.LastError != nil:
			if due, ok := q.delayReportDue(m, r); ok && !now.Before(due) {
				kind = reportedDelay
			}
		}
		// Failure and success are reported once; delayReportDue already
		// says whether another delay report is due.
		if kind != 0 && (r.Reported&kind == 0 || kind == reportedDelay) && wantsReport(r, kind) {
			owed[i] = kind
		}
	}
	return owed
}

// sendReports sends the DSN m is owed after an attempt and records it in
// m. It returns true when a failure report is still owed because it could
// not be handed over (the message is then kept so the report is retried).
func (q *Queue) sendReports(m *store.Message, now time.Time) bool {
	owed := q.owedReports(m, now)
	if len(owed) == 0 {
		return false
	}
	markAll := func() {
		for i, kind := range owed {
			q.markReported(m, &m.Rcpts[i], kind, now)
		}
	}
	switch {
	case m.From == "":
		// RFC 3464 section 2: never report on a report (null sender).
		metrics.DSNsNotSent.WithLabelValues(q.label(), metrics.ReasonNullSender).Inc()
		q.Log.Msg("not reporting on a message with a null sender", "queue_id", m.ID.String(), "msg_id", m.MsgID)
		markAll()
		return false
	case q.bounce == nil:
		metrics.DSNsNotSent.WithLabelValues(q.label(), metrics.ReasonNoBouncePipeline).Inc()
		markAll()
		return false
	}

	err := q.sendReport(q.attemptCtx, m, owed, now)
	if err == nil {
		markAll()
		return false
	}
	metrics.DSNsNotSent.WithLabelValues(q.label(), metrics.ReasonReportError).Inc()
	var invalid invalidReportError
	if errors.As(err, &invalid) {
		// Trying again would build the same report: give it up now.
		q.Log.Error("cannot build DSN, not sending it", err, "queue_id", m.ID.String(), "msg_id", m.MsgID)
		markAll()
		return false
	}
	q.Log.Error("cannot hand DSN to the bounce pipeline", err, "queue_id", m.ID.String(), "msg_id", m.MsgID)
	failureOwed := false
	for _, kind := range owed {
		failureOwed = failureOwed || kind == reportedFailure
	}
	if failureOwed && now.Before(q.cfg.policy.Until(m.Arrival).Add(reportGiveUp)) {
		return true
	}
	// Delay and success reports are not worth keeping a message for, and
	// failure reports are given up a day past max_age.
	markAll()
	return false
}

func (q *Queue) sendReport(ctx context.Context, m *store.Message, owed map[int]uint8, now time.Time) error {
	content, err := q.store.Content(m)
	if err != nil {
		return err
	}
	origHeader, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(content.Header)))
	if err != nil {
		return fmt.Errorf("original header: %w", err)
	}

	rep := dsn.Report{
		ReportingMTA:     q.cfg.hostname,
		ArrivalDate:      m.Arrival,
		FromDisplayName:  q.cfg.dsnDisplayName,
		FromAddress:      "MAILER-DAEMON@" + q.cfg.autogenDomain,
		To:               reportTo(m),
		Date:             now,
		SMTPUTF8:         m.MailOpts.UTF8,
		OriginalHeader:   origHeader,
		OriginalBodySize: m.BodyLen,
		OriginalBody7Bit: m.MailOpts.Body == "" || strings.EqualFold(m.MailOpts.Body, string(smtp.Body7Bit)),
		MaxFullSize:      q.cfg.returnSizeLimit,
	}
	if id := m.MailOpts.EnvelopeID; id != "" {
		if printableASCII(id) {
			rep.EnvelopeID = dsn.EncodeXtext(id)
		} else {
			q.Log.Msg("ENVID is not printable ASCII, leaving it out of the DSN", "queue_id", m.ID.String(), "msg_id", m.MsgID)
		}
	}
	if !m.DontTraceSender {
		rep.ReceivedFromMTA = m.Conn.Hostname
	}
	anyFailure := false
	for i := range m.Rcpts {
		kind, ok := owed[i]
		if !ok {
			continue
		}
		rep.Recipients = append(rep.Recipients, q.reportRecipient(m, &m.Rcpts[i], kind))
		anyFailure = anyFailure || kind == reportedFailure
	}
	if strings.EqualFold(m.MailOpts.Return, string(smtp.DSNReturnFull)) && anyFailure {
		rep.Return = dsn.ReturnFull
		body, err := content.Body.Open()
		if err != nil {
			return err
		}
		defer body.Close()
		rep.OriginalBody = body
	}
	req, err := rep.Requirements()
	if err != nil && rep.EnvelopeID != "" {
		// The ENVID is the one field taken from the client that the
		// generator can still refuse (e.g. for its length): the sender
		// is better told without it than not at all.
		q.Log.Error("ENVID unusable in a DSN, leaving it out", err, "queue_id", m.ID.String(), "msg_id", m.MsgID)
		rep.EnvelopeID = ""
		req, err = rep.Requirements()
	}
	if err != nil {
		return invalidReportError{err}
	}

	buf, hdr, err := q.renderReport(rep, m.Size())
	if err != nil {
		return err
	}
	defer buf.Remove()

	id, err := module.GenerateMsgID()
	if err != nil {
		return err
	}
	// A report on a REQUIRETLS message may quote it, so it travels under
	// the same requirement (RFC 8689 section 5).
	meta := &module.MsgMetadata{ID: id, SMTPOpts: smtp.MailOptions{UTF8: req.SMTPUTF8, RequireTLS: m.MailOpts.RequireTLS}}
	if req.EightBitMIME {
		meta.SMTPOpts.Body = smtp.Body8BitMIME
	}
	d, err := q.bounce.Start(ctx, meta, "")
	if err != nil {
		return err
	}
	err = d.AddRcpt(ctx, reportTo(m), smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyNever}})
	if err == nil {
		err = d.Body(ctx, hdr, buf)
	}
	if err == nil {
		err = d.Commit(ctx)
	}
	if err != nil {
		_ = d.Abort(ctx)
		return err
	}
	for _, r := range rep.Recipients {
		metrics.DSNs.WithLabelValues(q.label(), string(r.Action)).Inc()
	}
	q.Log.Msg("DSN sent", "queue_id", m.ID.String(), "msg_id", m.MsgID, "dsn_id", id, "recipients", len(rep.Recipients))
	return nil
}

// reportTo is where a report goes: the sender as the client gave it, before
// any rewriting by the pipeline.
func reportTo(m *store.Message) string {
	if m.OriginalFrom != "" {
		return m.OriginalFrom
	}
	return m.From
}

func (q *Queue) reportRecipient(m *store.Message, r *store.Rcpt, kind uint8) dsn.Recipient {
	out := dsn.Recipient{
		FinalRecipient:  r.Addr,
		LastAttemptDate: r.LastAttempt,
	}
	// RFC 3461 defines only these ORCPT address types; go-smtp accepts only
	// them, but the module API passes anything on.
	switch strings.ToLower(r.OrigType) {
	case "", "rfc822", "utf-8":
		out.OriginalRecipientType, out.OriginalRecipient = r.OrigType, r.Orig
	}
	switch kind {
	case reportedFailure:
		out.Action = dsn.ActionFailed
	case reportedDelay:
		out.Action = dsn.ActionDelayed
		out.WillRetryUntil = q.cfg.policy.Until(m.Arrival)
	case reportedSuccess:
		out.Action = dsn.Action(q.cfg.successAction)
		out.Status = "2.0.0"
	}
	if e := r.LastError; e != nil && kind != reportedSuccess {
		out.Status = fmt.Sprintf("%d.%d.%d", e.Enhanced[0], e.Enhanced[1], e.Enhanced[2])
		out.RemoteMTA = e.RemoteMTA
		out.DiagnosticCode = attempt.FormatStatus(*e)
	}
	return out
}

// inMemoryReportLimit is the largest original for which a report is built
// in memory; beyond it the report goes to a temporary file, so returning
// a large message never holds it in memory.
const inMemoryReportLimit = 1 << 20

func (q *Queue) renderReport(rep dsn.Report, origSize int64) (buffer.Buffer, textproto.Header, error) {
	if rep.Return != dsn.ReturnFull || origSize <= inMemoryReportLimit {
		var b bytes.Buffer
		hdr, err := dsn.Generate(rep, &b)
		if err != nil {
			return nil, textproto.Header{}, err
		}
		return buffer.MemoryBuffer{Slice: b.Bytes()}, hdr, nil
	}
	f, err := os.CreateTemp("", "spool-dsn-*")
	if err != nil {
		return nil, textproto.Header{}, err
	}
	hdr, err := dsn.Generate(rep, f)
	if err == nil {
		err = f.Close()
	} else {
		f.Close()
	}
	if err != nil {
		os.Remove(f.Name())
		return nil, textproto.Header{}, err
	}
	return buffer.FileBuffer{Path: f.Name()}, hdr, nil
}

// invalidReportError is a report the generator refuses for this message:
// building it again would fail the same way.
type invalidReportError struct{ err error }

func (e invalidReportError) Error() string { return e.err.Error() }
func (e invalidReportError) Unwrap() error { return e.err }

// printableASCII reports whether s has only printable US-ASCII, the
// characters RFC 3461 allows in an ENVID.
func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}
