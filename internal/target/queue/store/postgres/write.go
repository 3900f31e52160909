package postgres

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Group commit. Every Commit, Save, Release and Delete is an op handed
// to the committers. A committer takes whatever ops are waiting (up to
// maxBatch) and sends them as one pgx batch: one round trip, one implicit
// transaction, one commit and so one WAL flush for all of them. Each op is
// fenced on its own inside the batch; a fenced write that matches no row
// is that op's ErrLeaseLost, not a failure of the batch. Each caller
// returns once the batch committed.
const (
	// committers is how many batches can be in flight at once: while one
	// waits for its commit, the next collects ops.
	committers = 2
	// maxBatch bounds the ops of one batch (and so the memory of small
	// messages held for it: maxBatch * InlineLimit).
	maxBatch = 128
	// writeTimeout bounds one batch against a server that stopped
	// answering; callers give up earlier with their own context.
	writeTimeout = time.Minute
)

// op is one write of a batch.
type op struct {
	ctx context.Context
	// id orders the ops of a batch (0 for a new message), so that
	// concurrent batches and Renew lock rows in one order: no deadlocks.
	id store.ID
	// queue adds the op's statements to b; their callbacks record the
	// outcome in the op (err, wake) or in the caller's variables.
	queue func(b *pgx.Batch, o *op)
	err   error // the op's own outcome, e.g. ErrLeaseLost
	wake  bool  // the op made a message claimable now
	done  chan error
}

// submit hands o to a committer and waits until its batch committed.
// The caller has entered.
func (s *Store) submit(ctx context.Context, o *op) error {
	o.ctx = ctx
	o.done = make(chan error, 1)
	select {
	case s.ops <- o:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-o.done:
		return err
	case <-ctx.Done():
		// The op may still commit: see the package documentation.
		return ctx.Err()
	}
}

func (s *Store) committer() {
	defer s.committersDone.Done()
	for o := range s.ops {
		batch := append(make([]*op, 0, maxBatch), o)
	fill:
		for len(batch) < maxBatch {
			select {
			case o, ok := <-s.ops:
				if !ok {
					break fill
				}
				batch = append(batch, o)
			default:
				break fill
			}
		}
		s.runBatch(batch)
	}
}

func (s *Store) runBatch(ops []*op) {
	live := ops[:0]
	for _, o := range ops {
		if err := o.ctx.Err(); err != nil {
			o.done <- err // its caller has gone: never write it
			continue
		}
		live = append(live, o)
	}
	if len(live) == 0 {
		return
	}
	slices.SortFunc(live, func(a, b *op) int { return cmp.Compare(a.id, b.id) })
	s.runPart(live)
}

// runPart sends ops as one batch.
func (s *Store) runPart(ops []*op) {
	err := s.execBatch(ops)
	var pgErr *pgconn.PgError
	if err != nil && len(ops) > 1 && errors.As(err, &pgErr) {
		// The server refused a statement and rolled the batch back:
		// run each op alone, so that only the bad one fails.
		for _, o := range ops {
			s.finish([]*op{o}, s.execBatch([]*op{o}))
		}
		return
	}
	s.finish(ops, err)
}

// lazyCommitSQL makes the commit of the transaction it runs in return
// without waiting for its WAL to reach disk (see createChunked).
const lazyCommitSQL = "SELECT set_config('synchronous_commit', 'off', true)"

func (s *Store) execBatch(ops []*op) error {
	if s.opts.onBatch != nil {
		s.opts.onBatch(ops)
	}
	b := &pgx.Batch{}
	for _, o := range ops {
		o.err, o.wake = nil, false
		o.queue(b, o)
	}
	s.batches.Add(1)
	ctx, cancel := context.WithTimeout(s.ctx, writeTimeout)
	defer cancel()
	if err := s.pool.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("postgres: write: %w", err)
	}
	return nil
}

func (s *Store) finish(ops []*op, err error) {
	woke := false
	for _, o := range ops {
		if err != nil {
			o.done <- err
			continue
		}
		woke = woke || o.wake
		o.done <- o.err
	}
	if woke {
		s.signalWake()
	}
}

