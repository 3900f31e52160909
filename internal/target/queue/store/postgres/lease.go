package postgres

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// claimSQL leases up to $2 messages due at $1, earliest first, to $3 until
// $4. SKIP LOCKED lets concurrent claims pass each other's rows; a row
// another claim took since this statement's snapshot is re-checked after
// its lock and dropped (its claimable_at moved to that lease's expiry).
// While leased, claimable_at is the lease expiry, so an expired lease is
// claimable like a due message.
const claimSQL = `
WITH c AS (
	SELECT id, claimable_at FROM spool_messages
	WHERE NOT held AND claimable_at <= $1 AND destination <> ALL($5)
	ORDER BY claimable_at, id
	LIMIT $2
	FOR UPDATE SKIP LOCKED
)` + claimUpdateSQL

// claimNextSQL leases the message of destination $5 due first, whatever
// its due time, as claimSQL leases due ones.
const claimNextSQL = `
WITH c AS (
	SELECT id, claimable_at FROM spool_messages
	WHERE NOT held AND destination = $5 AND (lease_owner IS NULL OR lease_expiry <= $1)
	ORDER BY claimable_at, id
	LIMIT $2
	FOR UPDATE SKIP LOCKED
)` + claimUpdateSQL

// claimUpdateSQL gives the rows a claim selected (c) their new lease and
// returns what claim reads: the metadata, the time each was claimable
// at, and the content (whose body is NULL when chunked).
const claimUpdateSQL = `
UPDATE spool_messages m SET
	lease_token = m.lease_token + 1, lease_owner = $3, lease_expiry = $4, claimable_at = $4, receiving = false
FROM c
WHERE m.id = c.id
RETURNING m.id, m.lease_token, m.meta, c.claimable_at, m.header, m.body`

// Claim leases up to max messages that are due, earliest due first,
// leaving out those of the destinations in skip. Entries whose metadata
// cannot be decoded are quarantined and skipped.
func (s *Store) Claim(ctx context.Context, max int, skip []string) ([]store.Claim, error) {
	if skip == nil {
		skip = []string{} // <> ALL of an empty array is true; of NULL, null
	}
	return s.claim(ctx, claimSQL, max, skip)
}

// ClaimNext leases the message of destination due first, whatever its
// due time.
func (s *Store) ClaimNext(ctx context.Context, destination string) (store.Claim, error) {
	cs, err := s.claim(ctx, claimNextSQL, 1, destination)
	if err != nil {
		return store.Claim{}, err
	}
	if len(cs) == 0 {
		return store.Claim{}, store.ErrNotFound
	}
	return cs[0], nil
}

// MakeDue makes every message of destination that is neither held nor
// leased due now. Only the columns claims read change: the stored
// metadata keeps its next attempt until the next save.
func (s *Store) MakeDue(ctx context.Context, destination string) (int, error) {
	if err := s.enter(); err != nil {
		return 0, err
	}
	defer s.leave()
	now := s.now()
	var n int
	var woke bool
	err := s.pool.QueryRow(ctx, `
		WITH d AS (
			UPDATE spool_messages SET next_attempt = $2, claimable_at = $2
			WHERE destination = $1 AND NOT held AND lease_owner IS NULL AND claimable_at > $2
			RETURNING 1
		)
		SELECT count(*), spool_wake($3, count(*) > 0) FROM d`, destination, now, s.channel).Scan(&n, &woke)
	if err != nil {
		return 0, fmt.Errorf("postgres: make %s due: %w", destination, err)
	}
	if n > 0 {
		s.signalWake()
	}
	return n, nil
}

