package postgres

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"runtime/metrics"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// db runs SQL on the harness's database outside the backend, as an
// operator (or damage) would.
func (h *harness) db(t testing.TB) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(ctx, h.dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(ctx) })
	return c
}

func (h *harness) exec(t testing.TB, sql string, args ...any) {
	t.Helper()
	if _, err := h.db(t).Exec(ctx, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func (h *harness) queryInt(t testing.TB, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := h.db(t).QueryRow(ctx, sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// newMsg returns a message to rcpts arriving now by the harness's clock,
// due at once.
func newMsg(h *harness, rcpts ...string) *store.Message { return msgAt(h.clock.Now(), rcpts...) }

func msgAt(now time.Time, rcpts ...string) *store.Message {
	m := &store.Message{MsgID: "m", From: "s@example.org", Arrival: now, NextAttempt: now}
	for _, r := range rcpts {
		m.Rcpts = append(m.Rcpts, store.Rcpt{Addr: r})
	}
	return m
}

const hdr = "Subject: t\r\n\r\n"

// queueMsg creates and commits a small message.
func queueMsg(t testing.TB, s *Store, m *store.Message) store.ID {
	t.Helper()
	l, err := s.Create(ctx, m, []byte(hdr), strings.NewReader("body\r\n"), 6)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if r, err := s.Commit(ctx, l); err != nil || r != 0 {
		t.Fatalf("Commit = %v, %v", r, err)
	}
	return m.ID
}

func drain(c <-chan struct{}) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

func TestMigrations(t *testing.T) {
	h := newHarness(t)
	// Several nodes starting at once on an empty database: the advisory
	// lock lets one migrate, the others find the schema done.
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := Open(ctx, h.options(t, fmt.Sprint("n", i)))
			if err == nil {
				err = s.Close()
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Open: %v", err)
		}
	}
	if v := h.queryInt(t, "SELECT max(version) FROM spool_schema"); v != int64(schemaVersion) {
		t.Fatalf("schema version %d, want %d", v, schemaVersion)
	}
	if n := h.queryInt(t, "SELECT count(*) FROM spool_schema"); n != int64(schemaVersion) {
		t.Fatalf("%d versions recorded, want %d", n, schemaVersion)
	}
	// A database a newer build migrated is refused.
	h.exec(t, "INSERT INTO spool_schema (version) VALUES (99)")
	_, err := Open(ctx, h.options(t, "n0"))
	want := fmt.Sprintf("schema version 99 is newer than this build supports (%d); upgrade maddy on this node", schemaVersion)
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Open of a newer schema = %v, want %q", err, want)
	}
}

func TestNodeNames(t *testing.T) {
	h := newHarness(t)
	a := h.openNode(t, "mx1")
	host, _ := os.Hostname()

	// A second handle with a name open in this process.
	_, err := Open(ctx, h.options(t, "mx1"))
	want := "node name mx1 is already in use by a running node on host " + host + " (last seen 0s ago); give each node a unique `node` name"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("second Open of mx1 = %v, want %q", err, want)
	}

	// Close deregisters, and keeps the leases: what a held is the
	// restarted node's to take back.
	id := queueMsg(t, a, newMsg(h, "r@x.test"))
	if cs, err := a.Claim(ctx, 10, nil); err != nil || len(cs) != 1 {
		t.Fatalf("Claim = %v, %v", cs, err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if n := h.queryInt(t, "SELECT count(*) FROM spool_nodes WHERE name = 'mx1'"); n != 0 {
		t.Fatal("Close left the node registered")
	}
	if _, err := a.Claim(ctx, 1, nil); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("Claim after Close = %v, want ErrClosed", err)
	}
	b := h.openNode(t, "mx2")
	if cs, err := b.Claim(ctx, 10, nil); err != nil || len(cs) != 0 {
		t.Fatalf("Claim on another node after Close = %v, %v; want none (still leased)", cs, err)
	}
	a = h.openNode(t, "mx1")
	if cs, err := a.Claim(ctx, 10, nil); err != nil || len(cs) != 1 || cs[0].Message.ID != id {
		t.Fatalf("Claim after the node came back = %v, %v", cs, err)
	}
	a.Close()

	// A registration from another host with a fresh heartbeat is refused;
	// once its heartbeat is older than a lease, the name is free.
	h.exec(t, `INSERT INTO spool_nodes (name, host, pid, instance, started, heartbeat)
		VALUES ('mx3', 'elsewhere', 1, 'x', $1, $1)`, h.clock.Now())
	h.clock.Advance(testLease / 2)
	_, err = Open(ctx, h.options(t, "mx3"))
	want = "node name mx3 is already in use by a running node on host elsewhere (last seen 30s ago)"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Open of a name used on another host = %v, want %q", err, want)
	}
	h.clock.Advance(testLease)
	h.openNode(t, "mx3")

	// A registration from this host by a process that has exited is
	// taken over at once.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	h.exec(t, `INSERT INTO spool_nodes (name, host, pid, instance, started, heartbeat)
		VALUES ('mx4', $1, $2, 'x', $3, $3)`, host, dead.Process.Pid, h.clock.Now())
	h.openNode(t, "mx4")
}

func TestQuarantineDamaged(t *testing.T) {
	h := newHarness(t)
	var (
		mu          sync.Mutex
		quarantined []store.ID
	)
	opts := h.options(t, "a")
	opts.OnQuarantine = func(id store.ID, reason error) {
		mu.Lock()
		quarantined = append(quarantined, id)
		mu.Unlock()
	}
	a := h.openWith(t, opts)
	var ids []store.ID
	for i := 0; i < 5; i++ {
		ids = append(ids, queueMsg(t, a, newMsg(h, "r@x.test")))
	}
	big := newMsg(h, "r@x.test")
	body := strings.Repeat("x", 3*chunkSize)
	l, err := a.Create(ctx, big, []byte(hdr), strings.NewReader(body), int64(len(body)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Commit(ctx, l); err != nil {
		t.Fatal(err)
	}
	damage := func(id store.ID, meta string) {
		h.exec(t, "UPDATE spool_messages SET meta = $2 WHERE id = $1", int64(id), []byte(meta))
	}
	damage(ids[1], "garbage")
	damage(ids[3], `{"v":2}`)
	damage(big.ID, `{"v":1,"rcpts":[]}`)

	// Claim skips and quarantines them, and does not meet them again.
	cs, err := a.Claim(ctx, 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	var got []store.ID
	for _, c := range cs {
		got = append(got, c.Message.ID)
	}
	if want := []store.ID{ids[0], ids[2], ids[4]}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Claim = %v, want %v", got, want)
	}
	h.clock.Advance(2 * testLease)
	if cs, err := a.Claim(ctx, 10, nil); err != nil || len(cs) != 3 {
		t.Fatalf("Claim after the leases expired = %d claims, %v; want the 3 sound ones", len(cs), err)
	}
	mu.Lock()
	if want := []store.ID{ids[1], ids[3], big.ID}; fmt.Sprint(quarantined) != fmt.Sprint(want) {
		t.Fatalf("OnQuarantine told of %v, want %v", quarantined, want)
	}
	mu.Unlock()
	// The raw data is kept: the metadata as it was, the content chunks.
	var (
		meta    []byte
		reason  string
		chunked bool
	)
	err = h.db(t).QueryRow(ctx, "SELECT meta, reason, chunked FROM spool_quarantine WHERE id = $1",
		int64(ids[1])).Scan(&meta, &reason, &chunked)
	if err != nil || string(meta) != "garbage" || reason == "" || chunked {
		t.Fatalf("quarantined row: %q, %q, %v, %v", meta, reason, chunked, err)
	}
	if n := h.queryInt(t, "SELECT count(*) FROM spool_chunks WHERE message_id = $1", int64(big.ID)); n != 3 {
		t.Fatalf("%d chunks of the quarantined message kept, want 3", n)
	}

	// Get and Walk quarantine what they meet too.
	id := queueMsg(t, a, newMsg(h, "r@x.test"))
	damage(id, "{")
	if _, err := a.Get(ctx, id); !errors.Is(err, store.ErrCorrupt) {
		t.Fatalf("Get of a damaged entry = %v, want ErrCorrupt", err)
	}
	if _, err := a.Get(ctx, id); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after quarantine = %v, want ErrNotFound", err)
	}
	id = queueMsg(t, a, newMsg(h, "r@x.test"))
	damage(id, "")
	n := 0
	if err := a.Walk(ctx, func(m *store.Message) error { n++; return nil }); err != nil || n != 3 {
		t.Fatalf("Walk saw %d, %v; want the 3 sound ones", n, err)
	}
	if n := h.queryInt(t, "SELECT count(*) FROM spool_quarantine"); n != 5 {
		t.Fatalf("%d rows quarantined, want 5", n)
	}
}

func TestWalkPages(t *testing.T) {
	h := newHarness(t)
	a := h.openNode(t, "a")
	const n = 2*walkPage + 3
	var (
		wg   sync.WaitGroup
		fail atomic.Value
	)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := a.Create(ctx, newMsg(h, "r@x.test"), []byte(hdr), strings.NewReader(""), 0)
			if err == nil {
				_, err = a.Commit(ctx, l)
			}
			if err != nil {
				fail.Store(err)
			}
		}()
	}
	wg.Wait()
	if err := fail.Load(); err != nil {
		t.Fatal(err)
	}
	var last store.ID
	seen := 0
	err := a.Walk(ctx, func(m *store.Message) error {
		if m.ID <= last || m.Lease != nil {
			return fmt.Errorf("walk gave %v (lease %+v) after %v", m.ID, m.Lease, last)
		}
		last = m.ID
		seen++
		return nil
	})
	if err != nil || seen != n {
		t.Fatalf("Walk saw %d of %d: %v", seen, n, err)
	}
	stop := errors.New("stop")
	if err := a.Walk(ctx, func(*store.Message) error { return stop }); err != stop {
		t.Fatalf("Walk returned %v, want fn's error", err)
	}
}

// pattern is a reproducible stream of n bytes.
type pattern struct{ n, off int64 }

func (p *pattern) Read(b []byte) (int, error) {
	if p.off == p.n {
		return 0, io.EOF
	}
	b = b[:min(int64(len(b)), p.n-p.off)]
	for i := range b {
		x := p.off + int64(i)
		b[i] = byte(x ^ x>>8 ^ x>>16)
	}
	p.off += int64(len(b))
	return len(b), nil
}

// heapPeak records the largest heap (live objects and garbage not yet
// swept) seen at the points where sample is called.
type heapPeak struct {
	s    []metrics.Sample
	peak uint64
}

func newHeapPeak() *heapPeak {
	runtime.GC()
	p := &heapPeak{s: []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}}
	p.sample()
	return p
}

func (p *heapPeak) sample() {
	metrics.Read(p.s)
	p.peak = max(p.peak, p.s[0].Value.Uint64())
}

// sampling samples p at every Read of r.
type sampling struct {
	r io.Reader
	p *heapPeak
}

func (s sampling) Read(b []byte) (int, error) {
	s.p.sample()
	return s.r.Read(b)
}

func TestLargeMessage(t *testing.T) {
	h := newHarness(t)
	a := h.openNode(t, "a")
	const size = 50 << 20
	// Neither writing nor reading may hold the message in memory: the
	// heap never grows by more than a fraction of its size.
	const budget = 12 << 20
	want := sha256.New()
	io.Copy(want, &pattern{n: size})

	m := newMsg(h, "r@x.test")
	p := newHeapPeak()
	base := p.peak
	l, err := a.Create(ctx, m, []byte(hdr), sampling{&pattern{n: size}, p}, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Create of %d MiB: heap %d KiB at most, %d KiB before", size>>20, p.peak>>10, base>>10)
	if p.peak > base+budget {
		t.Errorf("Create: heap reached %d bytes, from %d", p.peak, base)
	}
	if _, err := a.Commit(ctx, l); err != nil {
		t.Fatal(err)
	}
	c, err := a.Content(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	if c.Body.Len() != size || string(c.Header) != hdr {
		t.Fatalf("content: header %q, body length %d", c.Header, c.Body.Len())
	}
	r, err := c.Body.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got := sha256.New()
	p = newHeapPeak()
	base = p.peak
	n, err := io.CopyBuffer(got, sampling{r, p}, make([]byte, 32<<10))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("reading it: heap %d KiB at most, %d KiB before", p.peak>>10, base>>10)
	if n != size || !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
		t.Fatalf("read back %d bytes, content differs", n)
	}
	if p.peak > base+budget {
		t.Errorf("reading: heap reached %d bytes, from %d", p.peak, base)
	}

	// A body shorter than announced is refused, and nothing is stored.
	_, err = a.Create(ctx, newMsg(h, "r@x.test"), []byte(hdr), &pattern{n: 1 << 20}, 2<<20)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Create with a short body = %v", err)
	}
	if n := h.queryInt(t, "SELECT count(*) FROM spool_messages"); n != 1 {
		t.Fatalf("%d messages stored, want 1", n)
	}

	cs, err := a.Claim(ctx, 1, nil)
	if err != nil || len(cs) != 1 {
		t.Fatal(cs, err)
	}
	if err := a.Delete(ctx, cs[0].Lease); err != nil {
		t.Fatal(err)
	}
	if n := h.queryInt(t, "SELECT count(*) FROM spool_chunks"); n != 0 {
		t.Fatalf("%d chunks left after Delete", n)
	}
}

func TestWakeLatency(t *testing.T) {
	h := newHarness(t)
	opts := h.options(t, "a")
	opts.PollInterval = time.Hour // only a notification can wake b
	a := h.openWith(t, opts)
	opts.Node = "b"
	b := h.openWith(t, opts)
	for i := 0; i < 3; i++ {
		drain(b.Wake())
		start := time.Now()
		id := queueMsg(t, a, newMsg(h, "r@x.test"))
		select {
		case <-b.Wake():
			t.Logf("b woke %v after a committed (from before Create)", time.Since(start))
		case <-time.After(time.Second):
			t.Fatal("b did not wake within 1s of a commit")
		}
		// A release due now wakes too.
		c, err := b.ClaimID(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		drain(a.Wake())
		start = time.Now()
		if _, err := b.Release(ctx, c.Lease); err != nil {
			t.Fatal(err)
		}
		select {
		case <-a.Wake():
			t.Logf("a woke %v after b's release", time.Since(start))
		case <-time.After(time.Second):
			t.Fatal("a did not wake within 1s of a release")
		}
	}
}

func TestConcurrentHandles(t *testing.T) {
	h := newHarness(t)
	const (
		nodes    = 4
		workers  = 3
		messages = 50
		saves    = 1500
	)
	var handles []*Store
	for i := 0; i < nodes; i++ {
		handles = append(handles, h.openNode(t, fmt.Sprint("n", i)))
	}
	for i := 0; i < messages; i++ {
		queueMsg(t, handles[0], newMsg(h, "r@x.test"))
	}
	// The clock stands still, so every lease stays valid: a message
	// claimed twice before its Save, or a Save refused, is a bug.
	var (
		mu      sync.Mutex
		holder  = map[store.ID]string{}
		done    atomic.Int64
		wg      sync.WaitGroup
		errOnce sync.Once
		failure error
		failed  atomic.Bool
	)
	fail := func(err error) {
		errOnce.Do(func() { failure = err })
		failed.Store(true)
	}
	for i := 0; i < nodes*workers; i++ {
		s := handles[i%nodes]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for done.Load() < saves && !failed.Load() {
				cs, err := s.Claim(ctx, 5, nil)
				if err != nil {
					fail(err)
					return
				}
				for _, c := range cs {
					mu.Lock()
					if other, ok := holder[c.Message.ID]; ok {
						mu.Unlock()
						fail(fmt.Errorf("%v claimed by %s while %s held it", c.Message.ID, s.Node(), other))
						return
					}
					holder[c.Message.ID] = s.Node()
					mu.Unlock()
					c.Message.Attempts++
					mu.Lock()
					delete(holder, c.Message.ID)
					mu.Unlock()
					if r, err := s.Save(ctx, c.Lease, c.Message); err != nil || r != 0 {
						fail(fmt.Errorf("Save = %v, %v", r, err))
						return
					}
					done.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if failure != nil {
		t.Fatal(failure)
	}
	// No save was lost or applied twice.
	var attempts int64
	err := handles[0].Walk(ctx, func(m *store.Message) error {
		attempts += int64(m.Attempts)
		return nil
	})
	if err != nil || attempts != done.Load() {
		t.Fatalf("attempts recorded %d, saves %d, %v", attempts, done.Load(), err)
	}
}

func TestGroupCommit(t *testing.T) {
	h := newHarness(t)
	a := h.openNode(t, "a")
	const senders = 64
	before := a.batches.Load()
	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
		errs  = make(chan error, senders)
	)
	for i := 0; i < senders; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			m := newMsg(h, "r@x.test")
			if i == senders/2 {
				// A message the server refuses (a time out of its
				// range) fails alone; the rest of its batch commits.
				m.NextAttempt = time.Date(300000, 1, 1, 0, 0, 0, 0, time.UTC)
			}
			l, err := a.Create(ctx, m, []byte(hdr), strings.NewReader("x"), 1)
			if err == nil {
				_, err = a.Commit(ctx, l)
			}
			if (err != nil) != (i == senders/2) {
				errs <- fmt.Errorf("Create and Commit %d: %v", i, err)
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	batches := a.batches.Load() - before
	t.Logf("%d commits in %d batches", senders, batches)
	if batches >= senders {
		t.Errorf("%d concurrent commits took %d batches: no group commit", senders, batches)
	}
	if n := h.queryInt(t, "SELECT count(*) FROM spool_messages"); n != senders-1 {
		t.Fatalf("%d messages stored, want %d", n, senders-1)
	}
}

// TestClaimReadsContent checks that an attempt reads a claimed inline
// message's content from what its claim returned, with no statement of
// its own, that a chunked one is read from the database, and that what is
// kept goes when the lease ends, however it ends.
func TestClaimReadsContent(t *testing.T) {
	h := newHarness(t)
	s := h.openWith(t, func() Options { o := h.options(t, "a"); o.InlineLimit = 1 << 10; return o }())
	large := strings.Repeat("0123456789abcde\n", 128) // 2 KiB: past InlineLimit, chunked
	for i := 0; i < 5; i++ {
		queueMsg(t, s, newMsg(h, "r@x.test"))
	}
	m := newMsg(h, "large@x.test")
	l, err := s.Create(ctx, m, []byte(hdr), strings.NewReader(large), int64(len(large)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit(ctx, l); err != nil {
		t.Fatal(err)
	}
	cs, err := s.Claim(ctx, 10, nil)
	if err != nil || len(cs) != 6 {
		t.Fatalf("Claim = %d claims, %v", len(cs), err)
	}
	kept := func() int {
		s.claimed.mu.Lock()
		defer s.claimed.mu.Unlock()
		return len(s.claimed.m)
	}
	if n := kept(); n != 5 {
		t.Fatalf("content kept for %d claimed messages, want the 5 inline ones", n)
	}
	// Were the content read from the database now, it would be this.
	h.exec(t, "UPDATE spool_messages SET header = 'X: changed\r\n\r\n'::bytea")
	read := func(m *store.Message) (string, string) {
		t.Helper()
		c, err := s.Content(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		r, err := c.Body.Open()
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		return string(c.Header), string(b)
	}
	if hd, b := read(cs[0].Message); hd != hdr || b != "body\r\n" {
		t.Fatalf("claimed content = %q, %q; want what the claim read", hd, b)
	}
	if hd, b := read(cs[5].Message); hd == hdr || b != large {
		t.Fatalf("chunked content = %q, %d bytes; want the database's, %d bytes", hd, len(b), len(large))
	}
	if n := kept(); n != 4 {
		t.Fatalf("content kept after one was read: %d, want 4", n)
	}
	if _, err := s.Release(ctx, cs[1].Lease); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Save(ctx, cs[2].Lease, cs[2].Message); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, cs[3].Lease); err != nil {
		t.Fatal(err)
	}
	h.clock.Advance(testLease + time.Second)
	if _, err := h.openNode(t, "b").Claim(ctx, 10, nil); err != nil {
		t.Fatal(err)
	}
	if lost, err := s.Renew(ctx, []*store.Lease{cs[4].Lease}); err != nil || len(lost) != 1 {
		t.Fatalf("Renew of a lease taken over = %v, %v", lost, err)
	}
	if n := kept(); n != 0 {
		t.Fatalf("content kept after every lease ended: %d", n)
	}
	if hd, _ := read(cs[4].Message); hd == hdr {
		t.Fatal("content of a lost lease read from what its claim returned")
	}
}

// TestLazyCommitScope checks what a large Create's lazy commit rests on:
// in a transaction, lazyCommitSQL turns synchronous_commit off for the
// statements after it, and for that transaction only.
func TestLazyCommitScope(t *testing.T) {
	h := newHarness(t)
	conn := h.db(t)
	setting := func(q interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}) string {
		var v string
		if err := q.QueryRow(ctx, "SELECT current_setting('synchronous_commit')").Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, lazyCommitSQL); err != nil {
		t.Fatal(err)
	}
	if v := setting(tx); v != "off" {
		t.Fatalf("synchronous_commit in the lazy transaction = %q, want off", v)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if v := setting(conn); v != "on" {
		t.Fatalf("synchronous_commit after the lazy transaction = %q, want on", v)
	}
}

// TestSmallMessageOneWrite checks that a message received in memory costs
// one write, at Commit, grouped with other sessions' writes: Create
// writes nothing, and Commit inserts the message queued.
func TestSmallMessageOneWrite(t *testing.T) {
	h := newHarness(t)
	var ops atomic.Int64
	opts := h.options(t, "a")
	opts.onBatch = func(b []*op) { ops.Add(int64(len(b))) }
	a := h.openWith(t, opts)
	const n = 64
	leases := make([]*store.Lease, n)
	for i := range leases {
		l, err := a.Create(ctx, newMsg(h, "r@x.test"), []byte(hdr), strings.NewReader("x"), 1)
		if err != nil {
			t.Fatal(err)
		}
		leases[i] = l
	}
	if got := h.queryInt(t, "SELECT count(*) FROM spool_messages"); got != 0 || ops.Load() != 0 {
		t.Fatalf("after the creates: %d rows, %d writes; want none", got, ops.Load())
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for _, l := range leases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := a.Commit(ctx, l)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if ops.Load() != n {
		t.Fatalf("%d writes for %d commits", ops.Load(), n)
	}
	if got := h.queryInt(t, "SELECT count(*) FROM spool_messages WHERE NOT receiving AND lease_owner IS NULL"); got != n {
		t.Fatalf("%d messages queued, want %d", got, n)
	}
	if b := a.batches.Load(); b >= n {
		t.Fatalf("%d batches for %d concurrent commits: no group commit", b, n)
	}
}

// TestOwnNotificationsIgnored checks that a handle tells its own
// notifications (its writes have woken it already) from another node's,
// which wake it.
func TestOwnNotificationsIgnored(t *testing.T) {
	h := newHarness(t)
	type seen struct {
		node string
		own  bool
	}
	notes := make(chan seen, 16)
	open := func(node string) *Store {
		opts := h.options(t, node)
		opts.PollInterval = time.Hour // only notifications and own writes wake
		opts.onNotify = func(own bool) { notes <- seen{node, own} }
		return h.openWith(t, opts)
	}
	a, b := open("a"), open("b")
	drain(a.Wake())
	drain(b.Wake())
	queueMsg(t, a, newMsg(h, "r@x.test"))
	got := map[string]bool{}
	for len(got) < 2 {
		n := <-notes
		got[n.node] = n.own
	}
	if !got["a"] || got["b"] {
		t.Fatalf("own notification as seen by a: %v, by b: %v; want true, false", got["a"], got["b"])
	}
	// a was woken by its own commit, b by a's notification.
	<-a.Wake()
	<-b.Wake()
}
