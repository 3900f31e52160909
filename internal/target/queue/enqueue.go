package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/buffer"
	"github.com/foxcpp/maddy/framework/exterrors"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Start implements module.DeliveryTarget: it begins accepting one message.
func (q *Queue) Start(ctx context.Context, msgMeta *module.MsgMetadata, mailFrom string) (module.Delivery, error) {
	return &delivery{q: q, meta: msgMeta, from: mailFrom, seen: map[string]bool{}}, nil
}

// delivery is one message being accepted into the queue.
type delivery struct {
	q     *Queue
	meta  *module.MsgMetadata
	from  string
	rcpts []store.Rcpt
	seen  map[string]bool
	msg   *store.Message // set once stored
	lease *store.Lease   // the receiving lease of msg
}

var _ module.PartialDelivery = (*delivery)(nil)

func (d *delivery) AddRcpt(ctx context.Context, rcpt string, opts smtp.RcptOptions) error {
	if d.seen[rcpt] {
		// Sending twice to one address would deliver twice.
		return nil
	}
	d.seen[rcpt] = true
	r := store.Rcpt{
		Addr:     rcpt,
		OrigType: string(opts.OriginalRecipientType),
		Orig:     opts.OriginalRecipient,
		Original: d.meta.OriginalRcpts[rcpt],
	}
	for _, n := range opts.Notify {
		r.Notify = append(r.Notify, string(n))
	}
	d.rcpts = append(d.rcpts, r)
	return nil
}

// Body stores the message durably; when it returns nil the message
// survives a crash (see the store package).
func (d *delivery) Body(ctx context.Context, header textproto.Header, body buffer.Buffer) error {
	if d.msg != nil {
		return fmt.Errorf("%s: Body called twice", ModName)
	}
	if len(d.rcpts) == 0 {
		return &exterrors.SMTPError{Code: 554, EnhancedCode: exterrors.EnhancedCode{5, 5, 1},
			Message: "No recipients", TargetName: ModName}
	}
	q := d.q
	now := q.clock.Now()
	m := &store.Message{
		MsgID:        d.meta.ID,
		From:         d.from,
		OriginalFrom: d.meta.OriginalFrom,
		MailOpts:     mailOptions(d.meta.SMTPOpts),
		Conn:         connInfo(d.meta.Conn),
		Quarantine:   d.meta.Quarantine,

		DontTraceSender:    d.meta.DontTraceSender,
		TLSRequireOverride: d.meta.TLSRequireOverride,
		Arrival:            now,
		NextAttempt:        now,
		Rcpts:              d.rcpts,
	}

	if err := q.store.Failed(); err != nil {
		return d.storeErr(err)
	}
	var hdr bytes.Buffer
	if err := textproto.WriteHeader(&hdr, header); err != nil {
		return d.storeErr(err)
	}
	if err := q.checkFreeSpace(int64(hdr.Len()) + int64(body.Len())); err != nil {
		metrics.EnqueueFailures.WithLabelValues(q.label(), metrics.ReasonMinFreeSpace).Inc()
		q.Log.Msg("refusing message: disk space below min_free_space", "msg_id", d.meta.ID, "reason", err.Error())
		return err
	}
	r, err := body.Open()
	if err != nil {
		return d.storeErr(err)
	}
	defer r.Close()
	l, err := q.store.Create(ctx, m, hdr.Bytes(), r, int64(body.Len()))
	if err != nil {
		return d.storeErr(err)
	}
	d.msg, d.lease = m, l
	q.receiving.add(l, now)
	return nil
}

// storeErr turns a storage failure into a temporary SMTP error, so the
// client keeps the message and tries again later: 451 4.3.1 ("insufficient
// system storage" in RFC 3463 terms covers full disks and I/O errors), or
// 4.3.0 ("other or undefined mail system status") once the embedded store
// has stopped after a failed write, or when the database of a shared
// store cannot be reached.
func (d *delivery) storeErr(err error) error {
	metrics.EnqueueFailures.WithLabelValues(d.q.label(), metrics.ReasonStoreError).Inc()
	d.q.Log.Error("cannot queue message", err, "msg_id", d.meta.ID)
	code := exterrors.EnhancedCode{4, 3, 1}
	if errors.Is(err, store.ErrFailed) || d.q.cfg.store.kind == storePostgres {
		code = exterrors.EnhancedCode{4, 3, 0}
	}
	return &exterrors.SMTPError{
		Code:         451,
		EnhancedCode: code,
		Message:      "Unable to queue the message, try again later",
		TargetName:   ModName,
		Err:          err,
	}
}

