package postgres

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// The listener reconnects after minBackoff, doubling up to
	// maxBackoff, with jitter.
	minBackoff = 50 * time.Millisecond
	maxBackoff = 5 * time.Second
	// listenPing is how long the listener waits for a notification
	// before it checks that its connection still answers.
	listenPing = 15 * time.Second
	// connectTimeout bounds one connection attempt of the listener.
	connectTimeout = 10 * time.Second
)

// listen keeps a dedicated connection LISTENing on the channel and signals
// Wake on every notification, reconnecting with backoff when the
// connection drops. first is closed after the first attempt to listen.
func (s *Store) listen(first chan struct{}) {
	defer s.wg.Done()
	signalFirst := func() {
		if first != nil {
			close(first)
			first = nil
		}
	}
	defer signalFirst()
	backoff := minBackoff
	down := false
	for s.ctx.Err() == nil {
		conn, err := s.listenConn()
		if err != nil {
			signalFirst()
			if s.ctx.Err() != nil {
				return
			}
			if !down {
				s.logf("spool: cannot listen for wake-ups: %v; polling every %v until reconnected", err, s.opts.PollInterval)
				down = true
			}
			t := time.NewTimer(backoff/2 + rand.N(backoff))
			select {
			case <-s.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, maxBackoff)
			continue
		}
		if down {
			s.logf("spool: listening for wake-ups again")
			down = false
		}
		backoff = minBackoff
		s.signalWake() // notifications sent while not listening are lost
		if s.opts.onListen != nil {
			s.opts.onListen()
		}
		signalFirst()
		err = s.waitNotifications(conn)
		s.reporter.Store(false) // the session's advisory lock ends with it
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn.Close(ctx)
		cancel()
		if s.ctx.Err() != nil {
			return
		}
		s.logf("spool: wake-up connection lost: %v; reconnecting", err)
		down = true
	}
}

// listenConn opens the listener's connection. It is not from the pool: a
// LISTEN belongs to one session, so it needs a session of its own (and a
// PgBouncer in session mode, see the package documentation).
func (s *Store) listenConn() (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(s.ctx, connectTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, s.connCfg)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{s.channel}.Sanitize()); err != nil {
		conn.Close(ctx)
		return nil, err
	}
	return conn, nil
}

// waitNotifications signals Wake for each notification until the
// connection fails or the handle stops. An idle connection is pinged every
// listenPing, so a dead one is noticed; while another node reports the
// cluster's figures, the session tries every PollInterval to take that
// over (see ReportsCluster).
func (s *Store) waitNotifications(conn *pgx.Conn) error {
	if err := s.tryReporter(conn); err != nil {
		return err
	}
	for {
		wait := listenPing
		if !s.reporter.Load() {
			wait = min(wait, s.opts.PollInterval)
		}
		ctx, cancel := context.WithTimeout(s.ctx, wait)
		n, err := conn.WaitForNotification(ctx)
		cancel()
		switch {
		case err == nil:
			// This handle's own writes wake it directly (signalWake);
			// its notifications are for the other nodes.
			_, own := s.ownSessions.Load(n.PID)
			if !own {
				s.remoteWake()
			}
			if s.opts.onNotify != nil {
				s.opts.onNotify(own)
			}
			continue
		case s.ctx.Err() != nil:
			return err
		case !errors.Is(err, context.DeadlineExceeded) && !pgconn.Timeout(err):
			return err
		}
		if s.reporter.Load() {
			ctx, cancel = context.WithTimeout(s.ctx, connectTimeout)
			err = conn.Ping(ctx)
			cancel()
		} else {
			err = s.tryReporter(conn)
		}
		if err != nil {
			return err
		}
	}
}

// tryReporter makes this node the one that reports the cluster's figures
// if no other node's session holds the reporter lock: a session-level
// advisory lock, which PostgreSQL releases when that session ends, so a
// dead node's role passes to another node within a PollInterval.
func (s *Store) tryReporter(conn *pgx.Conn) error {
	if s.reporter.Load() {
		return nil
	}
	ctx, cancel := context.WithTimeout(s.ctx, connectTimeout)
	defer cancel()
	var got bool
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", s.reporterKey).Scan(&got); err != nil {
		return err
	}
	s.reporter.Store(got)
	return nil
}

// ReportsCluster reports whether this node is the one that exports the
// whole queue's figures (Stats) as metrics, so that a sum over the nodes
// counts each message once. Exactly one node with a working connection
// to the database holds the role; when it stops or loses its connection,
// another takes it over within PollInterval.
func (s *Store) ReportsCluster(context.Context) bool { return s.reporter.Load() }

// poll signals Wake every PollInterval, the fallback for notifications
// lost while the listener was down.
func (s *Store) poll() {
	defer s.wg.Done()
	t := time.NewTicker(s.opts.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			s.signalWake()
		}
	}
}
