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

	"github.com/maddy-spool/spool/internal/target/queue/admin"
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
	// parts are the stored entries of the message, one per destination,
	// each with its receiving lease; set by Body.
	parts []part
}

// part is one stored entry of a message being accepted.
type part struct {
	msg   *store.Message
	lease *store.Lease
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
// survives a crash (see the store package). A queue whose destinations are
// recipient domains stores one entry per domain, each with its own
// recipients, retries and lease, so a slow or dead domain holds up none of
// the others; the nested target (target.remote) would send one
// transaction per domain anyway.
func (d *delivery) Body(ctx context.Context, header textproto.Header, body buffer.Buffer) error {
	if d.parts != nil {
		return fmt.Errorf("%s: Body called twice", ModName)
	}
	if len(d.rcpts) == 0 {
		return &exterrors.SMTPError{Code: 554, EnhancedCode: exterrors.EnhancedCode{5, 5, 1},
			Message: "No recipients", TargetName: ModName}
	}
	q := d.q
	if err := q.store.Failed(); err != nil {
		return d.storeErr(err)
	}
	var hdr bytes.Buffer
	if err := textproto.WriteHeader(&hdr, header); err != nil {
		return d.storeErr(err)
	}
	groups := q.byDestination(d.rcpts)
	if err := q.checkFreeSpace(int64(len(groups)) * (int64(hdr.Len()) + int64(body.Len()))); err != nil {
		metrics.EnqueueFailures.WithLabelValues(q.label(), metrics.ReasonMinFreeSpace).Inc()
		q.Log.Msg("refusing message: disk space below min_free_space", "msg_id", d.meta.ID, "reason", err.Error())
		return err
	}
	now := q.clock.Now()
	for _, g := range groups {
		m := &store.Message{
			MsgID:        d.meta.ID,
			HeaderMsgID:  header.Get("Message-Id"),
			From:         d.from,
			OriginalFrom: d.meta.OriginalFrom,
			MailOpts:     mailOptions(d.meta.SMTPOpts),
			Conn:         connInfo(d.meta.Conn),
			Quarantine:   d.meta.Quarantine,

			DontTraceSender:    d.meta.DontTraceSender,
			TLSRequireOverride: d.meta.TLSRequireOverride,
			Arrival:            now,
			NextAttempt:        now,
			Rcpts:              g.rcpts,
			Destination:        g.dest,
		}
		l, err := d.store(ctx, m, hdr.Bytes(), body)
		if err != nil {
			for _, p := range d.parts {
				if q.receiving.take(p.lease.ID) {
					q.removeUncommitted(ctx, p.lease)
				}
			}
			d.parts = nil
			return d.storeErr(err)
		}
		d.parts = append(d.parts, part{m, l})
		q.receiving.add(l, now)
	}
	return nil
}

// store stores one entry of the message.
func (d *delivery) store(ctx context.Context, m *store.Message, header []byte, body buffer.Buffer) (*store.Lease, error) {
	r, err := body.Open()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return d.q.store.Create(ctx, m, header, r, int64(body.Len()))
}

// wholeTarget is how operators see the one destination of a queue with
// destination single, stored as "": in stats, metrics and logs. No
// domain is named "*".
const wholeTarget = "*"

// destinationName is the name operators see for dest.
func destinationName(dest string) string {
	if dest == "" {
		return wholeTarget
	}
	return dest
}

// destinationGroup is the recipients of one destination.
type destinationGroup struct {
	dest  string
	rcpts []store.Rcpt
}

// byDestination groups rcpts by destination, in the order each first
// appears.
func (q *Queue) byDestination(rcpts []store.Rcpt) []destinationGroup {
	if q.cfg.destinations == destinationSingle {
		return []destinationGroup{{"", rcpts}}
	}
	var groups []destinationGroup
	at := map[string]int{}
	for _, r := range rcpts {
		dest := admin.Domain(r.Addr)
		i, ok := at[dest]
		if !ok {
			i = len(groups)
			at[dest] = i
			groups = append(groups, destinationGroup{dest: dest})
		}
		groups[i].rcpts = append(groups[i].rcpts, r)
	}
	return groups
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
// receiving.go), or the store cannot record the commit. (A message stored
// as several entries whose commit fails after some of them committed is
// delivered to those entries' recipients, and may come again from its
// client: at least once.)
func (d *delivery) Commit(ctx context.Context) error {
	if d.parts == nil {
		return nil
	}
	q := d.q
	parts := d.parts
	d.parts = nil
	missing := false
	var taken []part
	for _, p := range parts {
		if q.receiving.take(p.lease.ID) {
			taken = append(taken, p)
		} else {
			missing = true
		}
	}
	if missing {
		for _, p := range taken {
			q.removeUncommitted(ctx, p.lease)
		}
		q.Log.Msg("commit after the queue entry was removed as never committed; refusing", "msg_id", d.meta.ID)
		return &exterrors.SMTPError{
			Code:         451,
			EnhancedCode: exterrors.EnhancedCode{4, 3, 0},
			Message:      "The message was not committed in time, try again",
			TargetName:   ModName,
		}
	}
	for i, p := range parts {
		req, err := q.store.Commit(ctx, p.lease)
		if err != nil {
			// The client is told the message failed and sends it again,
			// so this entry and those not committed yet are removed: this
			// one handed back to the expiry of uncommitted messages, which
			// retries the (fenced) removal until it succeeds. If its
			// commit did go through and only the reply was lost, the
			// removal changes nothing and it is delivered; entries
			// committed before it are delivered too: at least once.
			q.receiving.removeLater(p.lease)
			for _, rest := range parts[i+1:] {
				q.removeUncommitted(ctx, rest.lease)
			}
			return d.storeErr(fmt.Errorf("commit: %w", err))
		}
		q.Log.Debugf("queued %v (msg_id %s) for %d recipients of %q", p.msg.ID, p.msg.MsgID, len(p.msg.Rcpts), p.msg.Destination)
		if req != 0 {
			// An operator acted on the entry while it was being received.
			q.applyRequest(context.Background(), p.lease, p.msg, req)
		}
	}
	metrics.Enqueued.WithLabelValues(q.label()).Inc()
	return nil
}

// Abort removes a message stored by Body but not committed (another target
// of the pipeline failed): the client was told the message was refused.
func (d *delivery) Abort(ctx context.Context) error {
	var first error
	for _, p := range d.parts {
		if d.q.receiving.take(p.lease.ID) {
			if err := d.q.removeUncommitted(ctx, p.lease); err != nil && first == nil {
				first = err
			}
		}
	}
	d.parts = nil
	return first
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
