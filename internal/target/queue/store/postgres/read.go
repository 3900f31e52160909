package postgres

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

const (
	// walkPage is how many rows one statement of Walk reads.
	walkPage = 256
	// readTimeout bounds the read of one content chunk.
	readTimeout = time.Minute
	// maxReason bounds the reason text kept in spool_quarantine.
	maxReason = 1000
)

// rowLease is what a row says about its lease.
type rowLease struct {
	owner     *string
	expiry    *time.Time
	token     int64
	receiving bool
	request   int16
}

// info returns the lease as Get and Walk show it: nil unless a lease is
// valid at now.
func (l *rowLease) info(now time.Time) *store.LeaseInfo {
	if l.owner == nil || l.expiry == nil || !l.expiry.After(now) {
		return nil
	}
	return &store.LeaseInfo{Owner: *l.owner, Expiry: *l.expiry, Token: uint64(l.token), Receiving: l.receiving, Request: store.Request(l.request)}
}

// Get reads one message's metadata, with its lease if leased.
func (s *Store) Get(ctx context.Context, id store.ID) (*store.Message, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	var (
		meta []byte
		l    rowLease
	)
	err := s.pool.QueryRow(ctx, `
		SELECT meta, lease_owner, lease_expiry, lease_token, receiving, request FROM spool_messages WHERE id = $1`,
		int64(id)).Scan(&meta, &l.owner, &l.expiry, &l.token, &l.receiving, &l.request)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return nil, store.ErrNotFound
	case err != nil:
		return nil, fmt.Errorf("postgres: get %v: %w", id, err)
	}
	m, err := s.decode(ctx, int64(id), meta)
	if err != nil {
		return nil, err
	}
	m.Lease = l.info(s.now())
	return m, nil
}

// Walk calls fn for every message in ID order, a page of rows at a time,
// each page its own statement: no transaction spans the walk, and no
// connection is held while fn runs.
func (s *Store) Walk(ctx context.Context, fn func(*store.Message) error) error {
	if err := s.enter(); err != nil {
		return err
	}
	defer s.leave()
	type row struct {
		id   int64
		meta []byte
		l    rowLease
	}
	var after int64
	for {
		rows, _ := s.pool.Query(ctx, `
			SELECT id, meta, lease_owner, lease_expiry, lease_token, receiving, request FROM spool_messages
			WHERE id > $1 ORDER BY id LIMIT $2`, after, walkPage)
		page, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
			var x row
			err := r.Scan(&x.id, &x.meta, &x.l.owner, &x.l.expiry, &x.l.token, &x.l.receiving, &x.l.request)
			return x, err
		})
		if err != nil {
			return fmt.Errorf("postgres: walk: %w", err)
		}
		now := s.now()
		for _, x := range page {
			after = x.id
			m, err := s.decode(ctx, x.id, x.meta)
			if err != nil {
				continue
			}
			m.Lease = x.l.info(now)
			if err := fn(m); err != nil {
				return err
			}
		}
		if len(page) < walkPage {
			return nil
		}
	}
}

// Stats returns the figures of the whole queue in one statement: a
// sequential scan of spool_messages (see the package documentation).
func (s *Store) Stats(ctx context.Context) (store.Stats, error) {
	if err := s.enter(); err != nil {
		return store.Stats{}, err
	}
	defer s.leave()
	var (
		st     store.Stats
		oldest *time.Time
	)
	err := s.pool.QueryRow(ctx, `
		SELECT count(*), coalesce(sum(pending), 0), count(*) FILTER (WHERE held), min(arrival)
		FROM spool_messages
		WHERE NOT receiving OR lease_expiry <= $1`, s.now()).Scan(&st.Messages, &st.Recipients, &st.Held, &oldest)
	if err != nil {
		return store.Stats{}, fmt.Errorf("postgres: stats: %w", err)
	}
	if oldest != nil {
		st.Oldest = *oldest
	}
	return st, nil
}

// Content opens the stored content of m. The header and a body kept
// inline are read now; a chunked body is read chunk by chunk as it is
// consumed.
func (s *Store) Content(ctx context.Context, m *store.Message) (store.Content, error) {
	if err := s.enter(); err != nil {
		return store.Content{}, err
	}
	defer s.leave()
	if c, ok := s.claimed.take(m.ID); ok {
		return c, nil
	}
	var (
		header, body []byte
		bodyLen      int64
	)
	err := s.pool.QueryRow(ctx, "SELECT header, body, body_len FROM spool_messages WHERE id = $1",
		int64(m.ID)).Scan(&header, &body, &bodyLen)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return store.Content{}, store.ErrNotFound
	case err != nil:
		return store.Content{}, fmt.Errorf("postgres: content of %v: %w", m.ID, err)
	}
	if header == nil {
		header = []byte{}
	}
	if body != nil {
		return store.Content{Header: header, Body: inlineBody(body)}, nil
	}
	return store.Content{Header: header, Body: &chunkedBody{s: s, id: int64(m.ID), len: bodyLen}}, nil
}

