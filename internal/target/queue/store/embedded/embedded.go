package embedded

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Options configure Open.
type Options struct {
	DirOptions
	// Node names the lease owner of the handle Open returns (default
	// "local"; Handle gives more).
	Node string
	// Lease is how long a claim lasts unless renewed (default
	// DefaultLease); ReceiveLease how long Create's lease lasts before the
	// message counts as committed (default DefaultReceiveLease).
	Lease, ReceiveLease time.Duration
	// Now is the clock leases and due times are read from (default
	// time.Now).
	Now func() time.Time

	// beforeLoad, if set, runs before the start-up load reads the
	// schedule (tests).
	beforeLoad func()
}

// Default lease times.
const (
	DefaultLease        = 5 * time.Minute
	DefaultReceiveLease = 20 * time.Minute
)

// Store is the embedded backend: a Dir for what is durable, and in memory
// who works on which message (leases) and which messages wait for their
// time (a heap of due times). Only one process opens a Dir, so the leases
// need not be durable: after a restart nothing is leased, and every stored
// message, including one that was being received, is claimable at its
// stored due time (delivery is at least once).
//
// A Store is one node's handle; Handle returns handles of other node names
// on the same store, which the conformance suite uses to play several
// nodes in one process.
type Store struct {
	*core
	node string
}

var _ store.Backend = (*Store)(nil)

