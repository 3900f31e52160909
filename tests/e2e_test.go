package tests

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
	dto "github.com/prometheus/client_model/go"

	"github.com/maddy-spool/spool/internal/testutils"
)

// TestDelivery: messages reach every recipient exactly once with their
// body intact, and the queue ends empty.
func TestDelivery(t *testing.T) {
	t.Parallel()
	sink := newSink(t)
	e := newEnv(t, sink, nil)

	const from = "sender@origin.test"
	rcpts := []string{"alice@remote.test", "bob@remote.test"}
	ids, bodies := submitBatch(t, e.smtpAddr(), from, rcpts, 3)

	msgs := waitDelivered(t, sink, ids, rcpts)
	for _, m := range msgs {
		if m.From != from {
			t.Errorf("message %s: MAIL FROM:<%s>, want <%s>", m.MessageID(), m.From, from)
		}
		want, ok := bodies[m.MessageID()]
		if !ok {
			t.Errorf("unexpected message %s to %v", m.MessageID(), m.Rcpts)
			continue
		}
		if got := bodyOf(m.Data); got != want {
			t.Errorf("message %s: body changed: got %d bytes, want %d (first 200 bytes: %q)", m.MessageID(), len(got), len(want), truncate(got, 200))
		}
	}

	e.waitMetric("maddy_spool_messages_queued", eq(0))
	e.waitMetric("maddy_spool_attempts_total", eq(6), "result", "delivered")
	if v := e.mustMetric("maddy_spool_recipients_queued"); v != 0 {
		t.Errorf("maddy_spool_recipients_queued = %v with an empty queue, want 0", v)
	}
	if v := e.mustMetric("maddy_spool_enqueued_total"); v != 3 {
		t.Errorf("maddy_spool_enqueued_total = %v, want 3", v)
	}
	if v, _ := e.metric("maddy_spool_attempts_total", "result", "temporary"); v != 0 {
		t.Errorf("maddy_spool_attempts_total{result=temporary} = %v, want 0", v)
	}
	for _, id := range ids {
		for _, r := range rcpts {
			if n := sink.DeliveryCount(id, r); n != 1 {
				t.Errorf("%s reached %s %d times, want 1", id, r, n)
			}
		}
	}
	if d := sink.Duplicates(); len(d) > 0 {
		t.Errorf("duplicate deliveries: %+v", d)
	}
	if d := dsns(msgs); len(d) > 0 {
		t.Errorf("unexpected DSNs:\n%s", describe(d))
	}

	if _, err := os.Stat(filepath.Join(e.queueDir(), "queue.db")); err != nil {
		t.Errorf("queue database: %v", err)
	}
	// The large message's content file goes away with the message.
	eventually(t, waitTimeout, func() bool { return len(dirFiles(t, filepath.Join(e.queueDir(), "bodies"))) == 0 })

	if code := e.srv.stop(); code != 0 {
		t.Errorf("exit status after SIGTERM = %d, want 0", code)
	}
}

// TestRetryAfterTemporaryFailure: a 451 for each recipient's first try is
// retried, and the message then arrives once per recipient.
func TestRetryAfterTemporaryFailure(t *testing.T) {
	t.Parallel()
	sink := newSink(t, testutils.WithScript(testutils.SinkDeferFirst(1)))
	e := newEnv(t, sink, nil)

	const from = "sender@origin.test"
	rcpts := []string{"alice@remote.test", "bob@remote.test"}
	id := msgID(t, 1)
	if err := submit(t, e.smtpAddr(), from, rcpts, id); err != nil {
		t.Fatal(err)
	}

	msgs := waitDelivered(t, sink, []string{id}, rcpts)
	e.waitMetric("maddy_spool_messages_queued", eq(0))
	e.waitMetric("maddy_spool_attempts_total", eq(float64(len(rcpts))), "result", "delivered")
	// Both recipients were deferred once, in the first attempt.
	if v := e.mustMetric("maddy_spool_attempts_total", "result", "temporary"); v != float64(len(rcpts)) {
		t.Errorf("maddy_spool_attempts_total{result=temporary} = %v, want %d", v, len(rcpts))
	}
	if v, _ := e.metric("maddy_spool_attempts_total", "result", "permanent"); v != 0 {
		t.Errorf("maddy_spool_attempts_total{result=permanent} = %v, want 0", v)
	}
	if v := e.mustMetric("maddy_spool_attempt_duration_seconds"); v < 2 {
		t.Errorf("maddy_spool_attempt_duration_seconds has %v observations, want at least 2 attempts", v)
	}

	for _, r := range rcpts {
		if n := sink.DeliveryCount(id, r); n != 1 {
			t.Errorf("%s reached %s %d times, want 1", id, r, n)
		}
		if n := sink.RcptAttempts(r); n != 2 {
			t.Errorf("%s was offered %d times (RCPT), want 2: a deferral and a success", r, n)
		}
	}
	if d := dsns(msgs); len(d) > 0 {
		t.Errorf("unexpected DSNs (delay_warning is 4h):\n%s", describe(d))
	}
	if n := e.srv.countLog("recipient outcome", `"status":"deferred"`); n < 1 {
		t.Errorf("no temporary failure logged; log:\n%s", e.srv.tail(30))
	}
}

