package postgres

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"log"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Defaults of Options.
const (
	DefaultLease        = 5 * time.Minute
	DefaultReceiveLease = 20 * time.Minute
	DefaultInlineLimit  = 64 << 10
	DefaultPollInterval = 2 * time.Second
	// defaultMaxConns is the pool size unless the DSN sets pool_max_conns.
	defaultMaxConns = 10
)

// chunkSize is the size of one row of spool_chunks (the last may be
// shorter).
const chunkSize = 256 << 10

// Options configure a handle.
type Options struct {
	// DSN is a libpq-style connection string or URL (pgx syntax; pool_*
	// parameters such as pool_max_conns are accepted).
	DSN string
	// Node is the name this handle takes leases under; unique per running
	// node (default: the host name).
	Node string
	// Lease is how long a lease lasts unless renewed (default 5m).
	Lease time.Duration
	// ReceiveLease is the lease Create returns, held until Commit
	// (default 20m).
	ReceiveLease time.Duration
	// Now is the clock every lease and due-time decision reads (default
	// time.Now). The database's clock is never used for them.
	Now func() time.Time
	// Logf receives diagnostics (default log.Printf).
	Logf func(format string, args ...any)
	// OnQuarantine is told about every entry moved to spool_quarantine.
	OnQuarantine func(id store.ID, reason error)
	// InlineLimit is the largest content (header and body) kept in the
	// message row; larger bodies go to spool_chunks (default 64 KiB).
	InlineLimit int64
	// PollInterval is how often Wake fires without a notification
	// (default 2s).
	PollInterval time.Duration

	// onListen, if set (by tests), is called each time the listener has
	// (re)started listening.
	onListen func()
	// onBatch, if set (by tests), is called with the ops of each batch
	// before it is sent.
	onBatch func(ops []*op)
	// onNotify, if set (by tests), is called for each notification the
	// listener receives, saying whether one of this handle's own
	// sessions sent it.
	onNotify func(own bool)
}

// Store is one node's handle on a PostgreSQL spool. It implements
// store.Backend.
type Store struct {
	opts     Options
	node     string
	host     string
	instance string
	channel  string // NOTIFY channel of this database and schema
	pool     *pgxpool.Pool
	connCfg  *pgx.ConnConfig

	ctx    context.Context // cancelled when the handle stops
	cancel context.CancelFunc
	wg     sync.WaitGroup // background goroutines
	// committersDone is the committers' own group: they stop first.
	committersDone sync.WaitGroup
	wake           chan struct{}
	ops            chan *op
	// readOnly is set for a Reader's handle.
	readOnly bool
	// reporter is set while the listener's session holds the reporter
	// lock (see ReportsCluster); reporterKey is that advisory lock's key.
	reporter    atomic.Bool
	reporterKey int64
	batches     atomic.Int64 // batches sent, for tests
	// ownSessions holds the backend PIDs of the pool's connections, so
	// the listener tells this handle's own notifications from others'.
	ownSessions sync.Map
	// remoteWakePending is set while a wake for other nodes'
	// notifications is scheduled (see remoteWake).
	remoteWakePending atomic.Bool
	// claimed keeps the content of inline messages this handle claimed,
	// read by the claim itself, until Content takes it or the lease ends
	// (see claimedContent).
	claimed claimedContent
	// unsent holds the messages this handle receives in memory until
	// Commit (see Create).
	unsent unsent

	closeMu   sync.Mutex
	closed    bool
	calls     sync.WaitGroup // calls in progress
	closeOnce sync.Once
	closeErr  error
}

var _ store.Backend = (*Store)(nil)

// live holds the instance IDs of the handles open in this process, so that
// a second handle with a node name already open here is refused, while a
// handle reopened after a crash in the same process (tests) is not.
var live = struct {
	sync.Mutex
	m map[string]bool
}{m: map[string]bool{}}

