package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/postgres"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// PGServer is the throwaway PostgreSQL cluster the SpoolPG measurements
// run against: on this machine, on the same disk as everything else, with
// PostgreSQL's default durability (fsync and synchronous_commit on) unless
// settings say otherwise. Every measurement gets a database of its own.
type PGServer struct {
	c *pgtest.Cluster

	mu  sync.Mutex
	seq int
	// names maps the DSNs handed out to their database names.
	names map[string]string
}

// StartPG creates and starts a cluster (see pgtest.New); settings are
// extra postgresql.conf lines.
func StartPG(settings []string) (*PGServer, error) {
	c, err := pgtest.New(pgtest.Options{Settings: settings})
	if err != nil {
		return nil, err
	}
	return &PGServer{c: c, names: map[string]string{}}, nil
}

// NewDatabase creates an empty database, named after label, and returns
// its DSN.
func (p *PGServer) NewDatabase(label string) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seq++
	var name strings.Builder
	fmt.Fprintf(&name, "b%03d_", p.seq)
	for _, r := range strings.ToLower(label) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			name.WriteRune(r)
		} else {
			name.WriteByte('_')
		}
	}
	n := name.String()
	if len(n) > 60 {
		n = n[:60]
	}
	dsn, err := p.c.CreateDatabase(n)
	if err != nil {
		return "", err
	}
	p.names[dsn] = n
	return dsn, nil
}

// DropDatabase removes a database NewDatabase created, closing the
// connections still open to it.
func (p *PGServer) DropDatabase(dsn string) error {
	p.mu.Lock()
	n, ok := p.names[dsn]
	delete(p.names, dsn)
	p.mu.Unlock()
	if !ok {
		return fmt.Errorf("bench: no database was created for %q", dsn)
	}
	_, err := p.c.Psql("postgres", "DROP DATABASE IF EXISTS "+n+" WITH (FORCE)")
	return err
}

// Restart stops the server cleanly (a shutdown checkpoint writes every
// dirty buffer), drops its files from the page cache if evict is set, and
// starts it again: the next reader finds neither PostgreSQL's buffers nor
// the kernel's cache warm.
func (p *PGServer) Restart(evict bool) error {
	if err := p.c.Stop("fast"); err != nil {
		return err
	}
	if evict {
		if err := EvictCache(p.c.SocketDir()); err != nil {
			return err
		}
	}
	return p.c.Start()
}

// Close stops the server and removes its files.
func (p *PGServer) Close() error { return p.c.Close() }

// admin runs fn on a connection to the server's "postgres" database,
// within 10 seconds. The bench never queries the store's tables: only the
// server's settings and statistics views.
func (p *PGServer) admin(fn func(ctx context.Context, conn *pgx.Conn) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.c.DSN("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return fn(ctx, conn)
}

// Describe says which server runs and with which durability settings.
func (p *PGServer) Describe() (string, error) {
	var parts []string
	err := p.admin(func(ctx context.Context, conn *pgx.Conn) error {
		for _, name := range []string{"server_version", "fsync", "synchronous_commit", "full_page_writes",
			"wal_sync_method", "shared_buffers", "max_wal_size"} {
			var v string
			if err := conn.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&v); err != nil {
				return err
			}
			parts = append(parts, name+"="+v)
		}
		return nil
	})
	return "PostgreSQL " + strings.Join(parts, " ") + ", data in " + p.c.SocketDir(), err
}

// StatementsSetting is the postgresql.conf line that loads
// pg_stat_statements, for EnableStatements.
const StatementsSetting = "shared_preload_libraries = 'pg_stat_statements'"