// TestBounce: a 550 for one recipient produces a failure DSN to the sender
// while the other recipient gets the message; a null-sender message gets
// no DSN.
func TestBounce(t *testing.T) {
	t.Parallel()
	const (
		sender = "sender@origin.test"
		nobody = "nobody@remote.test"
		ok     = "ok@remote.test"
	)
	sink := newSink(t, testutils.WithScript(testutils.SinkRcptReplies(map[string]*smtp.SMTPError{
		nobody: testutils.SinkReply(550, [3]int{5, 1, 1}, "no such user here"),
	})))
	e := newEnv(t, sink, nil)

	id := msgID(t, 1)
	if err := submit(t, e.smtpAddr(), sender, []string{nobody, ok}, id); err != nil {
		t.Fatal(err)
	}
	msgs := waitSink(t, sink, "delivery to "+ok+" and a DSN", func(msgs []testutils.Message) bool {
		return delivered(msgs, []string{id}, []string{ok}) && len(dsns(msgs)) > 0
	})
	if n := sink.DeliveryCount(id, nobody); n != 0 {
		t.Errorf("%s was accepted for %s %d times", id, nobody, n)
	}

	d := dsns(msgs)
	if len(d) != 1 {
		t.Fatalf("got %d DSNs, want 1:\n%s", len(d), describe(d))
	}
	dsn := d[0]
	if len(dsn.Rcpts) != 1 || !strings.EqualFold(dsn.Rcpts[0], sender) {
		t.Errorf("DSN envelope recipients %v, want [%s]", dsn.Rcpts, sender)
	}
	if n := sink.DeliveryCount(id, sender); n != 0 {
		t.Errorf("the original message was delivered to its sender")
	}
	rep, err := parseDSN(dsn.Data)
	if err != nil {
		t.Fatalf("parsing the DSN: %v\n%s", err, dsn.Data)
	}
	if rep.MediaType != "multipart/report" || rep.ReportType != "delivery-status" {
		t.Errorf("DSN Content-Type %q, want multipart/report; report-type=delivery-status", rep.Header.Get("Content-Type"))
	}
	if from := rep.Header.Get("From"); !strings.Contains(strings.ToLower(from), "mailer-daemon@example.org") {
		t.Errorf("DSN From: %q, want MAILER-DAEMON@example.org", from)
	}
	if to := rep.Header.Get("To"); !strings.Contains(strings.ToLower(to), sender) {
		t.Errorf("DSN To: %q, want %s", to, sender)
	}
	if as := rep.Header.Get("Auto-Submitted"); as != "auto-replied" {
		t.Errorf("DSN Auto-Submitted: %q, want auto-replied", as)
	}
	if r := rep.recipient(nobody); r == nil {
		t.Errorf("DSN has no Final-Recipient: rfc822; %s; recipient blocks: %v", nobody, rep.Recipients)
	} else {
		if got := r.Get("Action"); got != "failed" {
			t.Errorf("Action: %q, want failed", got)
		}
		if got := r.Get("Status"); got != "5.1.1" {
			t.Errorf("Status: %q, want 5.1.1", got)
		}
		if got := r.Get("Diagnostic-Code"); !strings.Contains(got, "550") {
			t.Errorf("Diagnostic-Code: %q, want the remote 550 reply", got)
		}
	}
	if r := rep.recipient(ok); r != nil {
		t.Errorf("DSN reports on the delivered recipient %s: %v", ok, r)
	}
	if len(rep.Recipients) != 1 {
		t.Errorf("DSN has %d recipient blocks, want 1: %v", len(rep.Recipients), rep.Recipients)
	}
	if len(rep.Parts) < 2 || rep.Parts[1] != "message/delivery-status" {
		t.Errorf("DSN parts %v, want text, message/delivery-status, ...", rep.Parts)
	}

	// A message with the null sender whose recipient is rejected: no DSN.
	id2 := msgID(t, 2)
	if err := submit(t, e.smtpAddr(), "", []string{nobody}, id2); err != nil {
		t.Fatal(err)
	}
	e.waitMetric("maddy_spool_attempts_total", eq(2), "result", "permanent")
	e.waitMetric("maddy_spool_dsn_not_sent_total", eq(1), "reason", "null_sender")
	e.waitMetric("maddy_spool_messages_queued", eq(0))
	if v := e.mustMetric("maddy_spool_dsn_generated_total", "action", "failed"); v != 1 {
		t.Errorf("maddy_spool_dsn_generated_total{action=failed} = %v, want 1", v)
	}
	if d := dsns(sink.Messages()); len(d) != 1 {
		t.Errorf("got %d DSNs after the null-sender message, want still 1:\n%s", len(d), describe(d))
	}
	if n := sink.DeliveryCount(id2, nobody); n != 0 {
		t.Errorf("%s was accepted for %s %d times", id2, nobody, n)
	}
}

