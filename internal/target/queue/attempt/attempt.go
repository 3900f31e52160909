// Package attempt runs one delivery attempt of a queued message against the
// nested target and reports the outcome per recipient.
//
// How a failure is attributed:
//   - Start fails: every recipient gets that error.
//   - AddRcpt fails: that recipient gets the error; the others go on.
//   - Body fails (atomic delivery): every accepted recipient gets the error.
//   - BodyNonAtomic (the target implements module.PartialDelivery): each
//     recipient gets what the target passed to StatusCollector.SetStatus.
//   - Commit fails: every accepted recipient without an error gets it.
//
// Whether an error is temporary is decided by exterrors.IsTemporaryOrUnspec,
// so errors that do not say are treated as temporary and retried.
package attempt

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"unicode"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/buffer"
	"github.com/foxcpp/maddy/framework/exterrors"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Recipient is one recipient to attempt, with its RCPT TO parameters.
type Recipient struct {
	Addr string
	Opts smtp.RcptOptions
}

// Message is what one attempt sends.
type Message struct {
	Meta   *module.MsgMetadata
	From   string
	Rcpts  []Recipient
	Header textproto.Header
	Body   buffer.Buffer
}

// Run attempts delivery of msg to target and returns one error per
// recipient, in the order of msg.Rcpts; nil means the target accepted the
// recipient and the message was committed.
func Run(ctx context.Context, target module.DeliveryTarget, msg Message) []error {
	errs := make([]error, len(msg.Rcpts))
	setAll := func(err error, only func(i int) bool) {
		for i := range errs {
			if only == nil || only(i) {
				errs[i] = err
			}
		}
	}

	d, err := target.Start(ctx, msg.Meta, msg.From)
	if err != nil {
		setAll(err, nil)
		return errs
	}

	accepted := make([]bool, len(msg.Rcpts))
	byAddr := make(map[string]int, len(msg.Rcpts))
	any := false
	for i, r := range msg.Rcpts {
		if err := d.AddRcpt(ctx, r.Addr, r.Opts); err != nil {
			errs[i] = err
			continue
		}
		accepted[i], any = true, true
		byAddr[r.Addr] = i
	}
	isAccepted := func(i int) bool { return accepted[i] }
	if !any {
		abort(ctx, d)
		return errs
	}

	if pd, ok := d.(module.PartialDelivery); ok {
		pd.BodyNonAtomic(ctx, collector{byAddr: byAddr, errs: errs}, msg.Header.Copy(), msg.Body)
	} else if err := d.Body(ctx, msg.Header.Copy(), msg.Body); err != nil {
		setAll(err, isAccepted)
		abort(ctx, d)
		return errs
	}

	anyOK := false
	for i := range errs {
		if accepted[i] && errs[i] == nil {
			anyOK = true
		}
	}
	if !anyOK {
		abort(ctx, d)
		return errs
	}
	if err := d.Commit(ctx); err != nil {
		setAll(err, func(i int) bool { return accepted[i] && errs[i] == nil })
	}
	return errs
}

func abort(ctx context.Context, d module.Delivery) {
	// An Abort failure changes nothing for the queue: the message stays
	// queued and the recipients already carry their errors.
	_ = d.Abort(ctx)
}

// collector receives per-recipient results of BodyNonAtomic.
type collector struct {
	byAddr map[string]int
	errs   []error
}

func (c collector) SetStatus(rcpt string, err error) {
	if i, ok := c.byAddr[rcpt]; ok && err != nil {
		c.errs[i] = err
	}
}

// maxErrorText bounds the error text kept per recipient: remote servers can
// send arbitrarily long replies, and the text ends up in metadata, DSNs and
// admin output.
const maxErrorText = 1000

// Status converts an attempt error into what the queue stores and reports.
// Errors without an SMTP code get 451 4.0.0 (temporary) or 554 5.0.0. The
// message says what happened: maddy's generic text ("Network I/O error")
// is followed by the error under it when that is not the remote server's
// reply (see causeOf). It is at most maxErrorText bytes.
func Status(err error) store.SMTPStatus {
	st := store.SMTPStatus{Temporary: exterrors.IsTemporaryOrUnspec(err)}
	var se *exterrors.SMTPError
	var ce *smtp.SMTPError
	switch {
	case errors.As(err, &se):
		st.Code = se.Code
		st.Enhanced = [3]int(se.EnhancedCode)
		st.Message = withCause(se.Message, causeOf(se))
		if host, ok := se.Misc["remote_server"].(string); ok {
			st.RemoteMTA = host
		}
	case errors.As(err, &ce):
		st.Code = ce.Code
		st.Enhanced = [3]int(ce.EnhancedCode)
		st.Message = ce.Message
	default:
		st.Message = err.Error()
	}
	if st.Code/100 != 4 && st.Code/100 != 5 {
		st.Code = 554
		if st.Temporary {
			st.Code = 451
		}
	}
	// A code must agree with the classification the queue acts on.
	if st.Temporary != (st.Code/100 == 4) {
		if st.Temporary {
			st.Code = 451
		} else {
			st.Code = 554
		}
	}
	if st.Enhanced[0] != st.Code/100 || st.Enhanced[1] < 0 || st.Enhanced[2] < 0 {
		st.Enhanced = [3]int{st.Code / 100, 0, 0}
	}
	st.Message = CleanText(st.Message, maxErrorText)
	st.RemoteMTA = CleanText(st.RemoteMTA, 255)
	return st
}

// causeOf returns the text of what made maddy return se, when maddy keeps
// it apart from the generic Message: its Reason, else its wrapped error
// (for a refused connection, Message is "Network I/O error" and Err says
// "dial tcp 192.0.2.1:25: connect: connection refused"). A wrapped reply
// of the remote server gives nothing: that reply is the Message already.
func causeOf(se *exterrors.SMTPError) string {
	if se.Reason != "" {
		return se.Reason
	}
	var reply *smtp.SMTPError
	if se.Err == nil || errors.As(se.Err, &reply) {
		return ""
	}
	return se.Err.Error()
}

// withCause appends cause to msg when it adds something.
func withCause(msg, cause string) string {
	cause = strings.TrimSpace(cause)
	switch {
	case cause == "" || strings.Contains(strings.ToLower(msg), strings.ToLower(cause)):
		return msg
	case strings.TrimSpace(msg) == "":
		return cause
	}
	return msg + ": " + cause
}

// CleanText makes remote-controlled text safe to store and show: control
// characters (CR and LF among them) become spaces, runs of spaces collapse,
// and the result is cut to at most max bytes on a rune boundary.
func CleanText(s string, max int) string {
	var b strings.Builder
	space := false
	for _, r := range s {
		if r == utf8RuneError || unicode.IsControl(r) || unicode.IsSpace(r) {
			if !space && b.Len() > 0 {
				b.WriteByte(' ')
			}
			space = true
			continue
		}
		space = false
		if b.Len()+len(string(r)) > max {
			break
		}
		b.WriteRune(r)
	}
	return strings.TrimRight(b.String(), " ")
}

const utf8RuneError = '\uFFFD'

// FormatStatus renders a status as an SMTP reply line, e.g.
// "550 5.1.1 No such user".
func FormatStatus(st store.SMTPStatus) string {
	return fmt.Sprintf("%d %d.%d.%d %s", st.Code, st.Enhanced[0], st.Enhanced[1], st.Enhanced[2], st.Message)
}