// EnableStatements creates the pg_stat_statements view (the server must
// run with StatementsSetting) and clears it.
func (p *PGServer) EnableStatements() error {
	_, err := p.c.Psql("postgres", "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
	if err == nil {
		err = p.ResetStatements()
	}
	return err
}

// ResetStatements clears pg_stat_statements.
func (p *PGServer) ResetStatements() error {
	_, err := p.c.Psql("postgres", "SELECT pg_stat_statements_reset()")
	return err
}

// TopStatements lists the n statements of every database that took the
// most execution time since the last reset: calls, total and mean time,
// rows, shared buffers read per call (a statement whose pages per call
// grow with the queue's history is wading through dead rows), and the
// statement (whitespace folded, cut to 110 characters).
// Execution time leaves out the commit's WAL flush.
func (p *PGServer) TopStatements(n int) (string, error) {
	var b strings.Builder
	err := p.admin(func(ctx context.Context, conn *pgx.Conn) error {
		rows, err := conn.Query(ctx, `
			SELECT calls, total_exec_time, mean_exec_time, rows,
				(shared_blks_hit + shared_blks_read) / greatest(calls, 1), query
			FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT $1`, n)
		if err != nil {
			return err
		}
		defer rows.Close()
		fmt.Fprintf(&b, "%10s %12s %9s %10s %11s  %s\n", "calls", "total ms", "mean ms", "rows", "pages/call", "statement")
		for rows.Next() {
			var (
				calls, nrows, pages int64
				total, mean         float64
				query               string
			)
			if err := rows.Scan(&calls, &total, &mean, &nrows, &pages, &query); err != nil {
				return err
			}
			query = strings.Join(strings.Fields(query), " ")
			if len(query) > 110 {
				query = query[:110] + "..."
			}
			fmt.Fprintf(&b, "%10d %12.0f %9.3f %10d %11d  %s\n", calls, total, mean, nrows, pages, query)
		}
		return rows.Err()
	})
	return b.String(), err
}

// PGSample is a reading of the server's counters.
type PGSample struct {
	// CPU is the CPU time of all the server's processes so far.
	CPU time.Duration
	// WALSyncs counts WAL flushes to disk (pg_stat_wal.wal_sync): about
	// one per group commit.
	WALSyncs int64
}

// Sub is the difference of two samples.
func (s PGSample) Sub(o PGSample) PGSample {
	return PGSample{CPU: s.CPU - o.CPU, WALSyncs: s.WALSyncs - o.WALSyncs}
}

// Sample reads the server's CPU time and WAL flush count. Backends report
// WAL statistics when they go idle (at most once a second) or exit, so
// take the later sample after the load's connections closed.
func (p *PGServer) Sample() (PGSample, error) {
	var s PGSample
	var err error
	if s.CPU, err = p.serverCPU(); err != nil {
		return s, err
	}
	err = p.admin(func(ctx context.Context, conn *pgx.Conn) error {
		return conn.QueryRow(ctx, "SELECT wal_sync FROM pg_stat_wal").Scan(&s.WALSyncs)
	})
	return s, err
}

// serverCPU is the CPU time of all the server's processes so far.
func (p *PGServer) serverCPU() (time.Duration, error) {
	pid, err := p.postmasterPID()
	if err != nil {
		return 0, err
	}
	return TreeCPU(pid)
}

// postmasterPID reads the PID from the lock file PostgreSQL keeps beside
// its Unix socket (its first line).
func (p *PGServer) postmasterPID() (int, error) {
	data, err := os.ReadFile(filepath.Join(p.c.SocketDir(), fmt.Sprintf(".s.PGSQL.%d.lock", pgtest.Port)))
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(data), "\n")
	return strconv.Atoi(strings.TrimSpace(line))
}

// generatePG stores b through the PostgreSQL store's own API, Create then
// Commit per message from generateWorkers goroutines (so the store's
// group commit batches them), and checkpoints the database.
func generatePG(dsn string, b Backlog) error {
	ctx := context.Background()
	st, err := postgres.Open(ctx, postgres.Options{DSN: dsn, Node: "bench-generator", Logf: func(string, ...any) {}})
	if err != nil {
		return err
	}
	genErr := generateMessages(b, func(m *store.Message, hdr, body []byte) error {
		l, err := st.Create(ctx, m, hdr, bytes.NewReader(body), int64(len(body)))
		if err != nil {
			return err
		}
		_, err = st.Commit(ctx, l)
		return err
	})
	if err := st.Close(); genErr == nil {
		genErr = err
	}
	if genErr != nil {
		return genErr
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "CHECKPOINT")
	return err
}
