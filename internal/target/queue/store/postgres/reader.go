package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Reader reads a PostgreSQL spool without taking part in it: it registers
// no node, takes no lease and writes nothing, so `maddy spool list`, `show`
// and `stats` can read a cluster's queue from any machine while no maddy
// runs there.
type Reader struct {
	s *Store
}

// OpenReader connects to the spool at dsn for reading.
func OpenReader(ctx context.Context, dsn string) (*Reader, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	cfg.MaxConns = 2
	s := &Store{opts: Options{Now: time.Now, Logf: func(string, ...any) {}}, readOnly: true}
	s.pool, err = pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	var v int
	err = s.pool.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM spool_schema`).Scan(&v)
	switch {
	case err != nil:
		err = fmt.Errorf("postgres: read schema version (is this a spool database?): %w", err)
	case v > schemaVersion:
		err = fmt.Errorf("postgres: schema version %d is newer than this build supports (%d); use a newer maddy", v, schemaVersion)
	}
	if err != nil {
		s.pool.Close()
		return nil, err
	}
	return &Reader{s}, nil
}

// Get reads one message (see Store.Get).
func (r *Reader) Get(id store.ID) (*store.Message, error) { return r.s.Get(context.Background(), id) }

// Walk reads every message (see Store.Walk).
func (r *Reader) Walk(fn func(*store.Message) error) error {
	return r.s.Walk(context.Background(), fn)
}

// Content opens a message's content (see Store.Content).
func (r *Reader) Content(m *store.Message) (store.Content, error) {
	return r.s.Content(context.Background(), m)
}

// Close disconnects.
func (r *Reader) Close() error {
	r.s.pool.Close()
	return nil
}