// Open opens (creating if needed) the embedded store at path and loads
// its schedule in the background: Claim returns stored messages as the
// load reaches them, and operator claims (ClaimID) wait for the load.
func Open(path string, opts Options) (*Store, error) {
	c := &core{
		now:          opts.Now,
		lease:        opts.Lease,
		receiveLease: opts.ReceiveLease,
		onQuar:       opts.OnQuarantine,
		lanes:        newLanes(),
		leases:       map[store.ID]*lease{},
		wake:         make(chan struct{}, 1),
		loaded:       make(chan struct{}),
		// A lease is only ever presented to the process that issued it;
		// starting tokens from the wall clock keeps them growing across
		// restarts anyway, so no token ever names two leases.
		token: uint64(time.Now().UnixNano()),
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.lease <= 0 {
		c.lease = DefaultLease
	}
	if c.receiveLease <= 0 {
		c.receiveLease = DefaultReceiveLease
	}
	if c.onQuar == nil {
		c.onQuar = func(store.ID, *SchedEntry, error) {}
	}
	dopts := opts.DirOptions
	dopts.OnQuarantine = c.quarantined
	if dopts.ReadOnly {
		return nil, fmt.Errorf("store: a read-only store is opened with OpenDir")
	}
	d, err := OpenDir(path, dopts)
	if err != nil {
		return nil, err
	}
	c.dir = d
	// Taken before anything can be stored: the load covers exactly the
	// messages stored before this Open.
	upTo := d.LastID()
	go func() {
		if opts.beforeLoad != nil {
			opts.beforeLoad()
		}
		c.load(upTo)
	}()
	node := opts.Node
	if node == "" {
		node = "local"
	}
	return &Store{core: c, node: node}, nil
}

// Handle returns a handle on the same store that takes leases as node.
// Closing it does nothing; closing the Store Open returned closes all.
func (s *Store) Handle(node string) store.Backend { return &handle{&Store{core: s.core, node: node}} }

// handle is a Store that does not own the core.
type handle struct{ *Store }

func (h *handle) Close() error { return nil }

// WaitLoaded blocks until the schedule of the messages stored before Open
// is loaded.
func (s *Store) WaitLoaded() { <-s.loaded }

// Node implements store.Backend.
func (s *Store) Node() string { return s.node }

// Close implements store.Backend: it waits for the load and for writes
// already submitted, and closes the files.
func (s *Store) Close() error {
	s.closing.Store(true)
	<-s.loaded
	return s.dir.Close()
}

// Failed implements store.Backend.
func (s *Store) Failed() error { return s.dir.Failed() }

// Create implements store.Backend.
// The receiving lease is taken as soon as the ID is allocated, before the
// message is written: once it is on disk, nobody else can take it.
func (s *Store) Create(ctx context.Context, m *store.Message, header []byte, body io.Reader, bodyLen int64) (*store.Lease, error) {
	var pub *store.Lease
	err := s.dir.create(ctx, m, header, body, bodyLen, func(id store.ID) {
		s.mu.Lock()
		defer s.mu.Unlock()
		l := s.newLease(id, s.node, s.receiveLease)
		l.receiving, l.sched = true, schedOf(m)
		pub = l.public(id)
	})
	if err != nil {
		if pub != nil {
			s.dropLease(pub.ID, pub.Token)
		}
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if l := s.leases[m.ID]; l != nil && l.token == pub.Token {
		l.sched = schedOf(m) // with the stored lengths
	}
	return pub, nil
}

// Get implements store.Backend.
func (s *Store) Get(ctx context.Context, id store.ID) (*store.Message, error) {
	m, err := s.dir.Get(id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	m.Lease = s.leaseInfo(id)
	s.mu.Unlock()
	return m, nil
}

// Content implements store.Backend.
func (s *Store) Content(ctx context.Context, m *store.Message) (store.Content, error) {
	return s.dir.Content(m)
}

// Walk implements store.Backend.
func (s *Store) Walk(ctx context.Context, fn func(*store.Message) error) error {
	return s.dir.Walk(func(m *store.Message) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		s.mu.Lock()
		m.Lease = s.leaseInfo(m.ID)
		s.mu.Unlock()
		return fn(m)
	})
}

// Stats implements store.Backend.
func (s *Store) Stats(ctx context.Context) (store.Stats, error) {
	st := store.Stats{Messages: s.messages.Load(), Recipients: s.recipients.Load(), Held: s.held.Load()}
	if st.Messages == 0 {
		return st, nil
	}
	oldest, ok, err := s.dir.Oldest()
	if ok {
		st.Oldest = oldest
	}
	return st, err
}

// Quarantine implements store.Backend.
func (s *Store) Quarantine(ctx context.Context, id store.ID, reason error) {
	s.dir.Quarantine(id, reason)
}

// core is what the handles of one store share.
type core struct {
	dir                 *Dir
	now                 func() time.Time
	lease, receiveLease time.Duration
	onQuar              QuarantineFunc
	loaded              chan struct{}
	closing             atomic.Bool
	wake                chan struct{}

	// The figures of committed messages (see store.Stats), kept as the
	// load, commits, saves, deletes and quarantines change them.
	messages, recipients, held atomic.Int64

	mu     sync.Mutex
	lanes  lanes               // claimable messages by destination and due time
	leases map[store.ID]*lease // current leases, expired ones included
	token  uint64              // the last token issued
}

// Wake implements store.Backend.
func (c *core) Wake() <-chan struct{} { return c.wake }

func (c *core) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// load schedules and counts the messages stored before Open (IDs up to
// last). Messages stored after Open are leased to their sessions and
// counted at Commit, so none is counted or scheduled twice.
func (c *core) load(last store.ID) {
	defer close(c.loaded)
	err := c.dir.Schedule(func(e SchedEntry) error {
		if e.ID > last {
			return errLoaded // Schedule goes in ID order
		}
		if c.closing.Load() {
			return errLoaded
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		c.count(e, 1)
		if !e.Held {
			c.lanes.push(e.ID, e.Destination, e.NextAttempt)
		}
		return nil
	})
	if err != nil && err != errLoaded {
		c.dir.logf("store: loading the queue failed; entries not loaded yet are picked up after a restart: %v", err)
	}
	c.kick()
}

var errLoaded = fmt.Errorf("loaded")

// count adds (sign 1) or removes (sign -1) a committed message's figures.
func (c *core) count(e SchedEntry, sign int64) {
	c.messages.Add(sign)
	c.recipients.Add(sign * int64(e.Pending))
	if e.Held {
		c.held.Add(sign)
	}
}

// quarantined is the Dir's quarantine callback: the entry left the
// queue.
func (c *core) quarantined(id store.ID, sched *SchedEntry, reason error) {
	c.mu.Lock()
	l := c.leases[id]
	counted := sched != nil && (l == nil || !l.receiving)
	if l != nil {
		// The holder's next write finds the entry gone.
		delete(c.leases, id)
	}
	c.lanes.remove(id)
	if counted {
		c.count(*sched, -1)
	}
	c.mu.Unlock()
	c.onQuar(id, sched, reason)
}
