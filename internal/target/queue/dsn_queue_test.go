package queue

import (
	"bytes"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/exterrors"
	"github.com/foxcpp/maddy/framework/module"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/testutils"
)

// Queue-level tests of the DSN extension: which reports the queue sends,
// when, to whom and with what content. Reports are taken apart with the
// standard library's MIME reader (parseReport) and, where the wire form is
// what matters, with Python's email package (pyParse), neither of which
// shares code with the generator.

// statusGroup is one header block of a delivery-status part, field names
// as written.
type statusGroup map[string]string

// reportPart is one body part of a multipart/report.
type reportPart struct {
	contentType string
	cte         string
	data        []byte // decoded (quoted-printable undone)
}

// parsedReport is a DSN taken apart.
type parsedReport struct {
	raw        []byte
	header     textproto.Header
	parts      []reportPart
	text       string
	perMessage statusGroup
	rcpts      []statusGroup
}

// parseReport splits a DSN the bounce target received into its parts and
// the delivery-status part into field groups, failing on anything
// malformed: a bare CR or LF, a line over 998 octets, a field line without
// a colon, an empty trailing group.
func parseReport(t *testing.T, d testutils.Delivered) *parsedReport {
	t.Helper()
	raw := []byte(reportText(d))
	if i := bareLineBreak(raw); i >= 0 {
		t.Fatalf("bare CR or LF at octet %d of the report", i)
	}
	for n, line := range bytes.Split(raw, []byte("\r\n")) {
		if len(line) > 998 {
			t.Fatalf("line %d is %d octets long", n+1, len(line))
		}
	}
	mt, params, err := mime.ParseMediaType(d.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" || params["report-type"] != "delivery-status" {
		t.Fatalf("Content-Type %q (%v)", d.Header.Get("Content-Type"), err)
	}
	out := &parsedReport{raw: raw, header: d.Header}
	mr := multipart.NewReader(bytes.NewReader(d.Body), params["boundary"])
	for {
		p, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("multipart: %v", err)
		}
		data, err := io.ReadAll(p)
		if err != nil {
			t.Fatalf("reading part: %v", err)
		}
		part := reportPart{
			contentType: p.Header.Get("Content-Type"),
			cte:         strings.ToLower(p.Header.Get("Content-Transfer-Encoding")),
			data:        data,
		}
		if part.cte == "quoted-printable" {
			dec, err := io.ReadAll(quotedprintable.NewReader(bytes.NewReader(data)))
			if err != nil {
				t.Fatalf("quoted-printable: %v", err)
			}
			part.data = dec
		}
		out.parts = append(out.parts, part)
	}
	if len(out.parts) != 3 {
		t.Fatalf("%d parts, want 3:\n%s", len(out.parts), raw)
	}
	out.text = string(out.parts[0].data)
	groups := strings.Split(string(out.parts[1].data), "\r\n\r\n")
	for i, g := range groups {
		if i == len(groups)-1 {
			g = strings.TrimSuffix(g, "\r\n")
		}
		if g == "" {
			t.Fatalf("empty group %d in the delivery-status part:\n%q", i, out.parts[1].data)
		}
		fields := statusGroup{}
		for _, line := range strings.Split(strings.ReplaceAll(g, "\r\n ", " "), "\r\n") {
			name, value, ok := strings.Cut(line, ":")
			if !ok || name == "" || strings.ContainsAny(name, " \t") {
				t.Fatalf("malformed field line %q in group %d", line, i)
			}
			if _, dup := fields[name]; dup {
				t.Fatalf("field %s twice in group %d", name, i)
			}
			fields[name] = strings.TrimSpace(value)
		}
		if i == 0 {
			out.perMessage = fields
		} else {
			out.rcpts = append(out.rcpts, fields)
		}
	}
	return out
}

// bareLineBreak returns the offset of the first CR not followed by LF or LF
// not preceded by CR, or -1.
func bareLineBreak(b []byte) int {
	for i, c := range b {
		switch {
		case c == '\r' && (i+1 == len(b) || b[i+1] != '\n'):
			return i
		case c == '\n' && (i == 0 || b[i-1] != '\r'):
			return i
		}
	}
	return -1
}

// recipientActions lists "address=action" for each group, in order.
func (r *parsedReport) recipientActions() []string {
	var out []string
	for _, g := range r.rcpts {
		addr := g["Final-Recipient"]
		if _, a, ok := strings.Cut(addr, ";"); ok {
			addr = strings.TrimSpace(a)
		}
		out = append(out, addr+"="+g["Action"])
	}
	return out
}

// pyParse parses a report with Python's email package and fails on any
// defect it reports.
func pyParse(t *testing.T, raw []byte) *testutils.PyDSN { return testutils.ParseDSNWithPython(t, raw) }

// runToEnd waits for the first attempt and then moves the clock to each
// next attempt until the message has left the queue.
func (h *harness) runToEnd() {
	h.t.Helper()
	h.waitAttempts(1)
	h.driveToEnd()
}

// driveToEnd moves the clock to each next attempt of the one queued
// message until it has left the queue.
func (h *harness) driveToEnd() {
	h.t.Helper()
	for n := 1; ; n++ {
		q := h.queued()
		if len(q) == 0 {
			return
		}
		if n == 100 {
			h.t.Fatalf("message still queued after %d attempts", n)
		}
		h.advance(q[0].NextAttempt.Sub(h.clock.Now()))
		h.waitAttempts(1)
	}
}

func notify(n ...smtp.DSNNotify) []smtp.DSNNotify { return n }

