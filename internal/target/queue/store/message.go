package store

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"
)

// ID identifies a queued message within one store. IDs are allocated in
// increasing order and never reused while the store exists, so two messages
// can never share a file name even when maddy's own 4-byte message IDs
// collide, and an ID an operator saw earlier never names another message.
// (Only the ID of a Create that failed, which no entry ever had, may be
// handed out again after a restart.) The directory store keeps the highest
// ID committed in its database, in the transaction that commits it, and
// continues after it or after the highest ID an entry or a file name
// shows, whichever is higher. A database that replaces a damaged one
// (which cannot be read) starts above a floor derived from the clock,
// about 2^20 per second since 1970, which no counter can have reached (see
// recoveryIDFloor); its first transaction records that floor.
type ID uint64

// String returns the 16-digit hexadecimal form used in file names, logs and
// admin commands.
func (id ID) String() string {
	var buf [16]byte
	const digits = "0123456789abcdef"
	for i := 15; i >= 0; i-- {
		buf[i] = digits[id&0xf]
		id >>= 4
	}
	return string(buf[:])
}

// ParseID parses the hexadecimal form of an ID. It accepts 1 to 16 hex
// digits and nothing else, so a parsed ID can never smuggle a path
// separator or ".." into a file name.
func ParseID(s string) (ID, error) {
	if len(s) == 0 || len(s) > 16 {
		return 0, fmt.Errorf("invalid message ID %s: want 1 to 16 hexadecimal digits", quoteShort(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return 0, fmt.Errorf("invalid message ID %s: want 1 to 16 hexadecimal digits", quoteShort(s))
		}
	}
	v, err := strconv.ParseUint(s, 16, 64)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("invalid message ID %q: zero is never used", s)
	}
	return ID(v), nil
}

// maxQuoted bounds how much of a rejected input an error message repeats,
// so hostile input (an admin argument, a file name) cannot flood the log.
const maxQuoted = 40

// quoteShort quotes s for an error message, cut to maxQuoted bytes.
func quoteShort(s string) string {
	if len(s) <= maxQuoted {
		return strconv.Quote(s)
	}
	return strconv.Quote(s[:maxQuoted]) + "..."
}

// RcptState is where one recipient of a message stands.
type RcptState uint8

const (
	// RcptPending recipients are attempted on the next attempt.
	RcptPending RcptState = iota
	// RcptDelivered recipients were accepted by the target; never re-sent.
	RcptDelivered
	// RcptFailed recipients failed permanently (or ran out of tries/age).
	RcptFailed
)

func (s RcptState) String() string {
	switch s {
	case RcptPending:
		return "pending"
	case RcptDelivered:
		return "delivered"
	case RcptFailed:
		return "failed"
	}
	return "unknown(" + strconv.Itoa(int(s)) + ")"
}

// SMTPStatus is the last error a recipient saw, in the form a DSN and an
// operator need. Temporary is stored explicitly because errors without an
// SMTP code are still classified by exterrors.
type SMTPStatus struct {
	Code      int    `json:"code,omitempty"`
	Enhanced  [3]int `json:"enhanced,omitempty"`
	Message   string `json:"message,omitempty"`
	Temporary bool   `json:"temporary,omitempty"`
	// RemoteMTA is the host that produced the reply, when known.
	RemoteMTA string `json:"remote_mta,omitempty"`
}

// Rcpt is one recipient of a queued message with its DSN options (RFC 3461)
// and delivery state.
type Rcpt struct {
	Addr string `json:"addr"`
	// Notify holds the NOTIFY= keywords as given (NEVER, SUCCESS, FAILURE,
	// DELAY); empty means the sender did not use NOTIFY.
	Notify []string `json:"notify,omitempty"`
	// OrigType and Orig are the ORCPT= parameter.
	OrigType string `json:"orcpt_type,omitempty"`
	Orig     string `json:"orcpt,omitempty"`
	// Original is maddy's pre-rewrite address (MsgMetadata.OriginalRcpts).
	Original string `json:"original,omitempty"`

	State       RcptState   `json:"state"`
	Tries       int         `json:"tries,omitempty"`
	LastAttempt time.Time   `json:"last_attempt,omitzero"`
	LastError   *SMTPStatus `json:"last_error,omitempty"`
	// Reported is a bit set of DSN kinds already sent for this recipient
	// (see the queue package), so a restart never sends one twice.
	Reported uint8 `json:"reported,omitempty"`
	// DelayRepeats counts the delay_warning_repeat intervals whose delay
	// report has been sent after the first one.
	DelayRepeats int `json:"delay_repeats,omitempty"`
	// Via names the target that took the recipient when it was not the
	// queue's own (the fallback target); empty for the usual target.
	Via string `json:"via,omitempty"`
	// History holds the recipient's last attempts, oldest first, at most
	// MaxRcptHistory.
	History []RcptAttempt `json:"history,omitempty"`
}

// RcptAttempt is one attempt of one recipient: when, what the target said
// (nil: accepted), and through which target ("" for the usual one).
type RcptAttempt struct {
	Time   time.Time   `json:"time"`
	Status *SMTPStatus `json:"status,omitempty"`
	Via    string      `json:"via,omitempty"`
}

// MaxRcptHistory bounds the attempts kept per recipient.
const MaxRcptHistory = 5