// claim runs a claim statement (claimSQL or claimNextSQL, whose $5 is
// filter) and decodes what it leased.
func (s *Store) claim(ctx context.Context, sql string, max int, filter any) ([]store.Claim, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	if max <= 0 {
		return nil, nil
	}
	now := s.now()
	expiry := now.Add(s.opts.Lease)
	type row struct {
		id, token    int64
		meta         []byte
		due          time.Time
		header, body []byte
	}
	// Planned for each call, with its parameters, never from a statement
	// prepared once: PostgreSQL may give a prepared statement a generic
	// plan, and a generic plan of a claim, not knowing LIMIT $2, can read
	// every row of the due range, dead ones included, or join the claimed
	// rows by reading the whole table. Under a steady load that made each
	// claim read more pages the longer the load ran (measured with
	// spool-bench -pg-statements: 3 700 pages and 2.2 ms per claim after
	// an 8-second load, against 245 pages and 0.6 ms planned each time);
	// planning costs a fraction of that. QueryExecModeCacheDescribe sends
	// the statement unnamed with each call (so it is planned with its
	// parameters) and, knowing the result types from a cached
	// description, asks for binary results. QueryExecModeExec plans the
	// same way but returns text: the server hex-encodes each claimed body
	// and this side decodes it (both showed in CPU profiles of an enqueue
	// load).
	rows, _ := s.pool.Query(ctx, sql, pgx.QueryExecModeCacheDescribe, now, max, s.node, expiry, filter)
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		err := r.Scan(&x.id, &x.token, &x.meta, &x.due, &x.header, &x.body)
		return x, err
	})
	if err != nil {
		return nil, fmt.Errorf("postgres: claim: %w", err)
	}
	slices.SortFunc(got, func(a, b row) int {
		return cmp.Or(a.due.Compare(b.due), cmp.Compare(a.id, b.id))
	})
	claims := make([]store.Claim, 0, len(got))
	for _, x := range got {
		m, err := s.decode(ctx, x.id, x.meta)
		if err != nil {
			continue
		}
		if x.body != nil {
			s.claimed.keep(m.ID, x.header, x.body)
		}
		claims = append(claims, store.Claim{
			Lease:   &store.Lease{ID: m.ID, Owner: s.node, Token: uint64(x.token), Expiry: expiry},
			Message: m,
		})
	}
	return claims, nil
}

// decode decodes a row's metadata; damaged metadata is quarantined and
// reported as ErrCorrupt.
func (s *Store) decode(ctx context.Context, id int64, meta []byte) (*store.Message, error) {
	m, err := store.DecodeMeta(store.ID(id), meta)
	if err != nil {
		if !s.readOnly { // a Reader writes nothing; a node moves it aside
			s.quarantine(ctx, store.ID(id), err)
		}
		return nil, fmt.Errorf("%w: message %v: %v", store.ErrCorrupt, store.ID(id), err)
	}
	return m, nil
}

// ClaimID leases message id whatever its due time and held flag.
func (s *Store) ClaimID(ctx context.Context, id store.ID) (store.Claim, error) {
	if err := s.enter(); err != nil {
		return store.Claim{}, err
	}
	defer s.leave()
	now := s.now()
	expiry := now.Add(s.opts.Lease)
	var (
		token int64
		meta  []byte
	)
	err := s.pool.QueryRow(ctx, `
		UPDATE spool_messages SET
			lease_token = lease_token + 1, lease_owner = $2, lease_expiry = $3, claimable_at = $3, receiving = false
		WHERE id = $1 AND (lease_owner IS NULL OR lease_expiry <= $4)
		RETURNING lease_token, meta`, int64(id), s.node, expiry, now).Scan(&token, &meta)
	if errors.Is(err, pgx.ErrNoRows) {
		return store.Claim{}, s.whyNot(ctx, id, store.ErrLeased)
	}
	if err != nil {
		return store.Claim{}, fmt.Errorf("postgres: claim %v: %w", id, err)
	}
	m, err := s.decode(ctx, int64(id), meta)
	if err != nil {
		return store.Claim{}, err
	}
	return store.Claim{Lease: &store.Lease{ID: id, Owner: s.node, Token: uint64(token), Expiry: expiry}, Message: m}, nil
}

// whyNot tells why a conditional update of message id matched no row:
// ErrNotFound if there is no such message, otherwise ifExists.
func (s *Store) whyNot(ctx context.Context, id store.ID, ifExists error) error {
	var exists bool
	err := s.pool.QueryRow(ctx, "SELECT EXISTS (SELECT FROM spool_messages WHERE id = $1)", int64(id)).Scan(&exists)
	switch {
	case err != nil:
		return fmt.Errorf("postgres: message %v: %w", id, err)
	case !exists:
		return store.ErrNotFound
	}
	return ifExists
}