// dsnSettings: retries at 1m and then every 10m, delay reports at 5m,
// expiry at 30m.
func dsnSettings(h *harness) {
	h.cfg.policy.Delays = []time.Duration{time.Minute, 10 * time.Minute}
	h.cfg.policy.MaxTries = 100
	h.cfg.policy.MaxAge = 30 * time.Minute
	h.cfg.delayWarning = 5 * time.Minute
}

// TestNotifyCombinations runs every NOTIFY value against every course a
// delivery can take and checks the reports sent: which, in what order, and
// the delay report's timing.
func TestNotifyCombinations(t *testing.T) {
	const (
		F = 1 << iota // failure report wanted
		D             // delay report wanted
		S             // success report wanted
	)
	notifies := []struct {
		name string
		n    []smtp.DSNNotify
		want int
	}{
		{"absent", nil, F | D},
		{"NEVER", notify(smtp.DSNNotifyNever), 0},
		{"FAILURE", notify(smtp.DSNNotifyFailure), F},
		{"DELAY", notify(smtp.DSNNotifyDelayed), D},
		{"SUCCESS", notify(smtp.DSNNotifySuccess), S},
		{"SUCCESS,DELAY", notify(smtp.DSNNotifySuccess, smtp.DSNNotifyDelayed), S | D},
		{"FAILURE,DELAY", notify(smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed), F | D},
		{"SUCCESS,FAILURE", notify(smtp.DSNNotifySuccess, smtp.DSNNotifyFailure), S | F},
		{"lower case", []smtp.DSNNotify{"failure", "delay"}, F | D},
	}
	courses := []struct {
		name   string
		script func() testutils.RcptScript
		events int // the events this course produces, in order: D, then F or S
	}{
		{"permanent failure", func() testutils.RcptScript { return testutils.FailRcpts(map[string]error{"a@x.test": perm550}) }, F},
		{"temporary until expiry", func() testutils.RcptScript { return testutils.FailRcpts(map[string]error{"a@x.test": temp451}) }, D | F},
		{"delayed then delivered", func() testutils.RcptScript { return testutils.FailFirst(3, temp451) }, D | S},
		{"delivered at once", func() testutils.RcptScript { return nil }, S},
	}
	for _, c := range courses {
		for _, nt := range notifies {
			t.Run(c.name+"/"+nt.name, func(t *testing.T) {
				h := newHarness(t, dsnSettings)
				h.target.Rcpt = c.script()
				h.submit("s@example.org", []rcpt{{"a@x.test", smtp.RcptOptions{Notify: nt.n}}}, smtp.MailOptions{})
				h.runToEnd()

				var want []string
				if c.events&D != 0 && nt.want&D != 0 {
					want = append(want, "delayed")
				}
				if c.events&F != 0 && nt.want&F != 0 {
					want = append(want, "failed")
				}
				if c.events&S != 0 && nt.want&S != 0 {
					want = append(want, "relayed")
				}
				reps := h.reports()
				var got []string
				for _, d := range reps {
					r := parseReport(t, d)
					if len(r.rcpts) != 1 || r.rcpts[0]["Final-Recipient"] != "rfc822; a@x.test" {
						t.Fatalf("report groups %v", r.recipientActions())
					}
					action := r.rcpts[0]["Action"]
					got = append(got, action)
					date, err := time.Parse(time.RFC1123Z, d.Header.Get("Date"))
					if err != nil {
						t.Fatalf("Date %q: %v", d.Header.Get("Date"), err)
					}
					switch action {
					case "delayed":
						// Due at delay_warning, and the attempt was moved
						// there so the report is on time.
						if !date.Equal(t0.Add(5 * time.Minute)) {
							t.Errorf("delay report dated %v, want arrival + delay_warning", date)
						}
					case "failed":
						if wantStatus := map[bool]string{true: "5.1.1", false: "4.4.1"}[c.events&D == 0]; r.rcpts[0]["Status"] != wantStatus {
							t.Errorf("failed with Status %q, want %q", r.rcpts[0]["Status"], wantStatus)
						}
					}
				}
				if strings.Join(got, ",") != strings.Join(want, ",") {
					t.Fatalf("reports %v, want %v", got, want)
				}
			})
		}
	}
}