// AddHistory appends an attempt to r's history, keeping at most
// MaxRcptHistory.
func (r *Rcpt) AddHistory(a RcptAttempt) {
	r.History = append(r.History, a)
	if len(r.History) > MaxRcptHistory {
		r.History = append(r.History[:0:0], r.History[len(r.History)-MaxRcptHistory:]...)
	}
}

// MailOptions are the MAIL FROM parameters kept with the message and passed
// to the nested target on every attempt.
type MailOptions struct {
	Body       string  `json:"body,omitempty"`
	Size       int64   `json:"size,omitempty"`
	RequireTLS bool    `json:"requiretls,omitempty"`
	UTF8       bool    `json:"smtputf8,omitempty"`
	Return     string  `json:"ret,omitempty"`
	EnvelopeID string  `json:"envid,omitempty"`
	Auth       *string `json:"auth,omitempty"`
}

// ConnInfo is what is kept of the connection a message arrived on: enough
// for Received-From-MTA in a DSN and for the admin view.
type ConnInfo struct {
	Proto      string `json:"proto,omitempty"`
	Hostname   string `json:"helo,omitempty"`
	RemoteAddr string `json:"remote_addr,omitempty"`
	AuthUser   string `json:"auth_user,omitempty"`
}

// AttemptRecord is one entry of a message's attempt history.
type AttemptRecord struct {
	Time     time.Time     `json:"time"`
	Duration time.Duration `json:"duration"`
	// Delivered, Temporary and Permanent count recipients by outcome.
	Delivered int `json:"delivered,omitempty"`
	Temporary int `json:"temporary,omitempty"`
	Permanent int `json:"permanent,omitempty"`
	// Error is one representative error text, if any recipient failed.
	Error string `json:"error,omitempty"`
}

// MaxHistory bounds the attempt history kept per message.
const MaxHistory = 10

// Message is the metadata of one queued message.
type Message struct {
	ID ID `json:"-"`
	// MsgID is maddy's message ID, kept for log correlation only.
	MsgID string `json:"msg_id"`
	From  string `json:"from"`
	// OriginalFrom is maddy's pre-rewrite sender.
	OriginalFrom       string      `json:"original_from,omitempty"`
	MailOpts           MailOptions `json:"mail_opts"`
	Conn               ConnInfo    `json:"conn"`
	DontTraceSender    bool        `json:"dont_trace_sender,omitempty"`
	Quarantine         bool        `json:"quarantine,omitempty"`
	TLSRequireOverride bool        `json:"tls_require_override,omitempty"`

	Arrival   time.Time `json:"arrival"`
	HeaderLen int64     `json:"header_len"`
	BodyLen   int64     `json:"body_len"`

	Rcpts        []Rcpt          `json:"rcpts"`
	Attempts     int             `json:"attempts,omitempty"`
	FirstAttempt time.Time       `json:"first_attempt,omitzero"`
	LastAttempt  time.Time       `json:"last_attempt,omitzero"`
	NextAttempt  time.Time       `json:"next_attempt"`
	Held         bool            `json:"held,omitempty"`
	History      []AttemptRecord `json:"history,omitempty"`
	// Destination is where the queue sends the message's recipients,
	// the unit of its per-destination limits (see the queue package):
	// their domain, or "" for a queue that sends everything to one
	// target (and for messages stored before destinations existed).
	Destination string `json:"destination,omitempty"`
	// HeaderMsgID is the Message-ID header field of the message, for
	// the delivery log.
	HeaderMsgID string `json:"message_id,omitempty"`
	// Postponed counts the attempts not made because the destination
	// was suspended as dead (they are not tries); it spaces the
	// postponements out as tries would be.
	Postponed int `json:"postponed,omitempty"`

	// Lease is set by Get and Walk when the message is leased; it is not
	// part of the stored metadata.
	Lease *LeaseInfo `json:"-"`
}

// Size is the size of the stored content (header and body).
func (m *Message) Size() int64 { return m.HeaderLen + m.BodyLen }

// AddHistory appends an attempt record, keeping at most MaxHistory.
func (m *Message) AddHistory(r AttemptRecord) {
	m.History = append(m.History, r)
	if len(m.History) > MaxHistory {
		m.History = append(m.History[:0:0], m.History[len(m.History)-MaxHistory:]...)
	}
}

// Pending returns the indexes of recipients still pending.
func (m *Message) Pending() []int {
	var idx []int
	for i := range m.Rcpts {
		if m.Rcpts[i].State == RcptPending {
			idx = append(idx, i)
		}
	}
	return idx
}

// Content is a message's stored header block and body.
type Content struct {
	Header []byte
	// Body gives the body; it can be opened more than once (a target may
	// read it once per next hop).
	Body Body
}

// Body is stored message body. It has the methods of maddy's
// buffer.Buffer, so it can be handed to a delivery target as it is.
type Body interface {
	Open() (io.ReadCloser, error)
	Len() int
	// Remove does nothing: the store owns the content.
	Remove() error
}

var (
	// ErrNotFound is returned for an ID that is not (or no longer) queued.
	ErrNotFound = errors.New("store: no such message")
	// ErrCorrupt wraps errors about damaged entries; the entry has been
	// quarantined by the time the error is returned.
	ErrCorrupt = errors.New("store: corrupt entry")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("store: closed")
	// ErrFailed is wrapped by the error of every write once the store has
	// stopped after a write that failed in a way that leaves what is on
	// disk unknown (a failed fsync). Reads keep working; a restart, which
	// reopens the store from what is on disk, recovers.
	ErrFailed = errors.New("store: stopped after a failed write; restart to recover")
)