// BodyNonAtomic implements module.PartialDelivery. Storing is all or
// nothing, so a failure applies to every recipient.
func (d *delivery) BodyNonAtomic(ctx context.Context, c module.StatusCollector, header textproto.Header, body buffer.Buffer) {
	if err := d.Body(ctx, header, body); err != nil {
		for _, r := range d.rcpts {
			c.SetStatus(r.Addr, err)
		}
	}
}

// Commit queues the stored message for its first attempt. It fails, so
// the client is not told the message was accepted, if the message was
// removed meanwhile because the transaction took too long (see
// receiving.go), or the store cannot record the commit.
func (d *delivery) Commit(ctx context.Context) error {
	if d.msg == nil {
		return nil
	}
	q := d.q
	m, l := d.msg, d.lease
	d.msg, d.lease = nil, nil
	if !q.receiving.take(m.ID) {
		q.Log.Msg("commit after the queue entry was removed as never committed; refusing", "queue_id", m.ID.String(), "msg_id", m.MsgID)
		return &exterrors.SMTPError{
			Code:         451,
			EnhancedCode: exterrors.EnhancedCode{4, 3, 0},
			Message:      "The message was not committed in time, try again",
			TargetName:   ModName,
		}
	}
	req, err := q.store.Commit(ctx, l)
	if err != nil {
		// The client is told the message failed and sends it again, so
		// the stored copy is removed: handed back to the expiry of
		// uncommitted messages, which retries the (fenced) removal until
		// it succeeds. If the commit did go through and only its reply
		// was lost, the removal changes nothing and the message is
		// delivered: at least once.
		q.receiving.removeLater(l)
		return d.storeErr(fmt.Errorf("commit: %w", err))
	}
	metrics.Enqueued.WithLabelValues(q.label()).Inc()
	q.Log.Debugf("queued %v (msg_id %s) for %d recipients", m.ID, m.MsgID, len(m.Rcpts))
	if req != 0 {
		// An operator acted on the message while it was being received.
		q.applyRequest(context.Background(), l, m, req)
	}
	return nil
}

// Abort removes a message stored by Body but not committed (another target
// of the pipeline failed): the client was told the message was refused.
func (d *delivery) Abort(ctx context.Context) error {
	if d.msg == nil {
		return nil
	}
	l := d.lease
	d.msg, d.lease = nil, nil
	if !d.q.receiving.take(l.ID) {
		return nil // removed already
	}
	return d.q.removeUncommitted(ctx, l)
}

func mailOptions(o smtp.MailOptions) store.MailOptions {
	return store.MailOptions{
		Body:       string(o.Body),
		Size:       o.Size,
		RequireTLS: o.RequireTLS,
		UTF8:       o.UTF8,
		Return:     string(o.Return),
		EnvelopeID: o.EnvelopeID,
		Auth:       o.Auth,
	}
}

// smtpMailOptions rebuilds the MAIL FROM parameters stored with a message.
func smtpMailOptions(o store.MailOptions) smtp.MailOptions {
	return smtp.MailOptions{
		Body:       smtp.BodyType(o.Body),
		Size:       o.Size,
		RequireTLS: o.RequireTLS,
		UTF8:       o.UTF8,
		Return:     smtp.DSNReturn(o.Return),
		EnvelopeID: o.EnvelopeID,
		Auth:       o.Auth,
	}
}

func connInfo(c *module.ConnState) store.ConnInfo {
	if c == nil {
		return store.ConnInfo{}
	}
	ci := store.ConnInfo{Proto: c.Proto, Hostname: c.Hostname, AuthUser: c.AuthUser}
	if c.RemoteAddr != nil {
		ci.RemoteAddr = c.RemoteAddr.String()
	}
	return ci
}

// rcptOptions rebuilds the RCPT TO parameters stored with a recipient.
func rcptOptions(r *store.Rcpt) smtp.RcptOptions {
	o := smtp.RcptOptions{OriginalRecipientType: smtp.DSNAddressType(r.OrigType), OriginalRecipient: r.Orig}
	for _, n := range r.Notify {
		o.Notify = append(o.Notify, smtp.DSNNotify(n))
	}
	return o
}