// TestCrashRestart: messages accepted before a kill -9 are delivered after
// the restart, each to each recipient exactly once.
func TestCrashRestart(t *testing.T) {
	t.Parallel()
	deferAll := func(stage, _, _ string, _ int) *smtp.SMTPError {
		if stage == testutils.StageRCPT {
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "try again later")
		}
		return nil
	}
	sink := newSink(t, testutils.WithScript(deferAll))
	// Enough tries that nothing is given up on while the sink defers.
	e := newEnv(t, sink, func(p *params) { p.MaxTries = "100" })

	const from = "sender@origin.test"
	rcpts := []string{"alice@remote.test", "bob@remote.test"}
	ids, bodies := submitBatch(t, e.smtpAddr(), from, rcpts, 10)
	e.waitMetric("maddy_spool_messages_queued", eq(10))
	e.waitMetric("maddy_spool_attempts_total", atLeast(1), "result", "temporary")
	// The large message was durable before its 250 reply.
	if files := dirFiles(t, filepath.Join(e.queueDir(), "bodies")); len(files) != 1 {
		t.Errorf("bodies/ holds %v, want one content file", files)
	}

	e.srv.kill()
	if n := sink.Accepted(); n != 0 {
		t.Fatalf("the deferring sink accepted %d messages before the crash", n)
	}

	e.restart()
	// The restarted server finds all of them (the sink still defers).
	e.waitMetric("maddy_spool_messages_queued", eq(10))
	e.waitMetric("maddy_spool_recipients_queued", eq(20))
	sink.SetScript(nil)
	msgs := waitDelivered(t, sink, ids, rcpts)
	e.waitMetric("maddy_spool_messages_queued", eq(0))
	eventually(t, waitTimeout, func() bool { return len(dirFiles(t, filepath.Join(e.queueDir(), "bodies"))) == 0 })

	for _, m := range msgs {
		if got, want := bodyOf(m.Data), bodies[m.MessageID()]; got != want {
			t.Errorf("message %s: body changed: got %d bytes, want %d", m.MessageID(), len(got), len(want))
		}
	}

	for _, id := range ids {
		for _, r := range rcpts {
			if n := sink.DeliveryCount(id, r); n != 1 {
				t.Errorf("%s reached %s %d times, want 1", id, r, n)
			}
		}
	}
	if d := sink.Duplicates(); len(d) > 0 {
		t.Errorf("duplicate deliveries: %+v", d)
	}
	if d := dsns(sink.Messages()); len(d) > 0 {
		t.Errorf("unexpected DSNs:\n%s", describe(d))
	}
}