// insertReceivingSQL inserts a message being received (createChunked).
const insertReceivingSQL = `
INSERT INTO spool_messages (meta, arrival, next_attempt, claimable_at, held, pending, receiving,
	lease_owner, lease_expiry, lease_token, header, body, body_len, destination)
VALUES ($1, $2, $3, $4, $5, $6, true, $7, $4, 1, $8, NULL, $9, $10)
RETURNING id`

// insertQueuedSQL inserts a message received in memory (Create), queued:
// no lease, claimable at its next attempt, token 1 as its receiving lease
// had. spool_wake notifies $11 when it is claimable now ($12).
const insertQueuedSQL = `
INSERT INTO spool_messages (id, meta, arrival, next_attempt, claimable_at, held, pending, receiving,
	lease_token, header, body, body_len, destination)
VALUES ($1, $2, $3, $4, $4, $5, $6, false, 1, $7, $8, $9, $10)
RETURNING spool_wake($11, NOT $5 AND $4 <= $12)`

// Create stores a new message leased to the caller until Commit.
//
// A message whose content fits InlineLimit is kept in this handle's
// memory until Commit, which inserts it already queued: one write per
// message, in a group commit with other sessions' writes, and one wait
// for the disk. Until then no other node sees it (Get, Walk and Request
// do not find it), and a crash of this node loses it, which costs nothing
// promised: its client has not been answered and sends it again. Its ID
// comes from a block this handle reserved from spool_message_ids.
//
// A larger message is streamed into spool_chunks as it is read, in a
// transaction of its own that commits lazily: it does not wait for its
// WAL to reach disk (synchronous_commit off, for that transaction alone).
// Such a message is visible to every node at once and outlives a crash
// of this node, as a receiving lease, and a crash of the database
// server's processes (its WAL is then in the operating system's cache);
// only a crash of the database's machine (power, kernel) before the WAL
// writer's next flush (wal_writer_delay, 200 ms by default) can lose it,
// and then its client has not been answered yet either. Commit waits for
// its flush, and a flush writes all the WAL before it, Create's included:
// when Commit returns the message is durable.
func (s *Store) Create(ctx context.Context, m *store.Message, header []byte, body io.Reader, bodyLen int64) (*store.Lease, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	if bodyLen < 0 {
		return nil, fmt.Errorf("postgres: negative body length %d", bodyLen)
	}
	m.HeaderLen, m.BodyLen = int64(len(header)), bodyLen
	meta, err := store.EncodeMeta(m)
	if err != nil {
		return nil, fmt.Errorf("postgres: encode metadata: %w", err)
	}
	expiry := s.now().Add(s.opts.ReceiveLease)
	if int64(len(header))+bodyLen > s.opts.InlineLimit {
		args := []any{meta, m.Arrival, m.NextAttempt, expiry, m.Held, len(m.Pending()), s.node, header, bodyLen, m.Destination}
		id, err := s.createChunked(ctx, args, body, bodyLen)
		if err != nil {
			return nil, err
		}
		m.ID = store.ID(id)
		return &store.Lease{ID: m.ID, Owner: s.node, Token: 1, Expiry: expiry}, nil
	}
	inline := make([]byte, bodyLen)
	if _, err := io.ReadFull(body, inline); err != nil {
		return nil, fmt.Errorf("postgres: read body: %w", err)
	}
	id, err := s.unsent.reserveID(ctx, s.pool)
	if err != nil {
		return nil, fmt.Errorf("postgres: reserve a message ID: %w", err)
	}
	m.ID = id
	s.unsent.keep(id, []any{int64(id), meta, m.Arrival, m.NextAttempt, m.Held, len(m.Pending()),
		header, inline, bodyLen, m.Destination})
	return &store.Lease{ID: m.ID, Owner: s.node, Token: 1, Expiry: expiry}, nil
}

// idBlock is how many message IDs a handle reserves at a time for the
// messages it receives in memory. IDs of a block not used before the
// handle closes are skipped, as a sequence's are after a rollback.
const idBlock = 64

// unsent holds the messages this handle receives in memory, from Create
// to Commit or Delete (see Create), and the IDs reserved for them.
type unsent struct {
	mu   sync.Mutex
	rows map[store.ID][]any // insertQueuedSQL's $1..$10
	// idMu guards ids apart from rows: a Commit does not wait while a
	// Create reserves the next block.
	idMu sync.Mutex
	ids  []store.ID
}

