// Package store is the boundary between target.spool and where its
// messages are kept: what is kept of a queued message (Message, its
// recipients and their state; message.go), and Backend, the one interface
// a storage backend implements. Two backends implement it:
//
//	store/embedded  a bbolt database and content files in a local
//	                directory; the default, needing no setup; one process
//	store/postgres  a PostgreSQL database shared by several maddy nodes
//
// The queue does not know which one it runs on. Every backend passes the
// same conformance suite (store/storetest).
//
// # Who works on a message: leases
//
// A message belongs to at most one party at a time, and the backend
// records which, so that nodes sharing a store never work on one message
// at once. That party holds the message's lease: an owner (the node's
// name), an expiry, and a fencing token that grows with every new lease
// of the message.
//
//   - Create stores a new message leased to the session receiving it.
//     Commit ends that lease and queues the message; Abort (Delete) removes
//     it. A receiving lease that expires (the node died between storing
//     and committing) queues the message as it is: it is delivered, at
//     least once, like a message whose client did not hear the reply.
//     A backend may instead keep a small message in the node's memory
//     from Create to Commit, and store it queued at Commit (store/postgres
//     does, to write each message once): until then no one else sees it
//     (Get, Walk, Request and ClaimID do not find it), and if the node
//     dies it is lost, which breaks no promise: its client has had no
//     reply and sends it again.
//   - Claim leases messages that are due, not held and not leased, earliest
//     due first; ClaimID leases one message for an operator change.
//   - The holder renews the lease while it works (Renew), and ends it with
//     Save (the message's new state), Delete or Release.
//   - A lease that is not renewed expires, and the message can be claimed
//     again, by any node, with a new token. From then on the old holder's
//     Save, Delete, Release and Renew fail with ErrLeaseLost and change
//     nothing (fencing): that node drops the message, and the cost of the
//     takeover is at most one repeated attempt. A write with an expired
//     lease that nobody has claimed since still succeeds: its token is
//     still the message's, and its outcome is the truth.
//
// Operator changes are requests (hold, release, delete, bounce): a message
// not leased is claimed with ClaimID and changed under that lease; for a
// message leased elsewhere, Request records the change, and the holder's
// next Save or Release returns it (keeping the lease) so the holder applies
// it before giving the message up. The latest request wins.
//
// Every write returns once it is durable, as the backend defines
// durability (see each backend's package documentation), except that a
// backend may let Create's write become durable as late as the Commit
// that follows it: until Commit returns, the client has not been told
// that the message was accepted.
package store

import (
	"context"
	"errors"
	"io"
	"time"
)