// TestMixedNotifyOneReportPerEvent puts recipients with different NOTIFY
// values and fates in one message: each event gives one report listing
// exactly the recipients owed it.
func TestMixedNotifyOneReportPerEvent(t *testing.T) {
	h := newHarness(t, dsnSettings)
	never, success, failure, delay := smtp.DSNNotifyNever, smtp.DSNNotifySuccess, smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed
	h.target.Rcpt = testutils.ChainRcpt(
		testutils.FailRcpts(map[string]error{
			"p-absent@x.test": perm550, "p-never@x.test": perm550, "p-success@x.test": perm550, "p-failure@x.test": perm550,
			"t-absent@x.test": temp451, "t-delay@x.test": temp451, "t-failure@x.test": temp451,
			"t-fd@x.test": temp451, "t-never@x.test": temp451, "t-success@x.test": temp451,
		}),
		testutils.FailFirst(3, temp451, "d-sd@x.test", "d-absent@x.test"),
	)
	h.submit("s@example.org", []rcpt{
		{"p-absent@x.test", smtp.RcptOptions{}},
		{"p-never@x.test", smtp.RcptOptions{Notify: notify(never)}},
		{"p-success@x.test", smtp.RcptOptions{Notify: notify(success)}},
		{"p-failure@x.test", smtp.RcptOptions{Notify: notify(failure)}},
		{"ok-success@x.test", smtp.RcptOptions{Notify: notify(success)}},
		{"ok-absent@x.test", smtp.RcptOptions{}},
		{"ok-sd@x.test", smtp.RcptOptions{Notify: notify(success, delay)}},
		{"t-absent@x.test", smtp.RcptOptions{}},
		{"t-delay@x.test", smtp.RcptOptions{Notify: notify(delay)}},
		{"t-failure@x.test", smtp.RcptOptions{Notify: notify(failure)}},
		{"t-fd@x.test", smtp.RcptOptions{Notify: notify(failure, delay)}},
		{"t-never@x.test", smtp.RcptOptions{Notify: notify(never)}},
		{"t-success@x.test", smtp.RcptOptions{Notify: notify(success)}},
		{"d-sd@x.test", smtp.RcptOptions{Notify: notify(success, delay)}},
		{"d-absent@x.test", smtp.RcptOptions{}},
	}, smtp.MailOptions{})
	h.runToEnd()

	want := []string{
		// First attempt: the permanent failures and immediate successes.
		"p-absent@x.test=failed,p-failure@x.test=failed,ok-success@x.test=relayed,ok-sd@x.test=relayed",
		// At delay_warning: the pending recipients that want delay reports.
		"t-absent@x.test=delayed,t-delay@x.test=delayed,t-fd@x.test=delayed,d-sd@x.test=delayed,d-absent@x.test=delayed",
		// The delayed recipient delivered afterwards that asked for SUCCESS.
		"d-sd@x.test=relayed",
		// Expiry: the temporary failures that want failure reports.
		"t-absent@x.test=failed,t-failure@x.test=failed,t-fd@x.test=failed",
	}
	reps := h.reports()
	var got []string
	for _, d := range reps {
		got = append(got, strings.Join(parseReport(t, d).recipientActions(), ","))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("reports:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	subjects := []string{"Undelivered Mail Returned to Sender", "Delivery Status Notification (Delay)",
		"Delivery Status Notification (Success)", "Undelivered Mail Returned to Sender"}
	ids := map[string]bool{}
	for i, d := range reps {
		if s := d.Header.Get("Subject"); s != subjects[i] {
			t.Errorf("report %d Subject %q, want %q", i+1, s, subjects[i])
		}
		for name, want := range map[string]string{
			"From":           "Mail Delivery System <MAILER-DAEMON@example.org>",
			"To":             "<s@example.org>",
			"Auto-Submitted": "auto-replied",
			"MIME-Version":   "1.0",
		} {
			if got := d.Header.Get(name); got != want {
				t.Errorf("report %d %s %q, want %q", i+1, name, got, want)
			}
		}
		id := d.Header.Get("Message-ID")
		if !strings.HasPrefix(id, "<") || !strings.HasSuffix(id, "@example.org>") || ids[id] {
			t.Errorf("report %d Message-ID %q (repeated: %v)", i+1, id, ids[id])
		}
		ids[id] = true
		if d.From != "" || len(d.Rcpts) != 1 || d.Rcpts[0] != "s@example.org" {
			t.Errorf("report %d envelope %q -> %v", i+1, d.From, d.Rcpts)
		}
	}
}

// TestDelayWarningTiming checks when delay reports are due: not before
// delay_warning, once per recipient, never with delay_warning 0, and not
// for a recipient that has not failed yet.
func TestDelayWarningTiming(t *testing.T) {
	for _, tc := range []struct {
		name         string
		delayWarning time.Duration
		repeat       time.Duration   // delay_warning_repeat
		wantDates    []time.Duration // Date of each delayed report, from arrival
	}{
		{"at the threshold, once", 5 * time.Minute, 0, []time.Duration{5 * time.Minute}},
		{"threshold on a scheduled attempt", 11 * time.Minute, 0, []time.Duration{11 * time.Minute}},
		{"disabled", 0, 0, nil},
		{"threshold after expiry", time.Hour, 0, nil},
		{"repeated until expiry", 5 * time.Minute, 7 * time.Minute,
			[]time.Duration{5 * time.Minute, 12 * time.Minute, 19 * time.Minute, 26 * time.Minute}},
		{"repeat beyond expiry", 5 * time.Minute, 30 * time.Minute, []time.Duration{5 * time.Minute}},
		{"repeat without a first warning", 0, 7 * time.Minute, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, dsnSettings, func(h *harness) {
				h.cfg.delayWarning, h.cfg.delayRepeat = tc.delayWarning, tc.repeat
			})
			h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": temp451, "b@x.test": temp451})
			h.submit("s@example.org", rcpts("a@x.test", "b@x.test"), smtp.MailOptions{})
			h.runToEnd()
			var delayed []time.Duration
			failed := 0
			for _, d := range h.reports() {
				r := parseReport(t, d)
				date, _ := time.Parse(time.RFC1123Z, d.Header.Get("Date"))
				switch acts := strings.Join(r.recipientActions(), ","); acts {
				case "a@x.test=delayed,b@x.test=delayed":
					delayed = append(delayed, date.Sub(t0))
					for _, g := range r.rcpts {
						if g["Will-Retry-Until"] != t0.Add(30*time.Minute).Format(time.RFC1123Z) {
							t.Errorf("Will-Retry-Until %q, want arrival + max_age", g["Will-Retry-Until"])
						}
					}
				case "a@x.test=failed,b@x.test=failed":
					failed++
				default:
					t.Fatalf("unexpected report %s", acts)
				}
			}
			if fmt.Sprint(delayed) != fmt.Sprint(tc.wantDates) || failed != 1 {
				t.Fatalf("delay reports at %v and %d failure reports; want %v and 1", delayed, failed, tc.wantDates)
			}
		})
	}
}