// Request records r for message id, which a valid lease holds.
func (s *Store) Request(ctx context.Context, id store.ID, r store.Request) error {
	if err := s.enter(); err != nil {
		return err
	}
	defer s.leave()
	if r < store.RequestHold || r > store.RequestBounce {
		return fmt.Errorf("postgres: unknown request %d", r)
	}
	tag, err := s.pool.Exec(ctx, `
		UPDATE spool_messages SET request = $2
		WHERE id = $1 AND lease_owner IS NOT NULL AND lease_expiry > $3`, int64(id), int16(r), s.now())
	if err != nil {
		return fmt.Errorf("postgres: request %v for %v: %w", r, id, err)
	}
	if tag.RowsAffected() == 0 {
		return s.whyNot(ctx, id, store.ErrNotLeased)
	}
	return nil
}

// renewSQL extends the leases given as (id, token) pairs to $3 (receiving
// leases to $4), locking the rows in ID order like the committers.
const renewSQL = `
WITH r AS (
	SELECT m.id FROM spool_messages m
	JOIN unnest($1::bigint[], $2::bigint[]) AS l(id, token) ON m.id = l.id AND m.lease_token = l.token
	WHERE m.lease_owner IS NOT NULL
	ORDER BY m.id
	FOR UPDATE OF m
)
UPDATE spool_messages m SET
	lease_expiry = CASE WHEN m.receiving THEN $4::timestamptz ELSE $3::timestamptz END,
	claimable_at = CASE WHEN m.receiving THEN $4::timestamptz ELSE $3::timestamptz END
FROM r
WHERE m.id = r.id
RETURNING m.id, m.receiving`

// Renew extends the leases to a full lease time from now and returns
// those no longer held.
func (s *Store) Renew(ctx context.Context, leases []*store.Lease) ([]*store.Lease, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	if len(leases) == 0 {
		return nil, nil
	}
	now := s.now()
	expiry, recvExpiry := now.Add(s.opts.Lease), now.Add(s.opts.ReceiveLease)
	var ids, tokens []int64
	stored := leases[:0:0]
	for _, l := range leases {
		if s.unsent.has(l.ID) {
			l.Expiry = recvExpiry // received in memory: nobody else can take it
			continue
		}
		ids, tokens = append(ids, int64(l.ID)), append(tokens, int64(l.Token))
		stored = append(stored, l)
	}
	if len(stored) == 0 {
		return nil, nil
	}
	rows, _ := s.pool.Query(ctx, renewSQL, ids, tokens, expiry, recvExpiry)
	renewed := map[int64]bool{} // ID: receiving
	var (
		id        int64
		receiving bool
	)
	_, err := pgx.ForEachRow(rows, []any{&id, &receiving}, func() error {
		renewed[id] = receiving
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("postgres: renew: %w", err)
	}
	var lost []*store.Lease
	for _, l := range stored {
		receiving, ok := renewed[int64(l.ID)]
		switch {
		case !ok:
			lost = append(lost, l)
			s.claimed.forget(l.ID)
		case receiving:
			l.Expiry = recvExpiry
		default:
			l.Expiry = expiry
		}
	}
	return lost, nil
}

// NextDue returns when the earliest message Claim could return falls due.
// This node's own leases are left out: it renews them while it works and
// ends them itself, and every write that ends one wakes this node's
// dispatcher (endLease), which then asks again.
func (s *Store) NextDue(ctx context.Context, skip []string) (time.Time, bool, error) {
	if err := s.enter(); err != nil {
		return time.Time{}, false, err
	}
	defer s.leave()
	if skip == nil {
		skip = []string{}
	}
	var due time.Time
	err := s.pool.QueryRow(ctx, `
		SELECT claimable_at FROM spool_messages
		WHERE NOT held AND lease_owner IS DISTINCT FROM $1 AND destination <> ALL($2)
		ORDER BY claimable_at, id LIMIT 1`, s.node, skip).Scan(&due)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return time.Time{}, false, nil
	case err != nil:
		return time.Time{}, false, fmt.Errorf("postgres: next due: %w", err)
	}
	return due, true, nil
}
