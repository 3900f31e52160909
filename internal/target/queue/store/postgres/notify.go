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
// listenPing, so a dead one is noticed.
func (s *Store) waitNotifications(conn *pgx.Conn) error {
	for {
		ctx, cancel := context.WithTimeout(s.ctx, listenPing)
		_, err := conn.WaitForNotification(ctx)
		cancel()
		switch {
		case err == nil:
			s.signalWake()
			continue
		case s.ctx.Err() != nil:
			return err
		case !errors.Is(err, context.DeadlineExceeded) && !pgconn.Timeout(err):
			return err
		}
		ctx, cancel = context.WithTimeout(s.ctx, connectTimeout)
		err = conn.Ping(ctx)
		cancel()
		if err != nil {
			return err
		}
	}
}

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