// tempErrors returns a script that fails a@x.test on every attempt with a
// different temporary error, so the last one can be told apart.
func tempErrors() testutils.RcptScript {
	return func(attempt int, rcpt string) error {
		return &exterrors.SMTPError{
			Code:         452,
			EnhancedCode: exterrors.EnhancedCode{4, 2, attempt % 10},
			Message:      fmt.Sprintf("mailbox busy, attempt %d", attempt),
			Misc:         map[string]interface{}{"remote_server": fmt.Sprintf("mx%d.x.test", attempt)},
		}
	}
}

// TestGiveUpReportsLastTemporaryError: after max_tries or max_age a
// recipient fails with the last 4xx it saw as Status, its reply as
// Diagnostic-Code, and the real time of the last attempt.
func TestGiveUpReportsLastTemporaryError(t *testing.T) {
	for _, tc := range []struct {
		name     string
		mut      func(*harness)
		attempts int
		last     time.Duration // last attempt, from arrival
	}{
		{"max_tries", func(h *harness) { h.cfg.policy.MaxTries = 3; h.cfg.policy.MaxAge = 24 * time.Hour }, 3, 11 * time.Minute},
		// 0, 1m, 11m, 21m, then 30m (31m clamped to the deadline).
		{"max_age", func(h *harness) { h.cfg.policy.MaxTries = 100; h.cfg.policy.MaxAge = 30 * time.Minute }, 5, 30 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, tc.mut)
			h.target.Rcpt = tempErrors()
			h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
			h.runToEnd()
			if n := h.target.Attempts(); n != tc.attempts {
				t.Fatalf("%d attempts, want %d", n, tc.attempts)
			}
			reps := h.reports()
			if len(reps) != 1 {
				t.Fatalf("%d reports", len(reps))
			}
			g := parseReport(t, reps[0]).rcpts[0]
			n := tc.attempts
			want := statusGroup{
				"Final-Recipient":   "rfc822; a@x.test",
				"Action":            "failed",
				"Status":            fmt.Sprintf("4.2.%d", n),
				"Remote-MTA":        fmt.Sprintf("dns; mx%d.x.test", n),
				"Diagnostic-Code":   fmt.Sprintf("smtp; 452 4.2.%d mailbox busy, attempt %d", n, n),
				"Last-Attempt-Date": t0.Add(tc.last).Format(time.RFC1123Z),
			}
			if fmt.Sprint(g) != fmt.Sprint(want) {
				t.Fatalf("recipient fields\n%v\nwant\n%v", g, want)
			}
		})
	}
}

// TestReportOfReport: a report is never reported on. A report the bounce
// pipeline refuses is logged, counted and tried again later, not bounced;
// a report that fails inside a second spool (null sender) is dropped there.
func TestReportOfReport(t *testing.T) {
	t.Run("bounce pipeline refuses, then accepts", func(t *testing.T) {
		h := newHarness(t)
		h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": perm550})
		h.bounce.StartErr = testutils.AttemptErrors(temp451, perm550)
		before := testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", "error"))
		h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
		h.waitAttempts(1)
		if q := h.queued(); len(q) != 1 || !q[0].NextAttempt.Equal(t0.Add(reportRetryDelay)) {
			t.Fatalf("message not kept for the refused report: %+v", q)
		}
		h.advance(reportRetryDelay)
		h.waitAttempts(1)
		h.advance(reportRetryDelay)
		h.waitAttempts(1)
		if got := testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", "error")) - before; got != 2 {
			t.Fatalf("error counter grew by %v, want 2", got)
		}
		if n := h.bounce.Attempts(); n != 3 {
			t.Fatalf("%d hand-overs to the bounce pipeline, want 3", n)
		}
		reps := h.reports()
		if len(reps) != 1 || parseReport(t, reps[0]).rcpts[0]["Action"] != "failed" {
			t.Fatalf("%d reports", len(reps))
		}
		if n := h.target.Attempts(); n != 1 {
			t.Fatalf("nested target tried %d times; the failed recipient was retried", n)
		}
		if len(h.queued()) != 0 {
			t.Fatal("message kept after its report was sent")
		}
	})
	t.Run("bounce pipeline refuses until the give-up", func(t *testing.T) {
		h := newHarness(t)
		h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": perm550})
		h.bounce.StartErr = func(int) error { return temp451 }
		h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
		h.waitAttempts(1)
		if len(h.queued()) != 1 {
			t.Fatal("message not kept for the refused report")
		}
		// The next try comes due long after max_age + a day: it is the last.
		h.advance(h.cfg.policy.MaxAge + reportGiveUp + time.Hour)
		h.waitAttempts(1)
		if len(h.queued()) != 0 || h.bounce.Attempts() != 2 || len(h.reports()) != 0 {
			t.Fatalf("after the give-up: %d queued, %d hand-overs, %d reports", len(h.queued()), h.bounce.Attempts(), len(h.reports()))
		}
		h.assertGauges(0, 0)
	})
	t.Run("report fails in a second spool", func(t *testing.T) {
		inner := newHarness(t)
		inner.target.Rcpt = testutils.FailRcpts(map[string]error{"s@example.org": perm550})
		h := newHarness(t)
		h.q.bounce = inner.q
		h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": perm550})
		h.submit("s@example.org", []rcpt{{"a@x.test", smtp.RcptOptions{Notify: notify(smtp.DSNNotifyFailure)}}}, smtp.MailOptions{Return: smtp.DSNReturnFull})
		h.waitAttempts(1)
		inner.waitAttempts(1)
		recs := inner.target.Records()
		if len(recs) != 1 || recs[0].From != "" || recs[0].Rcpts[0].Rcpt != "s@example.org" {
			t.Fatalf("report's attempt in the second spool: %+v", recs)
		}
		if o := recs[0].MsgMeta.SMTPOpts; o.Return != "" || o.EnvelopeID != "" {
			t.Fatalf("report sent with RET %q ENVID %q", o.Return, o.EnvelopeID)
		}
		if n := recs[0].Rcpts[0].Opts.Notify; len(n) != 1 || n[0] != smtp.DSNNotifyNever {
			t.Fatalf("report sent with NOTIFY %v", n)
		}
		if len(inner.reports()) != 0 || inner.bounce.Attempts() != 0 || len(h.reports()) != 0 {
			t.Fatal("a report was reported on")
		}
		if len(inner.queued()) != 0 || len(h.queued()) != 0 {
			t.Fatal("messages left queued")
		}
	})
}

