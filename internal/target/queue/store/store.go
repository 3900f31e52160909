// Package store keeps queued messages on disk for target.spool.
//
// A queued message is three things: its metadata (envelope, per-recipient
// state, attempt history; see Message), its content (the header block
// followed by the body), and a small schedule entry (next attempt time,
// arrival time, held flag) that start-up reads instead of the metadata.
//
// # Layout of the directory store (Dir)
//
//	LOCATION/lock            lock file: flock held while the store is open,
//	                         exclusive with the writer's PID in it, or
//	                         shared by read-only openers
//	LOCATION/queue.db        bbolt database: buckets meta, sched, content,
//	                         quarantine, arrival (index by arrival time),
//	                         info (format, ID high-water mark)
//	LOCATION/bodies/ID       content of messages larger than InlineLimit
//	LOCATION/quarantine/     content files of quarantined entries
//
// The arrival index (database format 2) is changed in the transaction
// that creates, updates, deletes or quarantines an entry, so Oldest reads
// one key instead of the whole queue. A format-1 database is migrated
// when opened for writing: the index is built from the schedule entries
// in chunks, and the format marker set to 2 last, so a crash during the
// migration leaves format 1 and the next open starts it over. Builds that
// know only format 1 refuse a format-2 database. A read-only open leaves
// a format-1 database as it is, and Oldest then scans.
//
// Small messages (the common case) live entirely in queue.db, so that one
// bbolt commit makes a whole batch of them durable: concurrent Create,
// Update and Delete calls are collected by a single committer goroutine and
// applied in one transaction (group commit). Each call still returns only
// after the transaction holding its own change has been fsynced.
//
// # Durability contract
//
// OpenDir takes the lock before it reads queue.db, and fails, naming the
// holder's PID, if another process holds it past LockTimeout. Only a
// holder of the lock judges queue.db damaged, so a database another
// process is still creating or growing is never moved aside. A damaged
// database is also moved aside only while bbolt's own lock on it can be
// taken, which keeps out builds that did not have the lock file.
//
// OpenDir fsyncs the store's directory and the one above it, so that the
// names queue.db, bodies/ and quarantine/ (and the store directory itself,
// when OpenDir created it) are durable before anything is stored: a name
// in a directory survives power loss only once that directory is fsynced.
//
// When Create returns nil, the message survives kill -9 and power loss:
//
//  1. a large message's content file is written and fsynced, then
//  2. the bodies/ directory is fsynced (once per batch), so the file's name
//     is durable, then
//  3. the bbolt transaction inserting meta, sched and (for a small message)
//     content is committed; bbolt fsyncs its data pages before the meta page
//     that makes them visible, so a crash during the commit leaves the
//     previous state.
//
// A crash before step 3 leaves at most an orphan content file with no
// metadata. Open removes such orphans (and *.tmp leftovers): the client never
// got a success reply for them. A crash after step 3 leaves the complete
// message. There is no state in which metadata refers to missing content,
// except through outside damage, which Get reports as ErrCorrupt and the
// entry is quarantined.
//
// Update replaces meta and sched of one message in one transaction: after a
// crash either the old or the new state is seen, never a mix. Delete removes
// the entry in one transaction and then unlinks its content file; a crash in
// between leaves an orphan file that the next Open removes.
//
// Entries that cannot be decoded (damaged bytes, a newer entry format) are
// never deleted: they are moved to the quarantine bucket together with the
// reason, their content file is moved to quarantine/, the error is logged by
// the caller and counted, and the rest of the queue carries on. The move of
// the file follows the commit of the quarantine record; if a crash loses
// the move, Open finishes it instead of removing the file as an orphan.
// A move into quarantine/ never replaces a file there: a taken name gets
// a numeric suffix (ID.1, ID.2, ...), which is logged.
//
// When queue.db itself cannot be opened (garbage, empty, or shorter than
// its own meta page says, which bbolt would meet as SIGBUS), every content
// file is moved to quarantine/ (suffix .damaged-STAMP) and those moves are
// fsynced, then queue.db is moved aside and that is fsynced, and only then
// is a new, empty database created. If a content file cannot be moved,
// OpenDir fails with an error naming it; queue.db stays in place and
// nothing is deleted, so the next open tries again. A crash after the
// move of queue.db but before the new database's first commit leaves no
// (or an empty) queue.db next to the moved one; the next open creates the
// database then, with the same ID floor (see ID).
//
// # Failed writes
//
// A write that fails cleanly fails alone, and the store goes on (with a
// full disk, it takes new mail again once space is freed): a content file
// that cannot be written, which Create removes, or a bbolt commit that
// fails writing its pages, which bbolt rolls back before it writes the
// meta page.
//
// A failed fsync is different: the kernel may drop the data it could not
// write and report success for a later fsync, so what is on disk is
// unknown. The same holds when bbolt fails after writing its meta page: it
// reports an error, yet reads the new state back from its mapping (a read
// transaction then has the failed one's ID). So after a failed fsync of a
// content file, of bodies/ or quarantine/, or bbolt's fdatasync (or grow
// sync), or a failed commit whose new state is live, the store stops:
// every later Create, Update, Delete or Quarantine fails at once with an
// error wrapping ErrFailed, reads go on, Failed reports the error, and
// DirOptions.OnFailed is told once. Create keeps the content file it
// wrote, since its entry may be durable; the next OpenDir removes it if
// the entry is not. A restart recovers: OpenDir reads the state from disk.
//
// Content files are opened without following symlinks and must be regular
// files of exactly the size the metadata gives; anything else is damage
// and quarantines the entry, so a file planted in bodies/ can never be
// served as message content. Files in bodies/ whose names are not IDs are
// left alone (and logged); removal and quarantine act on a symlink itself,
// never on its target.
//
// The contract is checked by TestCrashKeepsAcknowledgedMessages (kill -9),
// TestPowerLoss, which runs the store on a FUSE file system that drops
// everything not fsynced at random points (internal/testutils/lazyfs),
// and TestFsyncFailure, which makes single fsyncs on it fail.
package store