// TestMetrics: after delivered, deferred and bounced recipients, the
// metrics endpoint exposes every maddy_spool_* family with module="outq".
func TestMetrics(t *testing.T) {
	t.Parallel()
	const (
		sender = "sender@origin.test"
		ok     = "ok@remote.test"
		nobody = "nobody@remote.test"
		slow   = "slow@remote.test"
	)
	sink := newSink(t, testutils.WithScript(testutils.SinkChain(
		testutils.SinkRcptReplies(map[string]*smtp.SMTPError{
			nobody: testutils.SinkReply(550, [3]int{5, 1, 1}, "no such user here"),
		}),
		testutils.SinkDeferFirst(1, slow),
	)))
	e := newEnv(t, sink, nil)

	id := msgID(t, 1)
	if err := submit(t, e.smtpAddr(), sender, []string{ok, nobody, slow}, id); err != nil {
		t.Fatal(err)
	}
	waitSink(t, sink, "deliveries and a DSN", func(msgs []testutils.Message) bool {
		return delivered(msgs, []string{id}, []string{ok, slow}) && len(dsns(msgs)) > 0
	})
	e.waitMetric("maddy_spool_messages_queued", eq(0))
	e.waitMetric("maddy_spool_dsn_generated_total", eq(1), "action", "failed")
	e.waitMetric("maddy_spool_oldest_message_age_seconds", eq(0))

	fams, err := scrape(e.metricsURL())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []struct {
		name  string
		typ   dto.MetricType
		kv    []string
		value func(float64) bool
		desc  string
	}{
		{"maddy_spool_enqueued_total", dto.MetricType_COUNTER, nil, eq(1), "1"},
		{"maddy_spool_attempts_total", dto.MetricType_COUNTER, []string{"result", "delivered"}, eq(2), "2"},
		{"maddy_spool_attempts_total", dto.MetricType_COUNTER, []string{"result", "temporary"}, eq(1), "1"},
		{"maddy_spool_attempts_total", dto.MetricType_COUNTER, []string{"result", "permanent"}, eq(1), "1"},
		{"maddy_spool_attempt_duration_seconds", dto.MetricType_HISTOGRAM, nil, eq(2), "2 observations"},
		{"maddy_spool_messages_queued", dto.MetricType_GAUGE, nil, eq(0), "0"},
		{"maddy_spool_recipients_queued", dto.MetricType_GAUGE, nil, eq(0), "0"},
		{"maddy_spool_oldest_message_age_seconds", dto.MetricType_GAUGE, nil, eq(0), "0"},
		{"maddy_spool_dsn_generated_total", dto.MetricType_COUNTER, []string{"action", "failed"}, eq(1), "1"},
	} {
		f := fams[want.name]
		if f == nil {
			t.Errorf("metric family %s is missing", want.name)
			continue
		}
		if f.GetType() != want.typ {
			t.Errorf("%s has type %v, want %v", want.name, f.GetType(), want.typ)
		}
		v, found := familyValue(f, labels(want.kv...))
		switch {
		case !found:
			t.Errorf("%s has no series with labels %v", want.name, fmtLabels(labels(want.kv...)))
		case !want.value(v):
			t.Errorf("%s%s = %v, want %s", want.name, fmtLabels(labels(want.kv...)), v, want.desc)
		}
	}
	// Only exported once something was quarantined; if it is there, it
	// must be labelled and zero.
	if f := fams["maddy_spool_quarantined_total"]; f != nil {
		if v, found := familyValue(f, labels()); !found || v != 0 {
			t.Errorf("maddy_spool_quarantined_total{module=outq} = %v (present: %v), want 0", v, found)
		}
	}
	// Every maddy_spool_* series carries the module label.
	for name, f := range fams {
		if !strings.HasPrefix(name, "maddy_spool_") {
			continue
		}
		for _, m := range f.GetMetric() {
			if !hasLabels(m, labels()) {
				t.Errorf("%s has a series without module=\"outq\": %v", name, m.GetLabel())
			}
		}
	}
}

