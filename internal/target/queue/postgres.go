package queue

import (
	"context"
	"fmt"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/postgres"
)

// openTimeout bounds the start-up connection to a shared store: an
// unreachable database fails maddy's start with a clear error rather than
// hanging it.
const openTimeout = 30 * time.Second

// openPostgres opens the shared PostgreSQL store of q's configuration.
func openPostgres(q *Queue) (store.Backend, error) {
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	defer cancel()
	st, err := postgres.Open(ctx, postgres.Options{
		DSN:          q.cfg.store.dsn,
		Node:         q.cfg.store.node,
		Lease:        q.cfg.store.lease,
		Now:          q.clock.Now,
		Logf:         q.Log.Printf,
		OnQuarantine: q.onQuarantine,
	})
	if err != nil {
		return nil, fmt.Errorf("store postgres (node %s): %w", q.cfg.store.node, err)
	}
	return st, nil
}
