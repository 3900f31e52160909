package postgres

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
	"github.com/maddy-spool/spool/internal/testutils/lazyfs"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// TestPowerLoss checks Commit's promise against a power cut of the
// database's machine. The cluster keeps its WAL on a lazyfs mount, where
// whatever was not fsynced is gone after a crash (see package lazyfs).
// Sessions create and commit messages, small ones (kept in memory by
// Create, inserted by Commit) and large ones (streamed into the database
// by Create, which commits without waiting for the flush). While they
// run, the server is killed (pg_ctl stop -m immediate) and the file
// system crashed; after recovery, every message whose Commit returned
// nil must be there, queued, with its content. Rounds go on from the
// state the previous one left. The data files stay on the ordinary disk:
// PostgreSQL writes a data page only after the WAL describing it was
// flushed, so what they hold is rebuilt from the WAL either way, and the
// commit records are what a power cut can take.
//
// The seed is printed; SPOOL_POWERLOSS_SEED repeats a run.
func TestPowerLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("starts its own PostgreSQL server on a FUSE mount")
	}
	pgtest.Require(t)
	lazyfs.Require(t)
	seed := time.Now().UnixNano()
	if s := os.Getenv("SPOOL_POWERLOSS_SEED"); s != "" {
		seed, _ = strconv.ParseInt(s, 10, 64)
	}
	t.Logf("seed %d (SPOOL_POWERLOSS_SEED=%d repeats this run)", seed, seed)
	rng := rand.New(rand.NewSource(seed))

	srv := newPowerServer(t)
	acked := map[store.ID][]byte{} // every acknowledged message: its body
	for round := 0; round < 3; round++ {
		s, err := Open(ctx, Options{DSN: srv.dsn, Node: "a", Logf: func(string, ...any) {}})
		if err != nil {
			t.Fatalf("round %d: Open: %v", round, err)
		}
		stop := plLoad(t, s, rng.Int63(), 64, acked)
		srv.powerCut(rng, func() {
			stop()
			s.crash()
		})
		plVerify(t, srv.dsn, acked)
		t.Logf("round %d: %d acknowledged messages so far, all there", round, len(acked))
	}
}

// powerServer is a PostgreSQL server whose WAL is on a lazyfs mount, with
// one database, for power-loss tests.
type powerServer struct {
	t    *testing.T
	fsys *lazyfs.FS
	base string       // the mount point
	srv  *fuse.Server // the current mount, nil while unmounted
	c    *pgtest.Cluster
	dsn  string
}

