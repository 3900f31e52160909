package migrate

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	_ "github.com/foxcpp/maddy" // registers target.queue and the rest of maddy's modules
	"github.com/foxcpp/maddy/framework/buffer"
	"github.com/foxcpp/maddy/framework/config"
	"github.com/foxcpp/maddy/framework/log"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/testutils"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// This file produces test fixtures by running maddy 0.8.1's target.queue
// in-process against scripted targets, then stopping it, so the importer
// is tested against files the real module wrote.

// submitted is a message handed to maddy's queue by the fixture.
type submitted struct {
	id           string
	from         string
	originalFrom string
	rcpts        []string
	originalRcpt map[string]string
	opts         smtp.MailOptions
	dontTrace    bool
	quarantine   bool
	tlsOverride  bool
	header       textproto.Header
	body         []byte
}

func (s submitted) headerBytes(t *testing.T) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := textproto.WriteHeader(&b, s.header); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func makeHeader(subject string) textproto.Header {
	var h textproto.Header
	h.Add("From", "Alice <alice@example.test>")
	h.Add("Subject", subject)
	h.Add("Message-ID", "<"+strings.ReplaceAll(subject, " ", ".")+"@example.test>")
	return h
}

// Outcomes scripted for the nested target of the fixture queue.
var (
	errGreylisted = testutils.Temp(451, [3]int{4, 7, 1}, "greylisted, try later")
	errNoUser     = testutils.Perm(550, [3]int{5, 1, 1}, "no such user")
	errFull       = testutils.Temp(452, [3]int{4, 2, 2}, "mailbox full")
	errDSNHop     = testutils.Temp(421, [3]int{4, 4, 2}, "connection dropped")
)

var authUser = "alice"

// The messages of the fixture. msgMixed has one recipient deferred, one
// refused for good (maddy sends a DSN for it) and one delivered.
// msgLarge is above the store's inline limit, carries every MAIL FROM
// parameter maddy keeps, and has a rewritten recipient.
var (
	msgMixed = submitted{
		id: "0000aaaa", from: "alice@example.test", originalFrom: "alice@example.test",
		rcpts:  []string{"grey@remote.test", "nouser@remote.test", "ok@remote.test"},
		header: makeHeader("mixed outcome"),
		body:   []byte("Hello.\r\nThis is the mixed message.\r\n"),
	}
	msgLarge = submitted{
		id: "0000bbbb", from: "bob-rewritten@example.test", originalFrom: "bob@example.test",
		rcpts:        []string{"grey@remote.test", "full@other.test"},
		originalRcpt: map[string]string{"full@other.test": "full-alias@example.test"},
		opts: smtp.MailOptions{Body: smtp.Body8BitMIME, Size: 300000, RequireTLS: true, UTF8: true,
			Return: smtp.DSNReturnFull, EnvelopeID: "env-42", Auth: &authUser},
		dontTrace: true, quarantine: true, tlsOverride: true,
		header: makeHeader("large message"),
		body:   bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd\r\n"), 4000),
	}
	msgUnattempted = submitted{
		id: "0000cccc", from: "carol@example.test", originalFrom: "carol@example.test",
		rcpts:  []string{"x@remote.test", "y@remote.test"},
		header: makeHeader("never attempted"),
		body:   []byte("Queued, then maddy stopped.\r\n"),
	}
)

// fixtureDirs are maddy queue directories written by the real module.
type fixtureDirs struct {
	// queue holds msgMixed and msgLarge after one attempt.
	queue string
	// dsn holds the failure report maddy generated for msgMixed's refused
	// recipient, queued (and deferred once) in a second target.queue.
	dsn string
	// unattempted holds msgUnattempted as it was before its first attempt
	// (as if maddy stopped right after accepting it).
	unattempted string
	// dsnTo is the DSN's recipient, dsnTarget the target that saw it.
	dsnRecord testutils.AttemptRecord
}

var (
	fixtureOnce sync.Once
	fixture     fixtureDirs
	fixtureErr  error
	fixtureRoot string
)

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Verbose() {
		// maddy's modules log every attempt; keep the output readable.
		log.DefaultLogger.Out = log.NopOutput{}
	}
	code := pgtest.Main(m)
	if fixtureRoot != "" {
		os.RemoveAll(fixtureRoot)
	}
	os.Exit(code)
}

// maddyFixture runs maddy's queue once per test binary and returns the
// directories it left; tests copy them before changing anything.
func maddyFixture(t testing.TB) fixtureDirs {
	t.Helper()
	fixtureOnce.Do(func() {
		fixtureRoot, fixtureErr = os.MkdirTemp("", "maddy-queue-fixture-")
		if fixtureErr == nil {
			fixture, fixtureErr = generateFixture(fixtureRoot)
		}
	})
	if fixtureErr != nil {
		t.Fatalf("running maddy's target.queue: %v", fixtureErr)
	}
	return fixture
}

var instanceSeq int

// registerTarget makes a FakeTarget referable as &name in maddy configs.
func registerTarget(ft *testutils.FakeTarget) string {
	instanceSeq++
	ft.InstName = fmt.Sprintf("migrate_test_target_%d", instanceSeq)
	module.RegisterInstance(ft, config.NewMap(nil, config.Node{}))
	module.Initialized[ft.InstName] = true // nothing to initialize
	return ft.InstName
}