// TestConfigErrors: a bad target.spool block stops maddy at start-up with
// an error naming the directive and its file:line.
func TestConfigErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		tweak     func(*params)
		errorLine string // the config line the error must point at
		mention   string // what the error must name
	}{
		{"negative max_tries", func(p *params) { p.MaxTries = "-1" }, "max_tries -1", "max_tries"},
		{"unknown directive", func(p *params) { p.Extra = []string{"bogus_directive 1"} }, "bogus_directive 1", "bogus_directive"},
		{"missing target", func(p *params) { p.NoTarget = true }, "target.spool outq {", "target"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ports := freePorts(t, 3)
			p := params{Dir: t.TempDir(), SMTPPort: ports[0], MetricsPort: ports[1], SinkPort: ports[2]}
			tc.tweak(&p)
			cfg := writeConfig(t, p)
			where := fmt.Sprintf("%s:%d", cfg, lineOf(t, cfg, tc.errorLine))

			s, err := launch(t, "--config", cfg, "run")
			if err != nil {
				t.Fatal(err)
			}
			code := s.wait()
			if code == 0 {
				t.Errorf("maddy exited with status 0 on a bad configuration")
			}
			var errLine string
			for _, l := range s.logLines() {
				if strings.Contains(l, where) {
					errLine = l
				}
				if strings.Contains(l, readyPrefix) {
					t.Errorf("maddy started listening despite the bad configuration: %s", l)
				}
			}
			if errLine == "" {
				t.Fatalf("no error pointing at %s; output:\n%s", where, s.tail(20))
			}
			_, rest, _ := strings.Cut(errLine, where)
			if !strings.Contains(rest, tc.mention) {
				t.Errorf("error %q does not name %s", errLine, tc.mention)
			}
			t.Logf("exit status %d: %s", code, errLine)
		})
	}
}

// TestVersion: `maddy version` prints build information and exits 0.
func TestVersion(t *testing.T) {
	t.Parallel()
	out, err := exec.Command(maddyBin, "version").CombinedOutput()
	if err != nil {
		t.Fatalf("maddy version: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), runtime.GOOS+"/"+runtime.GOARCH) {
		t.Errorf("maddy version printed %q, want build information with %s/%s", out, runtime.GOOS, runtime.GOARCH)
	}
}

// TestLegacyInvocation: the older `maddy --config FILE` (no `run`) starts
// the server, and SIGTERM stops it with status 0.
func TestLegacyInvocation(t *testing.T) {
	t.Parallel()
	sink := newSink(t)
	ports := freePorts(t, 2)
	p := params{Dir: t.TempDir(), SMTPPort: ports[0], MetricsPort: ports[1], SinkPort: sink.Port()}
	cfg := writeConfig(t, p)
	s := startServerArgs(t, "--config", cfg)
	s.waitLog(fmt.Sprintf("%s%d", readyPrefix, p.SMTPPort))

	id := msgID(t, 1)
	if err := submit(t, fmt.Sprintf("127.0.0.1:%d", p.SMTPPort), "sender@origin.test", []string{"rcpt@remote.test"}, id); err != nil {
		t.Fatal(err)
	}
	waitDelivered(t, sink, []string{id}, []string{"rcpt@remote.test"})

	if code := s.stop(); code != 0 {
		t.Errorf("exit status after SIGTERM = %d, want 0", code)
	}
}

// dirFiles lists the names in dir (none if it does not exist).
func dirFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, ent := range ents {
		names = append(names, ent.Name())
	}
	return names
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// submitBatch submits n messages and returns their Message-IDs and bodies.
// The last one is larger than the 64 KiB kept inline in queue.db, so it
// goes through a file in bodies/.
func submitBatch(t *testing.T, addr, from string, rcpts []string, n int) ([]string, map[string]string) {
	t.Helper()
	var ids []string
	bodies := make(map[string]string)
	for i := 1; i <= n; i++ {
		id := msgID(t, i)
		body := testBody(id)
		if i == n {
			body = strings.Repeat("0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n", 1500)
		}
		if err := submitData(addr, from, rcpts, newMessage(from, rcpts, id, body)); err != nil {
			t.Fatalf("submitting %s: %v", id, err)
		}
		ids = append(ids, id)
		bodies[id] = body
	}
	return ids, bodies
}