// claimedContent is the content of inline messages this handle claimed.
// A claim returns each message's header and inline body with its
// metadata (they are in the row it updates anyway), so the attempt that
// follows reads its content from here rather than with a statement of
// its own: one statement per delivered message less. Content never
// changes once a message is stored, so what the claim read is current.
// An entry lives until Content takes it or the lease ends (Save,
// Release, Delete, a lost Renew); so at most the messages this node holds
// are kept, each at most InlineLimit.
type claimedContent struct {
	mu sync.Mutex
	m  map[store.ID]store.Content
}

func (c *claimedContent) keep(id store.ID, header, body []byte) {
	if header == nil {
		header = []byte{}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[store.ID]store.Content{}
	}
	c.m[id] = store.Content{Header: header, Body: inlineBody(body)}
}

// take returns and forgets the content kept for id.
func (c *claimedContent) take(id store.ID) (store.Content, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	content, ok := c.m[id]
	delete(c.m, id)
	return content, ok
}

func (c *claimedContent) forget(id store.ID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, id)
}

// inlineBody is a body kept in its message row.
type inlineBody []byte

func (b inlineBody) Open() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
func (b inlineBody) Len() int                     { return len(b) }
func (inlineBody) Remove() error                  { return nil }

// chunkedBody is a body kept in spool_chunks.
type chunkedBody struct {
	s   *Store
	id  int64
	len int64
}

func (b *chunkedBody) Open() (io.ReadCloser, error) {
	return &chunkReader{s: b.s, id: b.id, left: b.len}, nil
}
func (b *chunkedBody) Len() int    { return int(b.len) }
func (*chunkedBody) Remove() error { return nil }

// chunkReader reads a chunked body one chunk (one statement) at a time,
// into one reused buffer; no connection is held between chunks.
type chunkReader struct {
	s    *Store
	id   int64
	seq  int32
	left int64 // bytes not yet fetched
	buf  []byte
	cur  []byte // fetched, not yet read
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.cur) == 0 {
		if r.left == 0 {
			return 0, io.EOF
		}
		if err := r.fetch(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.cur)
	r.cur = r.cur[n:]
	return n, nil
}

func (r *chunkReader) fetch() error {
	ctx, cancel := context.WithTimeout(r.s.ctx, readTimeout)
	defer cancel()
	rows, _ := r.s.pool.Query(ctx, "SELECT data FROM spool_chunks WHERE message_id = $1 AND seq = $2", r.id, r.seq)
	found := false
	for rows.Next() {
		var d pgtype.DriverBytes // valid until rows.Next: copied at once
		if err := rows.Scan(&d); err != nil {
			rows.Close()
			return fmt.Errorf("postgres: content of %v: %w", store.ID(r.id), err)
		}
		r.buf = append(r.buf[:0], d...)
		found = true
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("postgres: content of %v: %w", store.ID(r.id), err)
	}
	if !found || len(r.buf) == 0 || int64(len(r.buf)) > r.left {
		return fmt.Errorf("postgres: content of %v: chunk %d missing or of the wrong size (the message was removed, or its content is damaged)",
			store.ID(r.id), r.seq)
	}
	r.cur = r.buf
	r.left -= int64(len(r.buf))
	r.seq++
	return nil
}

func (r *chunkReader) Close() error { return nil }

const quarantineSQL = `
WITH q AS (DELETE FROM spool_messages WHERE id = $1 RETURNING *)
INSERT INTO spool_quarantine (id, meta, header, body, body_len, chunked, arrival, next_attempt, held,
	lease_owner, lease_token, request, reason, quarantined_at, quarantined_by)
SELECT id, meta, header, body, body_len, body IS NULL, arrival, next_attempt, held,
	lease_owner, lease_token, request, $2, $3, $4
FROM q`

// Quarantine moves message id to spool_quarantine with the reason.
func (s *Store) Quarantine(ctx context.Context, id store.ID, reason error) {
	if s.enter() != nil {
		return
	}
	defer s.leave()
	s.quarantine(ctx, id, reason)
}

// quarantine moves the row of message id, as it is, to spool_quarantine
// (its chunks stay in spool_chunks under the same ID), and tells
// OnQuarantine. If the move fails, the row stays and is met again.
func (s *Store) quarantine(ctx context.Context, id store.ID, reason error) {
	if reason == nil {
		reason = errors.New("no reason given")
	}
	text := reason.Error()
	if len(text) > maxReason {
		text = strings.ToValidUTF8(text[:maxReason], "") + "...(cut)"
	}
	tag, err := s.pool.Exec(ctx, quarantineSQL, int64(id), text, s.now(), s.node)
	if err != nil {
		s.logf("spool: cannot quarantine message %v (%v): %v; it stays and is met again", id, text, err)
		return
	}
	if tag.RowsAffected() == 0 {
		return // gone already
	}
	s.logf("spool: moved message %v to spool_quarantine: %v", id, text)
	if s.opts.OnQuarantine != nil {
		s.opts.OnQuarantine(id, reason)
	}
}