// startMaddyQueue builds maddy's target.queue through the module registry,
// as maddy does for a config block.
func startMaddyQueue(dir, target, bounce string) (module.DeliveryTarget, error) {
	instanceSeq++
	name := fmt.Sprintf("migrate_test_queue_%d", instanceSeq)
	node := config.Node{
		Name: "target.queue",
		Args: []string{name},
		Children: []config.Node{
			{Name: "location", Args: []string{dir}},
			{Name: "target", Args: []string{"&" + target}},
			{Name: "hostname", Args: []string{"mx.example.test"}},
			{Name: "autogenerated_msg_domain", Args: []string{"example.test"}},
		},
	}
	if bounce != "" {
		node.Children = append(node.Children, config.Node{
			Name:     "bounce",
			Children: []config.Node{{Name: "deliver_to", Args: []string{"&" + bounce}}},
		})
	}
	newQueue := module.Get("target.queue")
	if newQueue == nil {
		return nil, fmt.Errorf("target.queue is not registered")
	}
	mod, err := newQueue("target.queue", name, nil, nil)
	if err != nil {
		return nil, err
	}
	globals := map[string]interface{}{"hostname": "mx.example.test"}
	if err := mod.Init(config.NewMap(globals, node)); err != nil {
		return nil, err
	}
	module.RegisterInstance(mod, nil)
	module.Initialized[name] = true
	return mod.(module.DeliveryTarget), nil
}

func submit(ctx context.Context, q module.DeliveryTarget, s submitted) error {
	meta := &module.MsgMetadata{
		ID:                 s.id,
		OriginalFrom:       s.originalFrom,
		OriginalRcpts:      s.originalRcpt,
		SMTPOpts:           s.opts,
		DontTraceSender:    s.dontTrace,
		Quarantine:         s.quarantine,
		TLSRequireOverride: s.tlsOverride,
	}
	d, err := q.Start(ctx, meta, s.from)
	if err != nil {
		return err
	}
	for _, r := range s.rcpts {
		if err := d.AddRcpt(ctx, r, smtp.RcptOptions{}); err != nil {
			return err
		}
	}
	if err := d.Body(ctx, s.header.Copy(), buffer.MemoryBuffer{Slice: s.body}); err != nil {
		return err
	}
	return d.Commit(ctx)
}

func generateFixture(root string) (fixtureDirs, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dirs := fixtureDirs{
		queue:       filepath.Join(root, "remote_queue"),
		dsn:         filepath.Join(root, "dsn_queue"),
		unattempted: filepath.Join(root, "unattempted"),
	}

	// Set before any queue starts, and never reset: the queues outlive
	// this function.
	retries := &retryWatch{next: log.DefaultLogger.Out, changed: make(chan struct{})}
	log.DefaultLogger.Out = retries

	// The DSN queue: maddy's bounce pipeline delivers into it, and its next
	// hop defers everything.
	dsnHop := &testutils.FakeTarget{Rcpt: func(int, string) error { return errDSNHop }}
	dsnQueue, err := startMaddyQueue(dirs.dsn, registerTarget(dsnHop), "")
	if err != nil {
		return dirs, err
	}
	dsnQueueName := dsnQueue.(module.Module).InstanceName()

	hop := &testutils.FakeTarget{Rcpt: testutils.FailRcpts(map[string]error{
		"grey@remote.test":   errGreylisted,
		"nouser@remote.test": errNoUser,
		"full@other.test":    errFull,
	})}
	q, err := startMaddyQueue(dirs.queue, registerTarget(hop), dsnQueueName)
	if err != nil {
		return dirs, err
	}
	for _, s := range []submitted{msgMixed, msgLarge} {
		if err := submit(ctx, q, s); err != nil {
			return dirs, err
		}
	}
	// Each message is attempted once at once and its retry is 15 minutes
	// away. The queues are left running rather than closed: maddy 0.8.1's
	// Close stops its timer wheel before waiting for attempts in flight,
	// and an attempt that ends after that races with it (its recover then
	// marks the entry broken). Its "will retry" log line comes after the
	// metadata is rewritten, so once the two messages and the DSN they
	// caused have logged it, the directories are final.
	if err := retries.wait(ctx, 3); err != nil {
		return dirs, fmt.Errorf("waiting for maddy's first attempts: %w", err)
	}
	dirs.dsnRecord = dsnHop.Records()[0]

	// A queue stopped before its first attempt: the attempt is held inside
	// the target while the directory is copied.
	blocked := &testutils.FakeTarget{}
	blocked.Block()
	live := filepath.Join(root, "unattempted_live")
	q, err = startMaddyQueue(live, registerTarget(blocked), "")
	if err != nil {
		return dirs, err
	}
	if err := submit(ctx, q, msgUnattempted); err != nil {
		return dirs, err
	}
	if err := blocked.WaitBlocked(ctx, 1); err != nil {
		return dirs, err
	}
	if err := copyDir(live, dirs.unattempted); err != nil {
		return dirs, err
	}
	// Left blocked and running, for the reason above.
	return dirs, nil
}

// retryWatch counts the "will retry" lines maddy's queues log, passing
// every line on to the previous output.
type retryWatch struct {
	next    log.Output
	mu      sync.Mutex
	n       int
	changed chan struct{}
}

func (w *retryWatch) Write(stamp time.Time, debug bool, msg string) {
	if strings.Contains(msg, "will retry") {
		w.mu.Lock()
		w.n++
		close(w.changed)
		w.changed = make(chan struct{})
		w.mu.Unlock()
	}
	if w.next != nil {
		w.next.Write(stamp, debug, msg)
	}
}

func (w *retryWatch) Close() error { return nil }

// wait returns once n lines were seen.
func (w *retryWatch) wait(ctx context.Context, n int) error {
	for {
		w.mu.Lock()
		seen, ch := w.n, w.changed
		w.mu.Unlock()
		if seen >= n {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("%d of %d retries logged: %w", seen, n, ctx.Err())
		}
	}
}

// copyDir copies the regular files of src into a new directory dst.
func copyDir(src, dst string) error {
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}