// TestNullSenderNeverReported: no event reports on a message with the null
// sender, whatever NOTIFY asks.
func TestNullSenderNeverReported(t *testing.T) {
	h := newHarness(t, dsnSettings)
	all := notify(smtp.DSNNotifySuccess, smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed)
	nullBefore := testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", "null_sender"))
	errBefore := testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", "error"))
	h.target.Rcpt = testutils.ChainRcpt(
		testutils.FailRcpts(map[string]error{"p@x.test": perm550, "t@x.test": temp451}),
		testutils.FailFirst(3, temp451, "d@x.test"))
	h.submit("", []rcpt{{"p@x.test", smtp.RcptOptions{Notify: all}}, {"t@x.test", smtp.RcptOptions{Notify: all}},
		{"d@x.test", smtp.RcptOptions{Notify: all}}, {"ok@x.test", smtp.RcptOptions{Notify: all}}}, smtp.MailOptions{Return: smtp.DSNReturnFull})
	h.runToEnd()
	if len(h.reports()) != 0 || h.bounce.Attempts() != 0 {
		t.Fatalf("%d reports for a null-sender message", len(h.reports()))
	}
	// Four events were owed a report (failure and success at once, delay,
	// success of d, expiry of t); each is counted as not sent.
	if got := testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", "null_sender")) - nullBefore; got != 4 {
		t.Fatalf("null_sender counter grew by %v, want 4", got)
	}
	if got := testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", "error")) - errBefore; got != 0 {
		t.Fatalf("error counter grew by %v", got)
	}
}

// TestReturnedContent checks the third part for each RET value and report
// kind, and the size limit of RET=FULL.
func TestReturnedContent(t *testing.T) {
	small := strings.Repeat("body line\r\n", 10)
	large := strings.Repeat("body line\r\n", 200) // 2200 octets
	for _, tc := range []struct {
		name     string
		ret      smtp.DSNReturn
		body     string
		kind     string // outcome of the single recipient
		wantType string
		wantBody bool
		wantText string
	}{
		{"no RET, failure", "", small, "failed", "text/rfc822-headers", false, "headers of your original message"},
		{"RET=HDRS, failure", smtp.DSNReturnHeaders, small, "failed", "text/rfc822-headers", false, "headers of your original message"},
		{"RET=FULL, failure", smtp.DSNReturnFull, small, "failed", "message/rfc822", true, "original message is attached"},
		{"RET=FULL above the limit", smtp.DSNReturnFull, large, "failed", "text/rfc822-headers", false, "is larger than the 1024 octets"},
		{"RET=FULL, success", smtp.DSNReturnFull, small, "relayed", "text/rfc822-headers", false, "headers of your original message"},
		{"RET=FULL, delay", smtp.DSNReturnFull, small, "delayed", "text/rfc822-headers", false, "headers of your original message"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, dsnSettings, func(h *harness) { h.cfg.returnSizeLimit = 1024; h.cfg.delayWarning = time.Minute })
			n := notify(smtp.DSNNotifyFailure)
			switch tc.kind {
			case "failed":
				h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": perm550})
			case "delayed":
				h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": temp451})
				n = notify(smtp.DSNNotifyDelayed)
			case "relayed":
				n = notify(smtp.DSNNotifySuccess)
			}
			if err := h.trySubmit("s@example.org", []rcpt{{"a@x.test", smtp.RcptOptions{Notify: n}}}, smtp.MailOptions{Return: tc.ret}, tc.body); err != nil {
				t.Fatal(err)
			}
			h.waitAttempts(1)
			if tc.kind == "delayed" {
				h.advance(time.Minute) // the retry and the delay_warning mark
				h.waitAttempts(1)
			}
			reps := h.reports()
			if len(reps) != 1 {
				t.Fatalf("%d reports", len(reps))
			}
			r := parseReport(t, reps[0])
			if r.rcpts[0]["Action"] != tc.kind {
				t.Fatalf("Action %q", r.rcpts[0]["Action"])
			}
			ret := r.parts[2]
			if mt, _, _ := mime.ParseMediaType(ret.contentType); mt != tc.wantType {
				t.Fatalf("returned part %q, want %s", ret.contentType, tc.wantType)
			}
			hasBody := bytes.Contains(ret.data, []byte("body line"))
			if hasBody != tc.wantBody || !bytes.Contains(ret.data, []byte("Subject: test\r\n")) {
				t.Fatalf("returned part (body returned %v, want %v):\n%s", hasBody, tc.wantBody, ret.data)
			}
			if tc.wantBody && !bytes.HasSuffix(ret.data, []byte("\r\n\r\n"+tc.body)) {
				t.Fatalf("returned body differs:\n%q", ret.data)
			}
			if !strings.Contains(strings.Join(strings.Fields(r.text), " "), tc.wantText) {
				t.Fatalf("text part lacks %q:\n%s", tc.wantText, r.text)
			}
			py := pyParse(t, r.raw)
			if py.ReturnedType != tc.wantType || (py.ReturnedBody != nil && *py.ReturnedBody != tc.body) {
				t.Fatalf("Python sees returned %s %v", py.ReturnedType, py.ReturnedBody)
			}
		})
	}
}