// Open connects to the database, brings its schema up to date, registers
// the node and takes back the leases a previous run of the same node held,
// and starts the committers, the listener and the heartbeat.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if opts.Lease <= 0 {
		opts.Lease = DefaultLease
	}
	if opts.ReceiveLease <= 0 {
		opts.ReceiveLease = DefaultReceiveLease
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logf == nil {
		opts.Logf = log.Printf
	}
	if opts.InlineLimit <= 0 {
		opts.InlineLimit = DefaultInlineLimit
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = DefaultPollInterval
	}
	host, err := os.Hostname()
	if err != nil {
		return nil, fmt.Errorf("postgres: host name: %w", err)
	}
	if opts.Node == "" {
		opts.Node = host
	}
	cfg, err := pgxpool.ParseConfig(opts.DSN)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	if !strings.Contains(opts.DSN, "pool_max_conns") {
		cfg.MaxConns = defaultMaxConns
	}
	var idb [16]byte
	rand.Read(idb[:])
	s := &Store{
		opts:     opts,
		node:     opts.Node,
		host:     host,
		instance: hex.EncodeToString(idb[:]),
		connCfg:  cfg.ConnConfig.Copy(),
		wake:     make(chan struct{}, 1),
		ops:      make(chan *op, maxBatch*committers),
	}
	cfg.AfterConnect = func(_ context.Context, c *pgx.Conn) error {
		s.ownSessions.Store(c.PgConn().PID(), true)
		return nil
	}
	cfg.BeforeClose = func(c *pgx.Conn) { s.ownSessions.Delete(c.PgConn().PID()) }
	s.pool, err = pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	if err := s.start(ctx); err != nil {
		s.pool.Close()
		return nil, err
	}
	return s, nil
}

// start runs the start-up transaction and the background goroutines.
func (s *Store) start(ctx context.Context) error {
	if err := s.pool.QueryRow(ctx, "SELECT 'spool:' || current_schema()").Scan(&s.channel); err != nil {
		return fmt.Errorf("postgres: connect: %w", err)
	}
	// One reporter per queue (database and schema), as for notifications.
	h := fnv.New64a()
	h.Write([]byte("reporter " + s.channel))
	s.reporterKey = int64(h.Sum64())
	live.Lock()
	live.m[s.instance] = true
	live.Unlock()
	if err := s.startup(ctx); err != nil {
		s.forget()
		return err
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	for i := 0; i < committers; i++ {
		s.committersDone.Add(1)
		go s.committer()
	}
	first := make(chan struct{})
	s.wg.Add(3)
	go s.listen(first)
	go s.poll()
	go s.heartbeat()
	select {
	case <-first:
	case <-ctx.Done():
	}
	return nil
}

func (s *Store) forget() {
	live.Lock()
	delete(live.m, s.instance)
	live.Unlock()
}

// startup migrates the schema, registers the node and takes back its
// leases, in one transaction serialized with every other node's start-up
// by an advisory lock.
func (s *Store) startup(ctx context.Context) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("postgres: connect: %w", err)
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", startupLockKey); err != nil {
		return fmt.Errorf("postgres: start-up lock: %w", err)
	}
	if err := migrate(ctx, tx); err != nil {
		return err
	}
	if err := s.register(ctx, tx); err != nil {
		return err
	}
	if err := s.takeBack(ctx, tx); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("postgres: start-up: %w", err)
	}
	return nil
}

// register records this node in spool_nodes, refusing a name a running
// node uses.
func (s *Store) register(ctx context.Context, tx pgx.Tx) error {
	now := s.now()
	var (
		host, instance string
		pid            int
		beat           time.Time
	)
	err := tx.QueryRow(ctx, "SELECT host, pid, instance, heartbeat FROM spool_nodes WHERE name = $1",
		s.node).Scan(&host, &pid, &instance, &beat)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return fmt.Errorf("postgres: read spool_nodes: %w", err)
	case beat.After(now.Add(-s.opts.Lease)) && s.inUse(host, pid, instance):
		return fmt.Errorf("postgres: node name %s is already in use by a running node on host %s "+
			"(last seen %v ago); give each node a unique `node` name",
			s.node, host, now.Sub(beat).Round(time.Second))
	}
	_, err = tx.Exec(ctx, `
		INSERT INTO spool_nodes (name, host, pid, instance, started, heartbeat)
		VALUES ($1, $2, $3, $4, $5, $5)
		ON CONFLICT (name) DO UPDATE SET host = $2, pid = $3, instance = $4, started = $5, heartbeat = $5`,
		s.node, s.host, os.Getpid(), s.instance, now)
	if err != nil {
		return fmt.Errorf("postgres: register node: %w", err)
	}
	return nil
}

// inUse reports whether the registration of another handle (with a fresh
// heartbeat) belongs to a live process.
func (s *Store) inUse(host string, pid int, instance string) bool {
	if host != s.host {
		return true
	}
	if pid != os.Getpid() {
		return processAlive(pid)
	}
	live.Lock()
	defer live.Unlock()
	return live.m[instance]
}