import (
	"context"
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

// SchedEntry is the part of a message that scheduling needs; start-up reads
// only these.
type SchedEntry struct {
	ID          ID
	NextAttempt time.Time
	Arrival     time.Time
	Held        bool
	// Pending is the number of recipients still pending.
	Pending int
}

// Sched returns the schedule entry of m.
func (m *Message) Sched() SchedEntry {
	return SchedEntry{ID: m.ID, NextAttempt: m.NextAttempt, Arrival: m.Arrival, Held: m.Held, Pending: len(m.Pending())}
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

// QuarantineFunc is told about every entry moved aside, with the reason.
// sched is the entry's schedule entry when it had a readable one (so the
// caller knows the message was counted as queued), else nil. id is 0 for a
// whole damaged database.
type QuarantineFunc func(id ID, sched *SchedEntry, reason error)

// Store is the storage a queue runs on. Implementations must be safe for
// concurrent use. Every method that changes state returns only once the
// change is durable (see the package doc for the directory store's
// contract).
type Store interface {
	// Create stores a new message: m's metadata, the header block and
	// bodyLen bytes read from body. It assigns m.ID.
	Create(ctx context.Context, m *Message, header []byte, body io.Reader, bodyLen int64) error
	// Update durably replaces the metadata of an existing message.
	Update(ctx context.Context, m *Message) error
	// Delete removes a message and its content.
	Delete(ctx context.Context, id ID) error
	// Get reads the metadata of one message.
	Get(id ID) (*Message, error)
	// Content opens the stored content of a message.
	Content(m *Message) (Content, error)
	// Schedule calls fn for every queued message's schedule entry, in ID
	// order, without reading metadata or content.
	Schedule(fn func(SchedEntry) error) error
	// Quarantine moves an entry aside with the reason (for damage found by
	// the caller, e.g. an unparsable header).
	Quarantine(id ID, reason error)
	// Walk calls fn for every message's metadata, in ID order, without
	// reading content. Corrupt entries are quarantined and skipped.
	Walk(fn func(*Message) error) error
	// LastID returns the highest ID handed out so far: every message
	// stored from now on has a higher one.
	LastID() ID
	// Oldest returns the earliest arrival time of the queued messages
	// (which is not that of the lowest ID: imported mail keeps its
	// arrival time).
	Oldest() (time.Time, bool, error)
	// Failed returns nil while the store works, and an error wrapping
	// ErrFailed once it stopped after a write whose durability is unknown
	// (see the package doc); every write then fails until a restart.
	Failed() error
	// Close releases the store; pending writes are finished first.
	Close() error
}
