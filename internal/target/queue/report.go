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
	"github.com/maddy-spool/spool/internal/target/queue/fate"
	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// sendReports sends the DSN m is owed after an attempt and records it in
// m. It returns true when a failure report is still owed because it could
// not be handed over (the message is then kept so the report is retried).
func (q *Queue) sendReports(m *store.Message, now time.Time) bool {
	rules := q.cfg.rules()
	owed := rules.Owed(m, now)
	if len(owed) == 0 {
		return false
	}
	markAll := func() {
		for i, kind := range owed {
			rules.MarkReported(m, i, kind, now)
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
		failureOwed = failureOwed || kind == fate.Failure
	}
	if failureOwed && now.Before(q.cfg.policy.Until(m.Arrival).Add(reportGiveUp)) {
		return true
	}
	// Delay and success reports are not worth keeping a message for, and
	// failure reports are given up a day past max_age.
	markAll()
	return false
}

func (q *Queue) sendReport(ctx context.Context, m *store.Message, owed map[int]fate.Kind, now time.Time) error {
	content, err := q.store.Content(ctx, m)
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
		anyFailure = anyFailure || kind == fate.Failure
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

func (q *Queue) reportRecipient(m *store.Message, r *store.Rcpt, kind fate.Kind) dsn.Recipient {
	out := dsn.Recipient{
		FinalRecipient:  r.Addr,
		LastAttemptDate: r.LastAttempt,
	}
	if r.Via != "" {
		// Sent through the fallback target, not the usual way.
		out.Via = r.Via
	}
	// RFC 3461 defines only these ORCPT address types; go-smtp accepts only
	// them, but the module API passes anything on.
	switch strings.ToLower(r.OrigType) {
	case "", "rfc822", "utf-8":
		out.OriginalRecipientType, out.OriginalRecipient = r.OrigType, r.Orig
	}
	switch kind {
	case fate.Failure:
		out.Action = dsn.ActionFailed
	case fate.Delay:
		out.Action = dsn.ActionDelayed
		out.WillRetryUntil = q.cfg.policy.Until(m.Arrival)
	case fate.Success:
		out.Action = dsn.Action(q.cfg.successAction)
		out.Status = "2.0.0"
	}
	if e := r.LastError; e != nil && kind != fate.Success {
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