// takeBack ends every lease held under this node's name by an earlier run:
// those messages, including ones that were being received, are claimable
// at once.
func (s *Store) takeBack(ctx context.Context, tx pgx.Tx) error {
	now := s.now()
	tag, err := tx.Exec(ctx, `
		UPDATE spool_messages SET lease_owner = NULL, lease_expiry = NULL, receiving = false,
			claimable_at = least(next_attempt, $2)
		WHERE lease_owner = $1`, s.node, now)
	if err != nil {
		return fmt.Errorf("postgres: take back leases: %w", err)
	}
	if n := tag.RowsAffected(); n > 0 {
		s.logf("spool: took back %d leases of node %s held before a restart", n, s.node)
		if _, err := tx.Exec(ctx, "SELECT pg_notify($1, '')", s.channel); err != nil {
			return fmt.Errorf("postgres: take back leases: %w", err)
		}
	}
	return nil
}

// heartbeat keeps this node's spool_nodes row fresh.
func (s *Store) heartbeat() {
	defer s.wg.Done()
	t := time.NewTicker(max(s.opts.Lease/3, time.Millisecond))
	defer t.Stop()
	failing := false
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(s.ctx, s.opts.Lease/3)
		tag, err := s.pool.Exec(ctx, "UPDATE spool_nodes SET heartbeat = $3 WHERE name = $1 AND instance = $2",
			s.node, s.instance, s.now())
		cancel()
		switch {
		case err != nil && s.ctx.Err() == nil:
			if !failing {
				s.logf("spool: node heartbeat: %v", err)
			}
			failing = true
		case err == nil && tag.RowsAffected() == 0:
			s.logf("spool: node name %s was registered by another process meanwhile; give each node a unique `node` name", s.node)
		case err == nil:
			if failing {
				s.logf("spool: node heartbeat works again")
			}
			failing = false
		}
	}
}

// Node is the name this handle takes leases under.
func (s *Store) Node() string { return s.node }

// Failed always returns nil: every write is one transaction that either
// committed or not (see the package documentation for a commit whose
// outcome the connection lost).
func (s *Store) Failed() error { return nil }

// Wake receives a value when a message may have become claimable.
func (s *Store) Wake() <-chan struct{} { return s.wake }

func (s *Store) signalWake() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// remoteWakeDelay is how long a wake-up for another node's notification
// waits. That node's own dispatcher was woken without delay and claims
// the message itself when it has room; were every node to claim at each
// notification, nodes would run about one claim per node per batch
// committed anywhere, nearly all of them finding nothing (measured with 3
// nodes: 2.5 times the database CPU per message of one node). Waiting
// lets that node go first, and gathers the notifications of a burst into
// one wake-up; a message it has no room for is claimed elsewhere this
// much later.
const remoteWakeDelay = 25 * time.Millisecond

// remoteWake wakes the dispatcher remoteWakeDelay from now, unless a
// remote wake-up is already scheduled.
func (s *Store) remoteWake() {
	if s.remoteWakePending.CompareAndSwap(false, true) {
		time.AfterFunc(remoteWakeDelay, func() {
			s.remoteWakePending.Store(false)
			s.signalWake()
		})
	}
}

// now reads the clock at the precision PostgreSQL stores.
func (s *Store) now() time.Time { return s.opts.Now().Truncate(time.Microsecond) }

func (s *Store) logf(format string, args ...any) { s.opts.Logf(format, args...) }

// Close finishes the writes already submitted, stops the background work
// and removes the node's registration. Leases still held are kept (a
// restart of this node takes them back).
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.stop()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := s.pool.Exec(ctx, "DELETE FROM spool_nodes WHERE name = $1 AND instance = $2", s.node, s.instance); err != nil {
			s.closeErr = fmt.Errorf("postgres: deregister node: %w", err)
		}
		s.pool.Close()
	})
	return s.closeErr
}

// crash ends the handle as a killed process would end: no deregistration,
// and writes still queued fail. Tests use it.
func (s *Store) crash() {
	s.closeOnce.Do(func() {
		s.cancel()
		s.stop()
		s.pool.Close()
	})
}

// stop refuses new calls, lets the committers finish what was submitted,
// and stops the background goroutines.
func (s *Store) stop() {
	s.closeMu.Lock()
	s.closed = true
	s.closeMu.Unlock()
	s.calls.Wait()
	close(s.ops) // nobody sends any more: only calls do
	s.committersDone.Wait()
	s.cancel()
	s.wg.Wait()
	s.forget()
}

// enter registers a call in progress; it fails after Close. A call made
// from within another (a Walk callback) works until Close begins, and
// then fails rather than waits.
func (s *Store) enter() error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.closed {
		return store.ErrClosed
	}
	s.calls.Add(1)
	return nil
}

func (s *Store) leave() { s.calls.Done() }