// TestInternationalReports: SMTPUTF8 with a non-ASCII address gives the
// RFC 6533 types and a report sent with 8BITMIME; without SMTPUTF8, or
// with ASCII only, the 7-bit types.
func TestInternationalReports(t *testing.T) {
	for _, tc := range []struct {
		name       string
		utf8       bool
		rcpt       string
		ret        smtp.DSNReturn
		wantDS     string
		wantRet    string
		wantFinal  string
		want8BitMT bool
	}{
		{"SMTPUTF8, non-ASCII, headers", true, "jörg@bücher.example", "", "message/global-delivery-status", "message/global-headers", "utf-8; jörg@bücher.example", true},
		{"SMTPUTF8, non-ASCII, full", true, "jörg@bücher.example", smtp.DSNReturnFull, "message/global-delivery-status", "message/global", "utf-8; jörg@bücher.example", true},
		{"SMTPUTF8, ASCII", true, "a@x.test", "", "message/delivery-status", "text/rfc822-headers", "rfc822; a@x.test", false},
		{"no SMTPUTF8, non-ASCII", false, "jörg@bücher.example", "", "message/delivery-status", "text/rfc822-headers", `utf-8; j\x{F6}rg@b\x{FC}cher.example`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.target.Rcpt = func(int, string) error { return perm550 }
			h.submit("s@example.org", rcpts(tc.rcpt), smtp.MailOptions{UTF8: tc.utf8, Return: tc.ret})
			h.waitAttempts(1)
			reps := h.reports()
			if len(reps) != 1 {
				t.Fatalf("%d reports", len(reps))
			}
			r := parseReport(t, reps[0])
			ds, _, _ := mime.ParseMediaType(r.parts[1].contentType)
			ret, _, _ := mime.ParseMediaType(r.parts[2].contentType)
			if ds != tc.wantDS || ret != tc.wantRet || r.rcpts[0]["Final-Recipient"] != tc.wantFinal {
				t.Fatalf("types %s, %s; Final-Recipient %q", ds, ret, r.rcpts[0]["Final-Recipient"])
			}
			if o := reps[0].MsgMeta.SMTPOpts; (o.Body == smtp.Body8BitMIME) != tc.want8BitMT {
				t.Fatalf("report sent with BODY=%q", o.Body)
			}
			py := pyParse(t, r.raw)
			if got := py.Recipients[0].Typed["Final-Recipient"]; got[1] != tc.rcpt {
				t.Fatalf("Python decodes Final-Recipient to %v, want %s", got, tc.rcpt)
			}
		})
	}
}

// TestEnvelopeIDAndORCPTInReport: ENVID and ORCPT, as the server decoded
// them, reach the nested target unchanged on every attempt and come back in
// the report.
func TestEnvelopeIDAndORCPTInReport(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.cfg.policy.MaxTries = 3 })
	h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": temp451, "b@x.test": temp451})
	envid := "QQ314159+x=y" // "+" and "=" are xtext-encoded on the wire
	ra := smtp.RcptOptions{OriginalRecipientType: smtp.DSNAddressTypeRFC822, OriginalRecipient: "Alias+tag@old.example"}
	rb := smtp.RcptOptions{OriginalRecipientType: smtp.DSNAddressTypeUTF8, OriginalRecipient: "ünï@old.example"}
	h.submit("s@example.org", []rcpt{{"a@x.test", ra}, {"b@x.test", rb}}, smtp.MailOptions{EnvelopeID: envid, UTF8: true})
	h.runToEnd()
	recs := h.target.Records()
	if len(recs) != 3 {
		t.Fatalf("%d attempts", len(recs))
	}
	for i, rec := range recs {
		if rec.MsgMeta.SMTPOpts.EnvelopeID != envid {
			t.Errorf("attempt %d: ENVID %q", i+1, rec.MsgMeta.SMTPOpts.EnvelopeID)
		}
		for j, want := range []smtp.RcptOptions{ra, rb} {
			if o := rec.Rcpts[j].Opts; o.OriginalRecipient != want.OriginalRecipient || o.OriginalRecipientType != want.OriginalRecipientType {
				t.Errorf("attempt %d: ORCPT %s;%s", i+1, o.OriginalRecipientType, o.OriginalRecipient)
			}
		}
	}
	reps := h.reports()
	if len(reps) != 1 {
		t.Fatalf("%d reports", len(reps))
	}
	r := parseReport(t, reps[0])
	if r.perMessage["Original-Envelope-Id"] != envid {
		t.Errorf("Original-Envelope-Id %q, want %q", r.perMessage["Original-Envelope-Id"], envid)
	}
	if got := r.rcpts[0]["Original-Recipient"]; got != "rfc822;Alias+tag@old.example" {
		t.Errorf("Original-Recipient %q", got)
	}
	if got := r.rcpts[1]["Original-Recipient"]; got != "utf-8;ünï@old.example" {
		t.Errorf("Original-Recipient %q", got)
	}
	py := pyParse(t, r.raw)
	if got := py.Recipients[1].Typed["Original-Recipient"]; got != [2]string{"utf-8", "ünï@old.example"} {
		t.Errorf("Python reads Original-Recipient %v", got)
	}
}

