package tests

import (
	"fmt"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/testutils"
)

// TestImportFromTargetQueue is the migration an operator makes: maddy's own
// target.queue holds deferred mail; maddy is stopped, the configuration
// says target.spool instead of target.queue, `maddy spool import` moves the
// queued messages, and the restarted server delivers each of them exactly
// once.
func TestImportFromTargetQueue(t *testing.T) {
	var accept atomic.Bool
	sink := newSink(t, testutils.WithScript(func(stage, _, _ string, _ int) *smtp.SMTPError {
		if stage == testutils.StageRCPT && !accept.Load() {
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "not yet")
		}
		return nil
	}))
	ports := freePorts(t, 2)
	p := params{Dir: t.TempDir(), SMTPPort: ports[0], MetricsPort: ports[1], SinkPort: sink.Port()}

	// Phase 1: maddy's target.queue, same block name and so the same
	// directory (state_dir/outq) that target.spool will use.
	old := p
	old.Module, old.MaxTries = "target.queue", "10"
	oldCfg := writeConfig(t, old)
	srv := startServer(t, oldCfg)
	srv.waitLog(fmt.Sprintf("%s%d", readyPrefix, p.SMTPPort))
	rcpts := []string{"a@x.test", "b@y.test"}
	var ids []string
	for i := 0; i < 3; i++ {
		id := msgID(t, i)
		ids = append(ids, id)
		if err := submit(t, fmt.Sprintf("127.0.0.1:%d", p.SMTPPort), "sender@origin.test", rcpts, id); err != nil {
			t.Fatal(err)
		}
	}
	// Each message was tried once (and deferred) by target.queue. Its
	// "will retry" line comes after the metadata is rewritten; stopping
	// maddy 0.8.1 while an attempt is still being recorded races in its
	// own Close (the entry can end up marked broken).
	eventually(t, waitTimeout, func() bool { return srv.countLog("will retry") >= 3 })
	if code := srv.stop(); code != 0 {
		t.Fatalf("maddy with target.queue exited with %d", code)
	}
	metas, _ := filepath.Glob(filepath.Join(p.Dir, "outq", "*.meta"))
	if len(metas) != 3 {
		t.Fatalf("target.queue left %d .meta files, want 3", len(metas))
	}

	// Phase 2: the one-word change, then the import into the same
	// directory.
	cfg := writeConfig(t, p)
	e := &env{t: t, p: p, cfg: cfg, sink: sink}
	dry := e.spoolOK("import", "--from", filepath.Join(p.Dir, "outq"), "--dry-run")
	if !strings.Contains(dry.stdout, "would import") {
		t.Fatalf("dry run output:\n%s", dry.stdout)
	}
	if metas, _ := filepath.Glob(filepath.Join(p.Dir, "outq", "*.meta")); len(metas) != 3 {
		t.Fatal("the dry run changed the source directory")
	}
	r := e.spoolOK("import", "--from", filepath.Join(p.Dir, "outq"))
	if !strings.Contains(r.stdout, "3 imported") {
		t.Fatalf("import output:\n%s", r.stdout)
	}
	if metas, _ := filepath.Glob(filepath.Join(p.Dir, "outq", "*.meta*")); len(metas) != 0 {
		t.Fatalf("import left %v", metas)
	}
	// Safe to run again: nothing left to do.
	if r := e.spoolOK("import", "--from", filepath.Join(p.Dir, "outq")); !strings.Contains(r.stdout, "0 imported") {
		t.Fatalf("second import output:\n%s", r.stdout)
	}
	// The imported messages are visible offline, with their tries.
	ls := e.spoolOK("list")
	if n := strings.Count(ls.stdout, "sender@origin.test"); n != 3 {
		t.Fatalf("list after import shows %d messages:\n%s", n, ls.stdout)
	}

	// Phase 3: target.spool delivers everything once.
	accept.Store(true)
	before := len(sink.Messages())
	e.srv = startServer(t, cfg)
	e.srv.waitLog(e.readyLine())
	// The imported messages keep target.queue's next retry time (15
	// minutes after their first attempt); the operator flushes them.
	if r := e.spoolOK("retry", "--all", "--yes"); !strings.Contains(r.stdout, "3 changed") {
		t.Fatalf("retry output:\n%s", r.stdout)
	}
	msgs := waitDelivered(t, sink, ids, rcpts)
	seen := map[string]int{}
	for _, m := range msgs[before:] {
		for _, rc := range m.Rcpts {
			seen[m.MessageID()+" "+strings.ToLower(rc)]++
		}
	}
	for k, n := range seen {
		if n != 1 {
			t.Errorf("%s delivered %d times", k, n)
		}
	}
	e.waitMetric("maddy_spool_messages_queued", eq(0))
}
