package queue

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/buffer"
	"github.com/foxcpp/maddy/framework/log"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
	"github.com/maddy-spool/spool/internal/testutils"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

var t0 = time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)

// onPostgres makes new harnesses run on a PostgreSQL store (see
// TestOnPostgres) instead of the embedded one.
var onPostgres bool

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// harness runs a Queue on a temporary directory with fake targets and a
// fake clock. Attempts are awaited through the onAttemptDone seam.
type harness struct {
	t      *testing.T
	dir    string
	clock  *schedule.FakeClock
	target *testutils.FakeTarget
	bounce *testutils.FakeTarget
	// fallback, if set, is the queue's fallback target.
	fallback *testutils.FakeTarget
	cfg      settings
	q        *Queue

	// wrapStore, if set, wraps the store the next open runs on;
	// noWaitLoad makes open return before the stored schedule is loaded.
	wrapStore  func(store.Backend) store.Backend
	noWaitLoad bool
	// storeOpts, if set, adjusts the options the embedded store is
	// opened with (a test setting it runs on the embedded store only).
	storeOpts func(*embedded.Options)
	// pgDSN is the database of the harness's PostgreSQL store.
	pgDSN string

	done chan store.ID
}

func testSettings() settings {
	return settings{
		maxParallelism: 4,
		policy: schedule.Policy{
			Delays:   []time.Duration{time.Minute, 10 * time.Minute},
			MaxTries: 5,
			MaxAge:   2 * time.Hour,
		},
		hostname:        "mx.example.org",
		autogenDomain:   "example.org",
		dsnDisplayName:  "Mail Delivery System",
		shutdownTimeout: 5 * time.Second,
		successAction:   "relayed",
		store:           storeSettings{node: "test-node", lease: defaultLease},
		// One destination, with room for every attempt: the tests of
		// destinations set their own.
		destinations:   destinationSingle,
		perDestination: 4,
		backoffMin:     defaultBackoffMin,
		backoffMax:     defaultBackoffMax,
	}
}

func newHarness(t *testing.T, mut ...func(*harness)) *harness {
	t.Helper()
	h := &harness{
		t:      t,
		dir:    t.TempDir(),
		clock:  schedule.NewFakeClock(t0),
		target: &testutils.FakeTarget{InstName: "next_hop"},
		bounce: &testutils.FakeTarget{InstName: "bounce"},
		cfg:    testSettings(),
		done:   make(chan store.ID, 1000),
	}
	for _, m := range mut {
		m(h)
	}
	h.open()
	return h
}

func (h *harness) open() {
	h.t.Helper()
	q := &Queue{
		name:     "test_queue",
		location: h.dir,
		Log:      log.Logger{Name: "target.spool"},
		cfg:      h.cfg,
		target:   h.target,
		clock:    h.clock,
		rand:     func() float64 { return 0.5 },
	}
	if h.bounce != nil {
		q.bounce = h.bounce
	}
	if h.fallback != nil {
		q.fallback = h.fallback
	}
	q.onAttemptDone = func(id store.ID) { h.done <- id }
	// Entries are checked often in real time; whether they expired is
	// decided on the fake clock.
	q.receivingCheckEvery = time.Millisecond
	var s store.Backend
	if onPostgres {
		if h.storeOpts != nil {
			h.t.Skip("needs the embedded store")
		}
		if h.pgDSN == "" {
			h.pgDSN = pgtest.Database(h.t)
		}
		q.cfg.store.kind, q.cfg.store.dsn = storePostgres, h.pgDSN
		st, err := openPostgres(q)
		if err != nil {
			h.t.Fatal(err)
		}
		s = st
	} else {
		opts := q.embeddedOptions()
		if h.storeOpts != nil {
			h.storeOpts(&opts)
		}
		st, err := embedded.Open(h.dir, opts)
		if err != nil {
			h.t.Fatal(err)
		}
		s = st
	}
	st := s
	if h.wrapStore != nil {
		s = h.wrapStore(st)
	}
	if err := q.start(s); err != nil {
		h.t.Fatal(err)
	}
	if !h.noWaitLoad {
		q.WaitLoaded()
	}
	h.q = q
	h.t.Cleanup(func() { q.Close() })
}

// restart closes the queue and opens a new one on the same directory, as a
// server restart does.
func (h *harness) restart() {
	h.t.Helper()
	if err := h.q.Close(); err != nil {
		h.t.Fatal(err)
	}
	h.open()
}