// Backend is a queue's storage, shared by every node the queue runs on.
// A Backend value is one node's handle: leases it takes are that node's.
// Implementations are safe for concurrent use.
type Backend interface {
	// Node is the name this handle takes leases under.
	Node() string

	// Create stores a new message (durable at the latest when Commit
	// returns), or keeps a small one in memory until Commit (see the
	// package documentation): m's metadata, the header block and bodyLen
	// bytes read from body. It assigns m.ID and returns the receiving
	// lease, held by the caller until Commit or Delete.
	Create(ctx context.Context, m *Message, header []byte, body io.Reader, bodyLen int64) (*Lease, error)
	// Commit ends a receiving lease: the message is queued, claimable at
	// its NextAttempt. A request recorded meanwhile is returned as by
	// Save, with the lease kept.
	Commit(ctx context.Context, l *Lease) (Request, error)

	// Claim leases up to max messages that are due, not held and not
	// leased (or whose lease expired), earliest due first, leaving out
	// the messages of the destinations in skip, and returns them with
	// their metadata. It does not wait.
	Claim(ctx context.Context, max int, skip []string) ([]Claim, error)
	// NextDue returns when the earliest message Claim could return
	// (with the same skip) falls due; ok is false when there is none.
	NextDue(ctx context.Context, skip []string) (due time.Time, ok bool, err error)
	// ClaimNext leases the message of destination that is due first,
	// not held and not leased, whatever its due time (a probe of a
	// destination that was suspended). ErrNotFound if there is none.
	ClaimNext(ctx context.Context, destination string) (Claim, error)
	// MakeDue makes every message of destination that is not held and
	// not leased due now, without changing what is stored of it, and
	// says how many it made due.
	MakeDue(ctx context.Context, destination string) (int, error)
	// Wake receives a value when a message may have become claimable
	// before the time NextDue gave: committed, released, retried, by this
	// node or another.
	Wake() <-chan struct{}
	// ClaimID leases message id whatever its due time and held flag, for
	// an operator change. It fails with ErrLeased if another lease holds
	// it, and ErrNotFound if there is no such message.
	ClaimID(ctx context.Context, id ID) (Claim, error)
	// Renew extends the given leases to a full lease time from now and
	// returns those that are no longer held (see ErrLeaseLost).
	Renew(ctx context.Context, leases []*Lease) (lost []*Lease, err error)

	// Save writes m, the new state of the message held under l, and ends
	// the lease: the message is claimable at m.NextAttempt unless m.Held.
	// If a request was recorded while l was held, Save writes m, keeps
	// the lease and returns the request, once: the caller applies it and
	// saves again.
	Save(ctx context.Context, l *Lease, m *Message) (Request, error)
	// Release ends l without changing the message, which is claimable at
	// its stored NextAttempt; a recorded request is returned as by Save.
	Release(ctx context.Context, l *Lease) (Request, error)
	// Delete removes the message held under l, with its content.
	Delete(ctx context.Context, l *Lease) error
	// Request records r for the message id, leased by someone else: it is
	// returned by that lease's next Save, Release or Commit. It fails with
	// ErrNotLeased if no lease holds the message (claim it instead) and
	// ErrNotFound if there is no such message.
	Request(ctx context.Context, id ID, r Request) error

	// Get reads the metadata of one message, with Message.Lease set if it
	// is leased.
	Get(ctx context.Context, id ID) (*Message, error)
	// Content opens the stored content of a message.
	Content(ctx context.Context, m *Message) (Content, error)
	// Walk calls fn for every stored message (those being received and
	// stored too), in ID order, without content, with Message.Lease set
	// as by Get. Damaged entries are quarantined and skipped.
	Walk(ctx context.Context, fn func(*Message) error) error
	// Stats returns the figures of the whole queue.
	Stats(ctx context.Context) (Stats, error)
	// Quarantine moves an entry aside with the reason, for damage the
	// caller found (e.g. an unparsable header). It never fails loudly: if
	// the move cannot be written, the entry is met again later.
	Quarantine(ctx context.Context, id ID, reason error)

	// Failed returns nil while the backend can write, and an error
	// wrapping ErrFailed once it stopped after a write whose durability is
	// unknown; every write then fails until a restart.
	Failed() error
	// Close releases this handle. Writes already submitted are finished
	// first; leases still held are not released (after a restart they are
	// the restarted node's to take back, see Lease).
	Close() error
}

// Lease is a holder's right to work on one message (see the package
// documentation).
type Lease struct {
	ID ID
	// Owner is the node holding the lease.
	Owner string
	// Token is the fencing token: every new lease of a message has a
	// larger one, and only the current token's writes are accepted.
	Token uint64
	// Expiry is when the lease ends unless renewed.
	Expiry time.Time
}

// Claim is a message leased by Claim or ClaimID, with its metadata as
// stored when it was claimed.
type Claim struct {
	Lease   *Lease
	Message *Message
}

// LeaseInfo is what Get and Walk say about the lease holding a message.
type LeaseInfo struct {
	Owner  string
	Expiry time.Time
	// Token is the lease's fencing token: a renewal keeps it, a new lease
	// of the message has a larger one.
	Token uint64
	// Receiving is set while the session that stores the message holds
	// it (between Create and Commit).
	Receiving bool
	// Request is an operator request waiting for the holder.
	Request Request
}

// Request is an operator's change to a message, recorded while another
// party holds the message's lease.
type Request uint8

const (
	// RequestHold keeps the message from being attempted until released.
	RequestHold Request = iota + 1
	// RequestRelease makes a held message due now.
	RequestRelease
	// RequestDelete removes the message without telling its sender.
	RequestDelete
	// RequestBounce fails its pending recipients, reporting as NOTIFY asks.
	RequestBounce
)

func (r Request) String() string {
	switch r {
	case 0:
		return "none"
	case RequestHold:
		return "hold"
	case RequestRelease:
		return "release"
	case RequestDelete:
		return "delete"
	case RequestBounce:
		return "bounce"
	}
	return "unknown"
}

// Stats are the figures of a whole queue: messages queued (not those
// still being received), the recipients still pending in them, the held
// ones, and the earliest arrival among them.
type Stats struct {
	Messages   int64
	Recipients int64
	Held       int64
	// Oldest is the earliest arrival time (zero when the queue is empty).
	Oldest time.Time
}

var (
	// ErrLeaseLost is returned by a write under a lease that is no longer
	// the message's: it expired and the message was claimed again (or it
	// was removed). Nothing was written; the holder drops the message.
	ErrLeaseLost = errors.New("store: lease lost (the message was taken over)")
	// ErrLeased is returned by ClaimID for a message another lease holds.
	ErrLeased = errors.New("store: message is leased by another party")
	// ErrNotLeased is returned by Request for a message no lease holds.
	ErrNotLeased = errors.New("store: message is not leased")
)