// reserveID returns an ID from the reserved block, reserving the next
// block when it is used up.
func (u *unsent) reserveID(ctx context.Context, pool *pgxpool.Pool) (store.ID, error) {
	u.idMu.Lock()
	defer u.idMu.Unlock()
	if len(u.ids) == 0 {
		// txid_current() gives the statement a transaction ID, so that
		// its commit waits for the WAL flush as a write's does. nextval
		// alone commits without waiting; the WAL writer flushes it
		// within milliseconds, but a crash of the database's machine
		// in that window would hand the block out again, to another
		// node. (TestPowerLossKeepsReservedIDs checks a block across a
		// power cut; a cut inside that window cannot be aimed at from
		// outside the server.)
		rows, _ := pool.Query(ctx,
			"SELECT nextval('spool_message_ids') FROM generate_series(1, $1), txid_current()", idBlock)
		ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return 0, err
		}
		for _, id := range ids {
			u.ids = append(u.ids, store.ID(id))
		}
	}
	id := u.ids[0]
	u.ids = u.ids[1:]
	return id, nil
}

func (u *unsent) keep(id store.ID, row []any) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.rows == nil {
		u.rows = make(map[store.ID][]any)
	}
	u.rows[id] = row
}

// take removes and returns the row of message id, if it is held here.
func (u *unsent) take(id store.ID) ([]any, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	row, ok := u.rows[id]
	delete(u.rows, id)
	return row, ok
}

func (u *unsent) has(id store.ID) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	_, ok := u.rows[id]
	return ok
}