// TestUnusableEnvelopeValuesStillReported: an ENVID that is not printable
// ASCII or an ORCPT of an unknown address type (possible through the
// module API, which does not check them) is left out of the report rather
// than keeping the report from being sent.
func TestUnusableEnvelopeValuesStillReported(t *testing.T) {
	h := newHarness(t)
	h.target.Rcpt = func(int, string) error { return perm550 }
	h.submit("s@example.org", []rcpt{
		{"a@x.test", smtp.RcptOptions{OriginalRecipientType: "x-unknown", OriginalRecipient: "a@old.example"}},
		{"b@x.test", smtp.RcptOptions{OriginalRecipientType: smtp.DSNAddressTypeRFC822, OriginalRecipient: "b@old.example"}},
	}, smtp.MailOptions{EnvelopeID: "bad\x01id\r\nX: y"})
	h.waitAttempts(1)
	reps := h.reports()
	if len(reps) != 1 {
		t.Fatalf("%d reports, want 1", len(reps))
	}
	r := parseReport(t, reps[0])
	if _, ok := r.perMessage["Original-Envelope-Id"]; ok {
		t.Errorf("unusable ENVID reported: %q", r.perMessage["Original-Envelope-Id"])
	}
	if _, ok := r.rcpts[0]["Original-Recipient"]; ok {
		t.Errorf("ORCPT of unknown type reported: %q", r.rcpts[0]["Original-Recipient"])
	}
	if got := r.rcpts[1]["Original-Recipient"]; got != "rfc822;b@old.example" {
		t.Errorf("valid ORCPT lost: %q", got)
	}
	if len(h.queued()) != 0 {
		t.Fatal("message kept")
	}
}

// TestUnsendableReportGivenUp: a report the generator refuses for good (here
// a sender address longer than any address field allows) is counted and
// logged once, and does not keep the message in the queue; an overlong
// ENVID is left out instead.
func TestUnsendableReportGivenUp(t *testing.T) {
	t.Run("sender too long", func(t *testing.T) {
		h := newHarness(t)
		h.target.Rcpt = func(int, string) error { return perm550 }
		before := testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", "error"))
		h.submit(strings.Repeat("s", 1000)+"@example.org", rcpts("a@x.test"), smtp.MailOptions{})
		h.waitAttempts(1)
		if got := testutil.ToFloat64(metrics.DSNsNotSent.WithLabelValues("test_queue", "error")) - before; got != 1 {
			t.Fatalf("error counter grew by %v, want 1", got)
		}
		if len(h.queued()) != 0 || h.bounce.Attempts() != 0 {
			t.Fatalf("%d queued, %d hand-overs", len(h.queued()), h.bounce.Attempts())
		}
	})
	t.Run("ENVID too long", func(t *testing.T) {
		h := newHarness(t)
		h.target.Rcpt = func(int, string) error { return perm550 }
		h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{EnvelopeID: strings.Repeat("e", 1000)})
		h.waitAttempts(1)
		reps := h.reports()
		if len(reps) != 1 {
			t.Fatalf("%d reports", len(reps))
		}
		if _, ok := parseReport(t, reps[0]).perMessage["Original-Envelope-Id"]; ok {
			t.Fatal("overlong ENVID reported")
		}
	})
}

// TestHostileErrorText: whatever the remote side answers, the report stays
// well-formed and no text escapes its field.
func TestHostileErrorText(t *testing.T) {
	hostile := "bad\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; evil@x.test\x00\x1b[31m\x7f ünïcödé \xff\xfe " +
		strings.Repeat("A", 100<<10)
	for _, utf8 := range []bool{false, true} {
		t.Run(fmt.Sprintf("SMTPUTF8=%v", utf8), func(t *testing.T) {
			h := newHarness(t)
			h.target.Rcpt = func(int, string) error {
				return &exterrors.SMTPError{Code: 550, EnhancedCode: exterrors.EnhancedCode{5, 7, 1}, Message: hostile,
					Misc: map[string]interface{}{"remote_server": "mx.x.test\r\nX-Injected: 1"}}
			}
			h.submit("s@example.org", rcpts("a@x.test", "ü@x.test"), smtp.MailOptions{UTF8: utf8})
			h.waitAttempts(1)
			reps := h.reports()
			if len(reps) != 1 {
				t.Fatalf("%d reports", len(reps))
			}
			r := parseReport(t, reps[0])
			if len(r.rcpts) != 2 {
				t.Fatalf("%d recipient groups", len(r.rcpts))
			}
			for _, g := range r.rcpts {
				if g["Action"] != "failed" || g["Status"] != "5.7.1" || len(g) != 6 {
					t.Errorf("fields %v", g)
				}
				if !strings.HasPrefix(g["Diagnostic-Code"], "smtp; 550 5.7.1 bad Action: delivered Final-Recipient") {
					t.Errorf("Diagnostic-Code %.80q", g["Diagnostic-Code"])
				}
				if !strings.HasPrefix(g["Remote-MTA"], "dns; mx.x.test") {
					t.Errorf("Remote-MTA %q", g["Remote-MTA"])
				}
			}
			for i, c := range string(r.parts[1].data) {
				if (c < ' ' && c != '\r' && c != '\n') || c == 0x7f {
					t.Fatalf("control or invalid character %U at %d of the delivery-status part", c, i)
				}
			}
			if !utf8 && !isASCIIBytes(r.parts[1].data) {
				t.Fatal("8-bit octets in a 7-bit delivery-status part")
			}
			if strings.Contains(r.text, "\x1b") || strings.Contains(r.text, "\x00") {
				t.Fatal("control characters in the text part")
			}
			py := pyParse(t, r.raw)
			if len(py.Recipients) != 2 || py.Field(0, "Action") != "failed" {
				t.Fatalf("Python reads %d recipients", len(py.Recipients))
			}
		})
	}
}

