package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/testutils"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// newPostgres starts a PostgreSQL server of the test's own (stopped when
// the test ends) and returns the DSN of an empty database in it. It skips
// the test when PostgreSQL is not installed (fails it under CI).
func newPostgres(t *testing.T) string {
	t.Helper()
	pgtest.Require(t)
	c, err := pgtest.New(pgtest.Options{Settings: []string{"fsync = off"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	dsn, err := c.CreateDatabase("spool")
	if err != nil {
		t.Fatal(err)
	}
	return dsn
}

// postgresStore is the store directive of a target.spool block that
// keeps its queue in the database at dsn, as node.
func postgresStore(dsn, node string) []string {
	return []string{"store postgres {", fmt.Sprintf("    dsn %q", dsn), "    node " + node, "}"}
}

// deliveries counts how often each (Message-ID, recipient) reached the
// sink.
func deliveries(msgs []testutils.Message) map[string]int {
	n := map[string]int{}
	for _, m := range msgs {
		for _, r := range m.Rcpts {
			n[m.MessageID()+" "+strings.ToLower(r)]++
		}
	}
	return n
}

// TestImportSpoolStoreIntoPostgres is the move from one node to a
// cluster: a node with the embedded store has deferred mail (one
// recipient of each message delivered, the other deferred and already
// told to the sender in a delay report, one message held). It is stopped,
// the configuration gets `store postgres`, `maddy spool import` moves the
// queue into PostgreSQL, and a node on that store delivers every pending
// recipient exactly once, sends no report again, and keeps the held
// message held until it is released.
func TestImportSpoolStoreIntoPostgres(t *testing.T) {
	dsn := newPostgres(t)
	var accept atomic.Bool
	sink := newSink(t, testutils.WithScript(func(stage, _, rcpt string, _ int) *smtp.SMTPError {
		if stage == testutils.StageRCPT && strings.HasSuffix(rcpt, "@x.test") && !accept.Load() {
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "not yet")
		}
		return nil
	}))
	// Retries an hour apart; the delay report is due after a second, so
	// the second attempt comes then and reports the deferred recipient.
	e := newAdminEnv(t, sink, "delay_warning 1s")
	rcpts := []string{"a@x.test", "b@y.test"}
	var ids []string
	for i := 0; i < 3; i++ {
		id := msgID(t, i)
		ids = append(ids, id)
		if err := submit(t, e.smtpAddr(), "sender@origin.test", rcpts, id); err != nil {
			t.Fatal(err)
		}
	}
	waitSink(t, sink, "three delay reports", func(msgs []testutils.Message) bool { return len(dsns(msgs)) == 3 })
	e.waitQueue("every message attempted twice, b@y.test delivered", func(q map[string]admin.MessageInfo) bool {
		if len(q) != 3 {
			return false
		}
		for id, mi := range q {
			if !settled(q, id, 2) || len(mi.Pending) != 1 {
				return false
			}
		}
		return true
	})
	held := idsOf(e.listJSON())[2]
	e.spoolOK("hold", held)
	if code := e.srv.stop(); code != 0 {
		t.Fatalf("the embedded node exited with %d", code)
	}
	before := len(sink.Messages())

	// The configuration change: the same block, its queue in PostgreSQL.
	srcDir := e.queueDir()
	e.p.Extra = append([]string{"delay_warning 1s"}, postgresStore(dsn, "n1")...)
	e.cfg = writeAdminConfig(t, e.p)

	dry := e.spoolOK("import", "--from", srcDir, "--to", "outq", "--dry-run")
	mustContain(t, "dry run", dry.stdout, "would import", "would move the source database to", "then release 2 message(s); 1 would stay held", "3 would import")
	if _, err := os.Stat(filepath.Join(srcDir, "queue.db")); err != nil {
		t.Fatalf("the dry run moved the database: %v", err)
	}

	r := e.spoolOK("import", "--from", srcDir, "--to", "outq")
	mustContain(t, "import", r.stdout, "3 imported, 0 skipped, 0 not imported", "source database moved to "+srcDir+"/imported-",
		"released 2 message(s), 1 kept held")
	if _, err := os.Stat(filepath.Join(srcDir, "queue.db")); !os.IsNotExist(err) {
		t.Fatalf("queue.db is still in %s: %v", srcDir, err)
	}
	if r.stderr != "" || dry.stderr != "" {
		// Standard error is not a terminal here: no progress, no noise.
		t.Errorf("import wrote to standard error:\n%s%s", dry.stderr, r.stderr)
	}
	again := e.spoolOK("import", "--from", srcDir, "--to", "outq")
	mustContain(t, "second import", again.stdout, "imported by an earlier run", "0 imported")

	// With no node running, list reads the database: the messages with
	// their tries, one held.
	moved := byID(e.listJSON())
	if len(moved) != 3 {
		t.Fatalf("%d messages in PostgreSQL, want 3", len(moved))
	}
	nheld := 0
	for _, mi := range moved {
		if len(mi.Pending) != 1 || mi.Pending[0].Addr != "a@x.test" || mi.Pending[0].Tries != 2 || mi.Attempts != 2 {
			t.Errorf("imported message %+v: want a@x.test pending after 2 tries", mi)
		}
		if mi.Held {
			nheld++
		}
	}
	if nheld != 1 {
		t.Errorf("%d held messages after the import, want 1", nheld)
	}
	mustContain(t, "stats from the database", e.spoolOK("stats").stdout, "3 messages", "held 1,")

	// A node on PostgreSQL. A flush while a@x.test still defers: the delay
	// report was sent by the old node and is not sent again.
	e.srv = startServer(t, e.cfg)
	e.srv.waitLog(e.readyLine())
	mustContain(t, "retry", e.spoolOK("retry", "--all", "--yes").stdout, "2 changed")
	e.waitQueue("a third attempt of the released messages", func(q map[string]admin.MessageInfo) bool {
		n := 0
		for id, mi := range q {
			if !mi.Held && settled(q, id, 3) {
				n++
			}
		}
		return n == 2
	})
	accept.Store(true)
	mustContain(t, "retry", e.spoolOK("retry", "--all", "--yes").stdout, "2 changed")
	var heldNow string
	for _, mi := range e.listJSON("--held") {
		heldNow = mi.ID
	}
	if heldNow == "" {
		t.Fatal("no held message on the PostgreSQL node")
	}
	e.spoolOK("release", heldNow)
	msgs := waitDelivered(t, sink, ids, rcpts)
	e.waitQueue("an empty queue", func(q map[string]admin.MessageInfo) bool { return len(q) == 0 })

	for k, n := range deliveries(msgs) {
		if n != 1 {
			t.Errorf("%s delivered %d times", k, n)
		}
	}
	if d := dsns(msgs[before:]); len(d) != 0 {
		t.Errorf("%d reports sent again after the import:\n%s", len(d), describe(d))
	}
	mustContain(t, "stats at the end", e.spoolOK("stats").stdout, "0 messages")
}

// TestImportTargetQueueIntoPostgres: maddy's own target.queue straight
// into a PostgreSQL store; a node on it delivers each message once.
func TestImportTargetQueueIntoPostgres(t *testing.T) {
	dsn := newPostgres(t)
	var accept atomic.Bool
	sink := newSink(t, testutils.WithScript(func(stage, _, _ string, _ int) *smtp.SMTPError {
		if stage == testutils.StageRCPT && !accept.Load() {
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "not yet")
		}
		return nil
	}))
	ports := freePorts(t, 1)
	p := params{Dir: t.TempDir(), SMTPPort: ports[0], SinkPort: sink.Port()}
	old := p
	old.Module, old.MaxTries = "target.queue", "10"
	srv := startServer(t, writeConfig(t, old))
	srv.waitLog(fmt.Sprintf("%s%d", readyPrefix, p.SMTPPort))
	rcpts := []string{"a@x.test"}
	var ids []string
	for i := 0; i < 2; i++ {
		id := msgID(t, i)
		ids = append(ids, id)
		if err := submit(t, fmt.Sprintf("127.0.0.1:%d", p.SMTPPort), "sender@origin.test", rcpts, id); err != nil {
			t.Fatal(err)
		}
	}
	// See TestImportFromTargetQueue: stop maddy only once each attempt
	// is recorded.
	eventually(t, waitTimeout, func() bool { return srv.countLog("will retry") >= 2 })
	if code := srv.stop(); code != 0 {
		t.Fatalf("maddy with target.queue exited with %d", code)
	}

	p.Extra = postgresStore(dsn, "n1")
	e := &env{t: t, p: p, cfg: writeAdminConfig(t, p), sink: sink}
	r := e.spoolOK("import", "--from", e.queueDir(), "--to", "outq")
	mustContain(t, "import", r.stdout, "2 imported, 0 skipped, 0 not imported")
	if metas, _ := filepath.Glob(filepath.Join(e.queueDir(), "*.meta*")); len(metas) != 0 {
		t.Fatalf("import left %v", metas)
	}

	accept.Store(true)
	before := len(sink.Messages())
	e.srv = startServer(t, e.cfg)
	e.srv.waitLog(e.readyLine())
	mustContain(t, "retry", e.spoolOK("retry", "--all", "--yes").stdout, "2 changed")
	msgs := waitDelivered(t, sink, ids, rcpts)
	e.waitQueue("an empty queue", func(q map[string]admin.MessageInfo) bool { return len(q) == 0 })
	for k, n := range deliveries(msgs[before:]) {
		if n != 1 {
			t.Errorf("%s delivered %d times", k, n)
		}
	}
}