// createChunked inserts the message row and COPYs the body into
// spool_chunks, one chunk in memory at a time, in one transaction.
func (s *Store) createChunked(ctx context.Context, args []any, body io.Reader, bodyLen int64) (int64, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("postgres: write: %w", err)
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(ctx, lazyCommitSQL); err != nil {
		return 0, fmt.Errorf("postgres: write: %w", err)
	}
	var id int64
	if err := tx.QueryRow(ctx, insertReceivingSQL, args...).Scan(&id); err != nil {
		return 0, fmt.Errorf("postgres: write: %w", err)
	}
	src := &chunkSource{id: id, r: body, left: bodyLen, buf: make([]byte, min(bodyLen, chunkSize))}
	if _, err := tx.CopyFrom(ctx, pgx.Identifier{"spool_chunks"}, []string{"message_id", "seq", "data"}, src); err != nil {
		if src.err != nil {
			return 0, fmt.Errorf("postgres: read body: %w", src.err)
		}
		return 0, fmt.Errorf("postgres: write content: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("postgres: write: %w", err)
	}
	return id, nil
}

// chunkSource feeds CopyFrom the body, chunkSize bytes at a time, through
// one reused buffer (pgx encodes each row before asking for the next).
type chunkSource struct {
	id   int64
	r    io.Reader
	left int64
	seq  int32
	buf  []byte
	n    int
	err  error
}

func (c *chunkSource) Next() bool {
	if c.left == 0 || c.err != nil {
		return false
	}
	c.n = int(min(c.left, int64(len(c.buf))))
	if _, err := io.ReadFull(c.r, c.buf[:c.n]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		c.err = err
		return false
	}
	c.left -= int64(c.n)
	c.seq++
	return true
}

func (c *chunkSource) Values() ([]any, error) { return []any{c.id, c.seq - 1, c.buf[:c.n]}, nil }

func (c *chunkSource) Err() error { return c.err }

// endLeaseSQL ends the lease $1/$2 (fenced), writing the new state given
// in $3..$7 (NULL keeps the stored value). If a request was recorded, it
// is cleared and returned, and the lease kept. spool_wake notifies $8
// when the message is claimable now ($9).
const endLeaseSQL = `
WITH old AS (
	SELECT id, request FROM spool_messages
	WHERE id = $1 AND lease_token = $2 AND lease_owner IS NOT NULL
	FOR UPDATE
)
UPDATE spool_messages m SET
	meta         = coalesce($3, m.meta),
	arrival      = coalesce($4, m.arrival),
	next_attempt = coalesce($5, m.next_attempt),
	held         = coalesce($6, m.held),
	pending      = coalesce($7, m.pending),
	destination  = coalesce($10, m.destination),
	receiving    = false,
	request      = 0,
	lease_owner  = CASE WHEN old.request = 0 THEN NULL ELSE m.lease_owner END,
	lease_expiry = CASE WHEN old.request = 0 THEN NULL ELSE m.lease_expiry END,
	claimable_at = CASE WHEN old.request = 0 THEN coalesce($5, m.next_attempt) ELSE m.claimable_at END
FROM old
WHERE m.id = old.id
RETURNING old.request, spool_wake($8, old.request = 0 AND NOT m.held AND m.claimable_at <= $9)`

// endLease submits endLeaseSQL for l; m is nil to keep the message as
// stored.
func (s *Store) endLease(ctx context.Context, l *store.Lease, m *store.Message) (store.Request, error) {
	if err := s.enter(); err != nil {
		return 0, err
	}
	defer s.leave()
	s.claimed.forget(l.ID)
	args := []any{int64(l.ID), int64(l.Token), nil, nil, nil, nil, nil, s.channel, s.now(), nil}
	if m != nil {
		meta, err := store.EncodeMeta(m)
		if err != nil {
			return 0, fmt.Errorf("postgres: encode metadata: %w", err)
		}
		args[2], args[3], args[4], args[5], args[6] = meta, m.Arrival, m.NextAttempt, m.Held, len(m.Pending())
		args[9] = m.Destination
	}
	var req int16
	err := s.submit(ctx, &op{id: l.ID, queue: func(b *pgx.Batch, o *op) {
		b.Queue(endLeaseSQL, args...).QueryRow(func(r pgx.Row) error {
			err := r.Scan(&req, &o.wake)
			if errors.Is(err, pgx.ErrNoRows) {
				o.err = store.ErrLeaseLost
				return nil
			}
			return err
		})
	}})
	if err != nil {
		return 0, err
	}
	// The message's new due time may be the earliest this node knows
	// of; its dispatcher asks again (other nodes are notified by the
	// statement when it is due now).
	s.signalWake()
	return store.Request(req), nil
}

// Commit ends a receiving lease: the message is queued. A message
// received in memory is inserted now.
func (s *Store) Commit(ctx context.Context, l *store.Lease) (store.Request, error) {
	row, ok := s.unsent.take(l.ID)
	if !ok {
		return s.endLease(ctx, l, nil)
	}
	if err := s.enter(); err != nil {
		return 0, err
	}
	defer s.leave()
	row = append(row, s.channel, s.now())
	err := s.submit(ctx, &op{id: l.ID, queue: func(b *pgx.Batch, o *op) {
		b.Queue(insertQueuedSQL, row...).QueryRow(func(r pgx.Row) error { return r.Scan(&o.wake) })
	}})
	if err != nil {
		return 0, err
	}
	s.signalWake() // see endLease
	return 0, nil
}

// Save writes m and ends l (or keeps it and returns a recorded request).
func (s *Store) Save(ctx context.Context, l *store.Lease, m *store.Message) (store.Request, error) {
	return s.endLease(ctx, l, m)
}

// Release ends l without changing the message (or keeps it and returns a
// recorded request).
func (s *Store) Release(ctx context.Context, l *store.Lease) (store.Request, error) {
	return s.endLease(ctx, l, nil)
}

const deleteSQL = `
WITH d AS (
	DELETE FROM spool_messages
	WHERE id = $1 AND lease_token = $2 AND lease_owner IS NOT NULL
	RETURNING id, body IS NULL AS chunked
), c AS (
	DELETE FROM spool_chunks WHERE message_id = (SELECT id FROM d WHERE chunked)
)
SELECT count(*) FROM d`

// Delete removes the message held under l, with its content.
func (s *Store) Delete(ctx context.Context, l *store.Lease) error {
	if err := s.enter(); err != nil {
		return err
	}
	defer s.leave()
	s.claimed.forget(l.ID)
	if _, ok := s.unsent.take(l.ID); ok {
		return nil // received in memory: nothing was written
	}
	return s.submit(ctx, &op{id: l.ID, queue: func(b *pgx.Batch, o *op) {
		b.Queue(deleteSQL, int64(l.ID), int64(l.Token)).QueryRow(func(r pgx.Row) error {
			var n int
			if err := r.Scan(&n); err != nil {
				return err
			}
			if n == 0 {
				o.err = store.ErrLeaseLost
			}
			return nil
		})
	}})
}