func isASCIIBytes(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

// TestHundredRecipientsOneReport: one report lists all 100 failed
// recipients, in order.
func TestHundredRecipientsOneReport(t *testing.T) {
	h := newHarness(t)
	h.target.Rcpt = func(int, string) error { return perm550 }
	var addrs []string
	for i := 0; i < 100; i++ {
		addrs = append(addrs, fmt.Sprintf("r%03d@x.test", i))
	}
	h.submit("s@example.org", rcpts(addrs...), smtp.MailOptions{})
	h.waitAttempts(1)
	reps := h.reports()
	if len(reps) != 1 {
		t.Fatalf("%d reports, want 1", len(reps))
	}
	r := parseReport(t, reps[0])
	if len(r.rcpts) != 100 {
		t.Fatalf("%d groups", len(r.rcpts))
	}
	for i, g := range r.rcpts {
		if g["Final-Recipient"] != "rfc822; "+addrs[i] || g["Action"] != "failed" {
			t.Fatalf("group %d: %v", i, g)
		}
	}
	py := pyParse(t, r.raw)
	if len(py.Recipients) != 100 || py.Field(99, "Final-Recipient") != "rfc822; r099@x.test" {
		t.Fatalf("Python reads %d recipients", len(py.Recipients))
	}
	if got := testutil.ToFloat64(metrics.DSNs.WithLabelValues("test_queue", "failed")); got < 100 {
		t.Fatalf("generated counter %v", got)
	}
}

// namedTarget is a FakeTarget that claims to be another module.
type namedTarget struct {
	*testutils.FakeTarget
	name string
}

func (n namedTarget) Name() string { return n.name }

// TestSuccessAction: success reports say delivered for local storage and
// LMTP, relayed for anything else (the documented rule), and the queue
// writes what was chosen.
func TestSuccessAction(t *testing.T) {
	for name, want := range map[string]string{
		"imapsql": "delivered", "target.lmtp": "delivered",
		"target.remote": "relayed", "target.smtp": "relayed", "msgpipeline": "relayed",
		"target.queue": "relayed", "target.spool": "relayed", testutils.FakeTargetModName: "relayed",
	} {
		if got := successActionFor(namedTarget{&testutils.FakeTarget{}, name}); got != want {
			t.Errorf("successActionFor(%s) = %s, want %s", name, got, want)
		}
	}
	var _ module.DeliveryTarget = namedTarget{}
	for _, action := range []string{"delivered", "relayed"} {
		t.Run(action, func(t *testing.T) {
			h := newHarness(t, func(h *harness) { h.cfg.successAction = action })
			h.submit("s@example.org", []rcpt{{"a@x.test", smtp.RcptOptions{Notify: notify(smtp.DSNNotifySuccess)}}}, smtp.MailOptions{})
			h.waitAttempts(1)
			reps := h.reports()
			if len(reps) != 1 {
				t.Fatalf("%d reports", len(reps))
			}
			r := parseReport(t, reps[0])
			g := r.rcpts[0]
			if g["Action"] != action || g["Status"] != "2.0.0" {
				t.Fatalf("fields %v", g)
			}
			if _, ok := g["Diagnostic-Code"]; ok {
				t.Fatalf("success report with Diagnostic-Code %q", g["Diagnostic-Code"])
			}
		})
	}
}

// TestDelayReportNotRepeatedAfterRestart: a delay report already sent is not sent
// again after a restart.
func TestDelayReportNotRepeatedAfterRestart(t *testing.T) {
	h := newHarness(t, dsnSettings)
	h.target.Rcpt = testutils.FailRcpts(map[string]error{"a@x.test": temp451})
	h.submit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{})
	h.waitAttempts(1)
	h.advance(time.Minute)
	h.waitAttempts(1)
	h.advance(4 * time.Minute)
	h.waitAttempts(1)
	if len(h.reports()) != 1 {
		t.Fatalf("%d reports at delay_warning", len(h.reports()))
	}
	q := h.queued()
	if len(q) != 1 || q[0].Rcpts[0].State != store.RcptPending {
		t.Fatal("message not pending")
	}
	h.restart()
	h.driveToEnd()
	var acts []string
	for _, d := range h.reports() {
		acts = append(acts, parseReport(t, d).rcpts[0]["Action"])
	}
	if strings.Join(acts, ",") != "delayed,failed" {
		t.Fatalf("reports %v", acts)
	}
}

// TestReceivedFromMTA: the client's HELO name is reported unless the
// endpoint asked not to trace the sender.
func TestReceivedFromMTA(t *testing.T) {
	for _, dontTrace := range []bool{false, true} {
		t.Run(fmt.Sprintf("DontTraceSender=%v", dontTrace), func(t *testing.T) {
			h := newHarness(t)
			h.target.Rcpt = func(int, string) error { return perm550 }
			ctx := t.Context()
			meta := &module.MsgMetadata{ID: "m1", DontTraceSender: dontTrace,
				Conn: &module.ConnState{Hostname: "client.example.net"}}
			d, err := h.q.Start(ctx, meta, "s@example.org")
			if err != nil {
				t.Fatal(err)
			}
			if err := d.AddRcpt(ctx, "a@x.test", smtp.RcptOptions{}); err != nil {
				t.Fatal(err)
			}
			if err := d.Body(ctx, testHeader(), testBuffer()); err != nil {
				t.Fatal(err)
			}
			if err := d.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			h.waitAttempts(1)
			reps := h.reports()
			if len(reps) != 1 {
				t.Fatalf("%d reports", len(reps))
			}
			r := parseReport(t, reps[0])
			got, ok := r.perMessage["Received-From-MTA"]
			if ok == dontTrace || (ok && got != "dns; client.example.net") {
				t.Fatalf("Received-From-MTA %q (present %v)", got, ok)
			}
			if r.perMessage["Reporting-MTA"] != "dns; mx.example.org" || r.perMessage["Arrival-Date"] != t0.Format(time.RFC1123Z) {
				t.Fatalf("per-message fields %v", r.perMessage)
			}
		})
	}
}