func newPowerServer(t *testing.T) *powerServer {
	// The server runs as another user: it must be able to reach the mount.
	base, err := os.MkdirTemp("", "spool-pg-wal-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	p := &powerServer{t: t, fsys: lazyfs.New(), base: base}
	t.Cleanup(func() { // the server first: it keeps files open on the mount
		if p.c != nil {
			p.c.Close()
		}
		if p.srv != nil {
			lazyfs.Unmount(p.srv)
		}
	})
	p.mount()
	// The WAL directory's own entry must be durable too: initdb syncs
	// what is below it, not the directory it is in.
	walDir := filepath.Join(base, "wal")
	if err := os.Mkdir(walDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := (embedded.OSFS{}).SyncDir(base); err != nil {
		t.Fatal(err)
	}
	if p.c, err = pgtest.New(pgtest.Options{WALDir: walDir}); err != nil {
		t.Fatal(err)
	}
	if p.dsn, err = p.c.CreateDatabase("spool"); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *powerServer) mount() {
	var err error
	if p.srv, err = p.fsys.Mount(p.base); err != nil {
		p.t.Fatalf("mounting lazyfs: %v", err)
	}
}

// powerCut kills the server (pg_ctl stop -m immediate), calls afterKill,
// drops what the WAL's file system had not made durable, and starts the
// server again, which recovers from what is left.
func (p *powerServer) powerCut(rng *rand.Rand, afterKill func()) {
	p.t.Helper()
	if err := p.c.Stop("immediate"); err != nil {
		p.t.Fatal(err)
	}
	afterKill()
	if err := lazyfs.Unmount(p.srv); err != nil {
		p.t.Fatalf("unmount: %v", err)
	}
	p.srv = nil
	p.fsys.Crash(rng)
	p.mount()
	if err := p.c.Start(); err != nil {
		p.t.Fatalf("the server does not start after the power cut: %v", err)
	}
}

// plLoad runs sessions creating and committing messages on s, records in
// acked the body of each whose Commit returned nil, and returns once at
// least n more were acknowledged, with the sessions still running; the
// returned function stops them.
func plLoad(t *testing.T, s *Store, seed int64, n int, acked map[store.ID][]byte) (stop func()) {
	var (
		mu      sync.Mutex
		fresh   int
		enough  = make(chan struct{})
		wg      sync.WaitGroup
		workers = 8
	)
	ctx, cancel := context.WithCancel(context.Background())
	for w := 0; w < workers; w++ {
		rng := rand.New(rand.NewSource(seed + int64(w)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				size := 1 + rng.Intn(4<<10)
				if rng.Intn(8) == 0 {
					size = DefaultInlineLimit + rng.Intn(DefaultInlineLimit) // streamed at Create
				}
				body := make([]byte, size)
				rng.Read(body)
				m := msgAt(time.Now(), "r@x.test")
				l, err := s.Create(ctx, m, []byte(hdr), bytes.NewReader(body), int64(size))
				if err != nil {
					continue
				}
				if _, err := s.Commit(ctx, l); err != nil {
					continue
				}
				mu.Lock()
				acked[m.ID] = body
				fresh++
				if fresh == n {
					close(enough)
				}
				mu.Unlock()
			}
		}()
	}
	select {
	case <-enough:
	case <-time.After(time.Minute):
		t.Fatalf("fewer than %d messages committed in a minute", n)
	}
	return func() {
		cancel()
		wg.Wait()
	}
}

// plVerify checks that every message in acked is queued, with its body.
func plVerify(t *testing.T, dsn string, acked map[store.ID][]byte) {
	t.Helper()
	// Another node name: opening as "a" would take back a's leases and
	// hide a message left being received.
	v, err := Open(ctx, Options{DSN: dsn, Node: "verifier", Logf: func(string, ...any) {}})
	if err != nil {
		t.Fatalf("Open after the power cut: %v", err)
	}
	defer v.Close()
	for id, body := range acked {
		m, err := v.Get(ctx, id)
		if errors.Is(err, store.ErrNotFound) {
			t.Fatalf("message %v (%d bytes) was acknowledged and is gone after the power cut", id, len(body))
		}
		if err != nil {
			t.Fatal(err)
		}
		if m.Lease != nil {
			t.Fatalf("acknowledged message %v is not queued: lease %+v", id, m.Lease)
		}
		if err := plSameBody(v, m, body); err != nil {
			t.Fatalf("acknowledged message %v: %v", id, err)
		}
	}
}

func plSameBody(s *Store, m *store.Message, want []byte) error {
	c, err := s.Content(ctx, m)
	if err != nil {
		return err
	}
	r, err := c.Body.Open()
	if err != nil {
		return err
	}
	defer r.Close()
	got, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("body of %d bytes read back as %d different bytes", len(want), len(got))
	}
	return nil
}

// TestPowerLossKeepsReservedIDs checks what reserveID promises: a block of
// IDs a node reserved is durable before the node uses it, so a power cut
// of the database's machine cannot hand the same IDs to another node
// while the first still holds them. Node a reserves a block (its first
// Create) and keeps the message in memory; the power goes; node b then
// stores and commits messages; a's Commit, after the restart, must find
// its ID still its own.
func TestPowerLossKeepsReservedIDs(t *testing.T) {
	if testing.Short() {
		t.Skip("starts its own PostgreSQL server on a FUSE mount")
	}
	pgtest.Require(t)
	lazyfs.Require(t)
	srv := newPowerServer(t)
	open := func(node string) *Store {
		s, err := Open(ctx, Options{DSN: srv.dsn, Node: node, Logf: func(string, ...any) {}})
		if err != nil {
			t.Fatalf("Open(%s): %v", node, err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	a := open("a")
	held := msgAt(time.Now(), "r@x.test")
	la, err := a.Create(ctx, held, []byte(hdr), bytes.NewReader([]byte("a")), 1)
	if err != nil {
		t.Fatal(err)
	}
	// a's connections died with the server; the pool would find out by
	// its health check (or a failed write, and the client's retry).
	srv.powerCut(rand.New(rand.NewSource(1)), a.pool.Reset)

	b := open("b")
	for i := 0; i < idBlock; i++ {
		m := msgAt(time.Now(), "r@x.test")
		l, err := b.Create(ctx, m, []byte(hdr), bytes.NewReader([]byte("b")), 1)
		if err == nil {
			_, err = b.Commit(ctx, l)
		}
		if err != nil {
			t.Fatalf("b's message %d: %v", i, err)
		}
		if m.ID == held.ID {
			t.Fatalf("b was given ID %v, reserved by a before the power cut", m.ID)
		}
	}
	if _, err := a.Commit(ctx, la); err != nil {
		t.Fatalf("a's Commit after the power cut: %v", err)
	}
	if m, err := b.Get(ctx, held.ID); err != nil || m.From != held.From {
		t.Fatalf("a's message after its Commit: %+v, %v", m, err)
	}
}