// rcpt is a recipient to submit, with optional RCPT TO parameters.
type rcpt struct {
	addr string
	opts smtp.RcptOptions
}

func rcpts(addrs ...string) []rcpt {
	out := make([]rcpt, len(addrs))
	for i, a := range addrs {
		out[i] = rcpt{addr: a}
	}
	return out
}

const testBody = "Hello.\r\n"

// submit enqueues a message through the module API, as the pipeline does.
func (h *harness) submit(from string, to []rcpt, opts smtp.MailOptions) {
	h.t.Helper()
	if err := h.trySubmit(from, to, opts, testBody); err != nil {
		h.t.Fatalf("submit: %v", err)
	}
}

func (h *harness) trySubmit(from string, to []rcpt, opts smtp.MailOptions, body string) error {
	ctx := context.Background()
	meta := &module.MsgMetadata{ID: "m1", SMTPOpts: opts, OriginalFrom: from}
	d, err := h.q.Start(ctx, meta, from)
	if err != nil {
		return err
	}
	for _, r := range to {
		if err := d.AddRcpt(ctx, r.addr, r.opts); err != nil {
			return err
		}
	}
	var hdr textproto.Header
	hdr.Add("From", from)
	hdr.Add("Subject", "test")
	hdr.Add("Message-ID", "<test@example.org>")
	if err := d.Body(ctx, hdr, buffer.MemoryBuffer{Slice: []byte(body)}); err != nil {
		d.Abort(ctx)
		return err
	}
	return d.Commit(ctx)
}

// waitAttempts waits until n more attempts have finished.
func (h *harness) waitAttempts(n int) {
	h.t.Helper()
	timeout := time.After(20 * time.Second)
	for i := 0; i < n; i++ {
		select {
		case <-h.done:
		case <-timeout:
			h.t.Fatalf("only %d of %d attempts finished", i, n)
		}
	}
}

// advance moves the clock once the scheduler is asleep, so the move is
// seen by the scheduler's timer.
func (h *harness) advance(d time.Duration) {
	h.t.Helper()
	asleep := make(chan struct{})
	go func() {
		h.clock.WaitTimers(1)
		close(asleep)
	}()
	select {
	case <-asleep:
	case <-time.After(20 * time.Second):
		h.t.Fatal("the scheduler never waited for a timer (is the queue empty?)")
	}
	h.clock.Advance(d)
}

// queued returns the stored messages.
func (h *harness) queued() []*store.Message {
	h.t.Helper()
	var out []*store.Message
	if err := h.q.store.Walk(context.Background(), func(m *store.Message) error { out = append(out, m); return nil }); err != nil {
		h.t.Fatal(err)
	}
	return out
}

func (h *harness) assertGauges(messages, recipients int64) {
	h.t.Helper()
	g := h.figures()
	if g.Messages != messages || g.Recipients != recipients {
		h.t.Fatalf("gauges: %+v; want %d messages, %d recipients", g, messages, recipients)
	}
}

// figures returns the queue figures the gauges show. A node of a shared
// store reports them once it holds the reporter role, which a restarted
// node takes over from its previous run within a poll interval.
func (h *harness) figures() metrics.QueueFigures {
	h.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if g := h.q.Gauges().Queue; g != nil {
			return *g
		}
		if time.Now().After(deadline) {
			h.t.Fatal("the queue reports no figures")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// get reads one message from the store.
func (h *harness) get(id store.ID) *store.Message {
	h.t.Helper()
	m, err := h.q.store.Get(context.Background(), id)
	if err != nil {
		h.t.Fatal(err)
	}
	return m
}

// reports returns the DSNs the bounce pipeline received.
func (h *harness) reports() []testutils.Delivered {
	return h.bounce.Deliveries()
}

func reportText(d testutils.Delivered) string {
	var b bytes.Buffer
	textproto.WriteHeader(&b, d.Header)
	b.Write(d.Body)
	return b.String()
}

func testMeta() *module.MsgMetadata { return &module.MsgMetadata{ID: "m1"} }

func testHeader() textproto.Header {
	var h textproto.Header
	h.Add("Subject", "test")
	return h
}

func testBuffer() buffer.Buffer { return buffer.MemoryBuffer{Slice: []byte(testBody)} }

// largeBuffer is a body too large for any backend to keep in memory
// between Body and Commit (store/postgres keeps up to 64 KiB): tests of a
// stored message being received use it.
func largeBuffer() buffer.Buffer {
	return buffer.MemoryBuffer{Slice: []byte(strings.Repeat("Hello, world.\r\n", 5<<10))}
}
