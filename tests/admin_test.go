//go:build unix

package tests

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/testutils"
)

// The admin end-to-end test drives every `maddy spool` verb through the
// built binary against a running server whose next hop (an in-process
// sink) answers 451 to the remote domains. The queue retries only after an
// hour, so every attempt after the first one is caused by a command, and
// the test can tell which command caused it.

// remoteDomains are the recipient domains the sink defers while
// deferRemote is its script; mail to anyone else (the senders, who receive
// the DSNs) is accepted.
var remoteDomains = []string{"x.test", "y.test", "z.test"}

func deferRemote(stage, _, rcpt string, _ int) *smtp.SMTPError {
	if stage != testutils.StageRCPT {
		return nil
	}
	for _, d := range remoteDomains {
		if strings.HasSuffix(strings.ToLower(rcpt), "@"+d) {
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "remote busy, try later")
		}
	}
	return nil
}

// writeAdminConfig writes writeConfig's configuration without metrics
// and with one retry after an hour, so that no attempt happens unless a
// command asks for it. p.Extra goes into the target.spool block. The
// sink of these tests defers everything, and the commands they test must
// reach every message they select: dead-destination suspension, which
// would postpone the retried mail once the next hop has failed 5 times,
// is off (tests/destinations_test.go tests it).
func writeAdminConfig(t *testing.T, p params) string {
	t.Helper()
	p.Retry, p.MaxTries = "1h", "10"
	p.Extra = append([]string{"dead_destination_after 0"}, p.Extra...)
	return writeConfig(t, p)
}

// newAdminEnv starts a server on writeAdminConfig's configuration (extra
// lines go into the target.spool block).
func newAdminEnv(t *testing.T, sink *testutils.SMTPSink, extra ...string) *env {
	t.Helper()
	return startEnv(t, sink, func(p *params) string {
		p.MetricsPort, p.Extra = 0, extra
		return writeAdminConfig(t, *p)
	})
}

// cliResult is what one `maddy spool` run printed and how it exited.
type cliResult struct {
	args           []string
	stdout, stderr string
	code           int
}

func (r cliResult) String() string {
	return fmt.Sprintf("maddy spool %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(r.args, " "), r.code, r.stdout, r.stderr)
}

// spool runs `maddy --config CFG spool ARGS...` and returns what it did.
func (e *env) spool(args ...string) cliResult {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, maddyBin, append([]string{"--config", e.cfg, "spool"}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := cliResult{args: args, stdout: stdout.String(), stderr: stderr.String()}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr):
		res.code = exitErr.ExitCode()
	default:
		e.t.Fatalf("maddy spool %s: %v", strings.Join(args, " "), err)
	}
	if ctx.Err() != nil {
		e.t.Fatalf("maddy spool %s did not finish within %v", strings.Join(args, " "), waitTimeout)
	}
	return res
}

// spoolOK is spool, failing the test unless the command exits 0.
func (e *env) spoolOK(args ...string) cliResult {
	e.t.Helper()
	r := e.spool(args...)
	if r.code != 0 {
		e.t.Fatalf("unexpected failure: %v", r)
	}
	return r
}

// listJSON runs `spool list --json ARGS` and decodes every line strictly:
// a field the schema does not have fails the test.
func (e *env) listJSON(args ...string) []admin.MessageInfo {
	e.t.Helper()
	r := e.spoolOK(append([]string{"list", "--json"}, args...)...)
	var out []admin.MessageInfo
	for _, line := range nonEmptyLines(r.stdout) {
		var mi admin.MessageInfo
		if err := strictDecode(line, &mi); err != nil {
			e.t.Fatalf("list --json line %q: %v", line, err)
		}
		out = append(out, mi)
	}
	return out
}

// byID indexes a listing.
func byID(list []admin.MessageInfo) map[string]admin.MessageInfo {
	m := make(map[string]admin.MessageInfo, len(list))
	for _, mi := range list {
		m[mi.ID] = mi
	}
	return m
}

// idsOf returns the sorted IDs of a listing.
func idsOf(list []admin.MessageInfo) []string {
	ids := make([]string, 0, len(list))
	for _, mi := range list {
		ids = append(ids, mi.ID)
	}
	sort.Strings(ids)
	return ids
}

func sorted(ids ...string) []string {
	out := append([]string(nil), ids...)
	sort.Strings(out)
	return out
}

// waitQueue polls `spool list --json` (every 100ms, up to waitTimeout)
// until cond holds for the whole queue, and returns that listing.
func (e *env) waitQueue(what string, cond func(map[string]admin.MessageInfo) bool) map[string]admin.MessageInfo {
	e.t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		q := byID(e.listJSON())
		if cond(q) {
			return q
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("waiting for %s: queue is still %+v", what, q)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// settled reports whether id is queued, not in flight, and has been
// attempted at least attempts times.
func settled(q map[string]admin.MessageInfo, id string, attempts int) bool {
	mi, ok := q[id]
	return ok && !mi.InFlight && mi.Attempts >= attempts
}

func nonEmptyLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) != "" {
			out = append(out, l)
		}
	}
	return out
}

func strictDecode(line string, v any) error {
	dec := json.NewDecoder(strings.NewReader(line))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// jsonKeys returns the top-level keys of a JSON object.
func jsonKeys(t *testing.T, line string) map[string]bool {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		t.Fatalf("%q: %v", line, err)
	}
	keys := make(map[string]bool, len(m))
	for k := range m {
		keys[k] = true
	}
	return keys
}

func mustContain(t *testing.T, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("%s does not contain %q:\n%s", what, sub, s)
		}
	}
}

// rawRequest writes req to the control socket as is and returns the first
// response line; the connection is bounded by a deadline so a server that
// never answers fails the test instead of hanging it.
func rawRequest(t *testing.T, socket string, req []byte, closeWrite bool) admin.Response {
	t.Helper()
	c, err := net.DialTimeout("unix", socket, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(waitTimeout)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(req); err != nil {
		t.Fatalf("writing %d bytes: %v", len(req), err)
	}
	if closeWrite {
		if err := c.(*net.UnixConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("request %.40q: no response line: %v (read %q)", req, err, line)
	}
	var resp admin.Response
	if err := strictDecode(line, &resp); err != nil {
		t.Fatalf("request %.40q: response %q is not a protocol line: %v", req, line, err)
	}
	return resp
}

var queueIDRe = regexp.MustCompile(`^[0-9a-f]{16}$`)

// TestSpoolAdmin drives every `maddy spool` verb through the CLI.
func TestSpoolAdmin(t *testing.T) {
	t.Parallel()
	sink := newSink(t, testutils.WithScript(deferRemote))
	e := newAdminEnv(t, sink)
	socket := filepath.Join(e.p.Dir, "run", "spool.sock")
	start := time.Now()

	// Four messages from two sender domains to three recipient domains.
	type sent struct {
		from  string
		rcpts []string
		id    string // Message-ID
		data  []byte
	}
	msgs := []*sent{
		{from: "alice@a.example", rcpts: []string{"bob@x.test"}},
		{from: "carol@b.example", rcpts: []string{"dan@y.test", "erin@y.test"}},
		{from: "alice@a.example", rcpts: []string{"fred@z.test"}},
		{from: "gina@b.example", rcpts: []string{"hank@x.test"}},
	}
	for i, m := range msgs {
		m.id = msgID(t, i+1)
		m.data = newMessage(m.from, m.rcpts, m.id, testBody(m.id))
		if err := submitData(e.smtpAddr(), m.from, m.rcpts, m.data); err != nil {
			t.Fatalf("submitting %s: %v", m.id, err)
		}
	}

	// Each message is tried once at arrival (451) and then waits an hour.
	q := e.waitQueue("4 messages tried once", func(q map[string]admin.MessageInfo) bool {
		n := 0
		for id := range q {
			if settled(q, id, 1) {
				n++
			}
		}
		return len(q) == 4 && n == 4
	})
	// Queue IDs by first recipient, which is unique to each message.
	qid := map[string]string{}
	for _, mi := range q {
		if len(mi.Pending) > 0 {
			qid[mi.Pending[0].Addr] = mi.ID
		}
	}
	id1, id2, id3, id4 := qid["bob@x.test"], qid["dan@y.test"], qid["fred@z.test"], qid["hank@x.test"]
	byQID := map[string]*sent{id1: msgs[0], id2: msgs[1], id3: msgs[2], id4: msgs[3]}
	if len(byQID) != 4 || id1 == "" || id2 == "" || id3 == "" || id4 == "" {
		t.Fatalf("cannot tell the messages apart: %+v", q)
	}

	t.Run("socket", func(t *testing.T) {
		fi, err := os.Lstat(socket)
		if err != nil {
			t.Fatalf("control socket: %v", err)
		}
		if fi.Mode()&os.ModeSocket == 0 {
			t.Errorf("%s is %v, not a socket", socket, fi.Mode())
		}
		if perm := fi.Mode().Perm(); perm != 0o600 {
			t.Errorf("%s has mode %o, want 600", socket, perm)
		}
		if uid := fi.Sys().(*syscall.Stat_t).Uid; int(uid) != os.Getuid() {
			t.Errorf("%s is owned by uid %d, want the server's %d", socket, uid, os.Getuid())
		}
		// --socket names it explicitly; the answer comes from the server.
		r := e.spoolOK("stats", "--json", "--socket", socket)
		if strings.Contains(r.stderr, "read-only") {
			t.Errorf("stats over --socket read the directory: %v", r)
		}
	})

	t.Run("list", func(t *testing.T) {
		r := e.spoolOK("list")
		mustContain(t, "list", r.stdout, "== outq", "ID", "NEXT ATTEMPT", id1, id2, id3, id4,
			"alice@a.example", "carol@b.example", "2/2", "dan@y.test  (1 tries)  451 4.4.1",
			"-- 4 messages, 5 recipients pending")
		if ls := e.spoolOK("ls"); ls.stdout != r.stdout {
			t.Errorf("ls and list differ:\n%s\n---\n%s", ls.stdout, r.stdout)
		}
	})

	t.Run("list --json schema", func(t *testing.T) {
		r := e.spoolOK("list", "--json")
		lines := nonEmptyLines(r.stdout)
		if len(lines) != 4 {
			t.Fatalf("list --json printed %d lines, want 4:\n%s", len(lines), r.stdout)
		}
		for _, k := range []string{"instance", "id", "msg_id", "size", "arrival", "from", "rcpts", "attempts", "next_attempt", "held", "pending"} {
			if !jsonKeys(t, lines[0])[k] {
				t.Errorf("list --json line lacks %q: %s", k, lines[0])
			}
		}
		for _, mi := range e.listJSON() {
			m := byQID[mi.ID]
			if m == nil {
				t.Errorf("unexpected message %+v", mi)
				continue
			}
			if mi.Instance != "outq" || !queueIDRe.MatchString(mi.ID) || mi.MsgID == "" {
				t.Errorf("%s: instance %q, id %q, msg_id %q", m.id, mi.Instance, mi.ID, mi.MsgID)
			}
			// The stored message is what was sent plus a Received field.
			if mi.Size <= int64(len(m.data)) {
				t.Errorf("%s: size %d, want more than the %d bytes sent", m.id, mi.Size, len(m.data))
			}
			if mi.Arrival.Before(start.Add(-time.Second)) || mi.Arrival.After(time.Now()) {
				t.Errorf("%s: arrival %v, want after %v", m.id, mi.Arrival, start)
			}
			if mi.From != m.from || mi.Rcpts != len(m.rcpts) || mi.Attempts != 1 || mi.Held || mi.InFlight {
				t.Errorf("%s: from %q rcpts %d attempts %d held %v in_flight %v", m.id, mi.From, mi.Rcpts, mi.Attempts, mi.Held, mi.InFlight)
			}
			if d := mi.NextAttempt.Sub(mi.Arrival); d < 59*time.Minute || d > 61*time.Minute {
				t.Errorf("%s: next attempt %v after arrival, want the 1h retry", m.id, d)
			}
			if len(mi.Pending) != len(m.rcpts) {
				t.Errorf("%s: %d pending, want %d", m.id, len(mi.Pending), len(m.rcpts))
				continue
			}
			for i, p := range mi.Pending {
				if p.Addr != m.rcpts[i] || p.State != "pending" || p.Tries != 1 || !p.Temporary ||
					!strings.HasPrefix(p.LastError, "451 4.4.1") || p.LastAttempt.Before(mi.Arrival) {
					t.Errorf("%s: pending[%d] = %+v", m.id, i, p)
				}
			}
		}
	})

	t.Run("list filters", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			want []string
		}{
			{[]string{"--from", "alice@a.example"}, sorted(id1, id3)},
			{[]string{"--from", "@B.EXAMPLE"}, sorted(id2, id4)},
			{[]string{"--to", "@x.test"}, sorted(id1, id4)},
			{[]string{"--to", "erin@y.test"}, sorted(id2)},
			{[]string{"--from", "@b.example", "--to", "@x.test"}, sorted(id4)},
			{[]string{"--older-than", "1h"}, nil},
			{[]string{"--held"}, nil},
			{[]string{id3, id2}, sorted(id2, id3)},
			{[]string{"--from", "alice@a.example", id2, id3}, sorted(id3)},
			// Flags may follow the IDs.
			{[]string{id1, id4, "--to", "@x.test"}, sorted(id1, id4)},
		} {
			got := idsOf(e.listJSON(tc.args...))
			if strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Errorf("list %v = %v, want %v", tc.args, got, tc.want)
			}
		}
		// Every message gets older than a second.
		e.waitQueue("--older-than 1s to match every message", func(map[string]admin.MessageInfo) bool {
			return len(e.listJSON("--older-than", "1s")) == 4
		})
		if r := e.spool("list", "--to", "a b"); r.code == 0 {
			t.Errorf("list with a malformed --to succeeded: %v", r)
		}
	})

	t.Run("stats", func(t *testing.T) {
		r := e.spoolOK("stats")
		mustContain(t, "stats", r.stdout, "== outq", "4 messages", "5 recipients pending", "deferred 4", "x.test", "451 4.4.1")
		r = e.spoolOK("stats", "--json")
		var st admin.Stats
		if err := strictDecode(r.stdout, &st); err != nil {
			t.Fatalf("stats --json %q: %v", r.stdout, err)
		}
		if st.Instance != "outq" || st.Messages != 4 || st.Recipients != 5 || st.Held != 0 || st.New != 0 || st.Deferred != 4 || st.Bytes <= 0 {
			t.Errorf("stats = %+v", st)
		}
		if st.OldestArrival.Before(start.Add(-time.Second)) || st.OldestAge <= 0 {
			t.Errorf("oldest arrival %v, age %v", st.OldestArrival, st.OldestAge)
		}
		domains := map[string]int{}
		for _, c := range st.TopDomains {
			domains[c.Key] = c.Recipients
			if len(c.Ages) != len(st.AgeBuckets)+1 || c.Ages[0] != c.Recipients {
				t.Errorf("domain %s: ages %v (buckets %v), want all in the first column", c.Key, c.Ages, st.AgeBuckets)
			}
		}
		if domains["x.test"] != 2 || domains["y.test"] != 2 || domains["z.test"] != 1 || len(domains) != 3 {
			t.Errorf("top domains %+v", st.TopDomains)
		}
		if len(st.TopErrors) != 1 || st.TopErrors[0].Recipients != 5 || !strings.HasPrefix(st.TopErrors[0].Key, "451 4.4.1") {
			t.Errorf("top errors %+v", st.TopErrors)
		}
	})

	t.Run("show", func(t *testing.T) {
		m := msgs[1]
		r := e.spoolOK("show", id2)
		mustContain(t, "show", r.stdout, "Message:", id2+" (instance outq)", "State:", "queued, next attempt",
			"From:", "carol@b.example", "Attempts:", "1 (first", "Received via:", "ESMTP",
			"dan@y.test  pending, 1 tries", "erin@y.test  pending, 1 tries", "last error: 451 4.4.1",
			"Attempt history", "temporary 2")

		r = e.spoolOK("show", id2, "--json")
		var d admin.Detail
		if err := strictDecode(r.stdout, &d); err != nil {
			t.Fatalf("show --json %q: %v", r.stdout, err)
		}
		if d.ID != id2 || d.From != m.from || d.Instance != "outq" || len(d.All) != 2 || len(d.Pending) != 2 ||
			d.Attempts != 1 || d.FirstAttempt.IsZero() || d.Proto != "ESMTP" || d.RemoteAddr == "" {
			t.Errorf("show --json = %+v", d)
		}
		if len(d.History) != 1 || d.History[0].Temporary != 2 || d.History[0].Delivered != 0 || !strings.Contains(d.History[0].Error, "451") {
			t.Errorf("history %+v", d.History)
		}
		mustContain(t, "show --json header", d.Header, "Message-ID: <"+m.id+">", "Subject: e2e "+m.id)

		// The stored message is what was sent, behind the Received field
		// the server prepended.
		whole := e.spoolOK("show", "--headers", "--body", id2).stdout
		if !strings.HasPrefix(whole, "Received: ") || !strings.HasSuffix(whole, string(m.data)) {
			t.Errorf("show --headers --body:\n%q\nwant Received: + what was sent:\n%q", whole, m.data)
		}
		if body := e.spoolOK("show", "--body", id2).stdout; body != testBody(m.id) {
			t.Errorf("show --body = %q, want %q", body, testBody(m.id))
		}
		hdr := e.spoolOK("show", "--headers", id2).stdout
		if want := strings.TrimSuffix(whole, testBody(m.id)); hdr != want {
			t.Errorf("show --headers = %q, want %q", hdr, want)
		}
		if r := e.spool("show", "--json", "--body", id2); r.code == 0 {
			t.Errorf("show --json --body succeeded: %v", r)
		}
	})

	t.Run("hold then retry leaves it held", func(t *testing.T) {
		before := sink.RcptAttempts("bob@x.test")
		r := e.spoolOK("hold", id1)
		mustContain(t, "hold", r.stdout, "hold (outq): 1 matched, 1 changed", id1+"  changed: held")
		if got := idsOf(e.listJSON("--held")); strings.Join(got, ",") != id1 {
			t.Errorf("list --held = %v, want [%s]", got, id1)
		}
		mustContain(t, "list", e.spoolOK("list", id1).stdout, "held")
		mustContain(t, "show", e.spoolOK("show", id1).stdout, "held (not attempted until released)")

		r = e.spoolOK("retry", id1, "--json")
		var res admin.Result
		if err := strictDecode(r.stdout, &res); err != nil {
			t.Fatalf("retry --json %q: %v", r.stdout, err)
		}
		if res.Instance != "outq" || res.Op != admin.OpRetry || res.Matched != 1 || res.Changed != 0 || res.Unchanged != 1 ||
			len(res.Items) != 1 || res.Items[0].ID != id1 || res.Items[0].Outcome != admin.Unchanged || !strings.Contains(res.Items[0].Detail, "held") {
			t.Errorf("retry of a held message = %+v", res)
		}

		// A message retried after it is attempted at once; once its
		// attempt is over, the held one would have been attempted too
		// (it was made due first) had retry released it.
		before4 := sink.RcptAttempts("hank@x.test")
		mustContain(t, "retry", e.spoolOK("retry", id4).stdout, id4+"  changed: due now")
		q := e.waitQueue("the retried message to be attempted", func(q map[string]admin.MessageInfo) bool {
			return settled(q, id4, 2)
		})
		if n := sink.RcptAttempts("hank@x.test"); n != before4+1 {
			t.Errorf("hank@x.test was offered %d times after retry, want %d", n, before4+1)
		}
		if mi := q[id1]; !mi.Held || mi.InFlight || mi.Attempts != 1 {
			t.Errorf("held message after retry: %+v", mi)
		}
		if n := sink.RcptAttempts("bob@x.test"); n != before {
			t.Errorf("the held message was attempted: bob@x.test offered %d times, before %d", n, before)
		}
		if e.srv.countLog("operator command", `"op":"hold"`, id1) == 0 {
			t.Errorf("the hold was not logged")
		}
	})

	t.Run("release attempts at once", func(t *testing.T) {
		before := sink.RcptAttempts("bob@x.test")
		r := e.spoolOK("release", id1)
		mustContain(t, "release", r.stdout, "release (outq): 1 matched, 1 changed", id1+"  changed: released, due now")
		q := e.waitQueue("the released message to be attempted", func(q map[string]admin.MessageInfo) bool {
			return settled(q, id1, 2)
		})
		if mi := q[id1]; mi.Held {
			t.Errorf("released message is still held: %+v", mi)
		}
		if n := sink.RcptAttempts("bob@x.test"); n != before+1 {
			t.Errorf("bob@x.test offered %d times after release, want %d", n, before+1)
		}
		if len(e.listJSON("--held")) != 0 {
			t.Errorf("list --held is not empty after release")
		}
	})

	t.Run("bulk delete and bounce need --yes", func(t *testing.T) {
		// One message selected by a filter: no confirmation needed.
		r := e.spoolOK("hold", "--to", "dan@y.test")
		mustContain(t, "hold --to", r.stdout, "hold (outq): 1 matched, 1 changed")
		// Two, for the verbs that cannot be undone: refused without
		// --yes, and nothing changes.
		for _, verb := range []string{"delete", "bounce"} {
			r = e.spool(verb, "--from", "@b.example")
			if r.code == 0 || !strings.Contains(r.stderr, verb+" would change 2 messages") || !strings.Contains(r.stderr, "--yes") {
				t.Errorf("bulk %s without --yes: %v", verb, r)
			}
		}
		if got := idsOf(e.listJSON("--from", "@b.example")); strings.Join(got, ",") != strings.Join(sorted(id2, id4), ",") {
			t.Errorf("after refused bulk changes, queued from @b.example = %v, want [%s %s]", got, id2, id4)
		}
		if r := e.spool("retry"); r.code == 0 {
			t.Errorf("retry without IDs or filters succeeded: %v", r)
		}
		// hold and release of several need none (see also
		// TestBulkConfirmation).
		r = e.spoolOK("hold", "--from", "@b.example")
		mustContain(t, "bulk hold", r.stdout, "hold (outq): 2 matched, 1 changed, 1 unchanged", id2+"  unchanged: already held")
		if got := idsOf(e.listJSON("--held")); strings.Join(got, ",") != strings.Join(sorted(id2, id4), ",") {
			t.Errorf("held = %v, want [%s %s]", got, id2, id4)
		}

		r = e.spoolOK("release", "--held", "--json")
		var res admin.Result
		if err := strictDecode(r.stdout, &res); err != nil {
			t.Fatalf("release --json %q: %v", r.stdout, err)
		}
		if res.Op != admin.OpRelease || res.Matched != 2 || res.Changed != 2 || res.Failed != 0 || len(res.Items) != 0 {
			t.Errorf("release --held = %+v", res)
		}
		// Both are attempted at once; wait for that to end before the
		// next steps act on them.
		e.waitQueue("the released messages to be attempted", func(q map[string]admin.MessageInfo) bool {
			return settled(q, id2, 2) && settled(q, id4, 3) && !q[id2].Held && !q[id4].Held
		})
	})

	t.Run("unknown ID", func(t *testing.T) {
		const unknown = "00000000ffffffff"
		r := e.spool("hold", unknown)
		if r.code != 1 || !strings.Contains(r.stdout, unknown+"  not queued") {
			t.Errorf("hold of an unknown ID: %v", r)
		}
		// A known and an unknown one: the known one changes, exit is 1.
		r = e.spool("retry", id3, unknown)
		if r.code != 1 || !strings.Contains(r.stdout, id3+"  changed: due now") || !strings.Contains(r.stdout, unknown+"  not queued") {
			t.Errorf("retry of a known and an unknown ID: %v", r)
		}
		e.waitQueue("the retried message to be attempted", func(q map[string]admin.MessageInfo) bool {
			return settled(q, id3, 2)
		})
		if r := e.spool("show", unknown); r.code != 1 || !strings.Contains(r.stderr, "no such message") {
			t.Errorf("show of an unknown ID: %v", r)
		}
		if r := e.spool("show", "not-an-id"); r.code != 1 || !strings.Contains(r.stderr, "invalid message ID") {
			t.Errorf("show of a malformed ID: %v", r)
		}
	})

	t.Run("bounce sends a DSN", func(t *testing.T) {
		r := e.spoolOK("bounce", id2)
		mustContain(t, "bounce", r.stdout, "bounce (outq): 1 matched, 1 changed", id2+"  changed: 2 recipients failed")
		got := waitSink(t, sink, "the bounce DSN", func(msgs []testutils.Message) bool { return len(dsns(msgs)) > 0 })
		d := dsns(got)
		if len(d) != 1 || len(d[0].Rcpts) != 1 || d[0].Rcpts[0] != "carol@b.example" {
			t.Fatalf("DSNs: %s", describe(d))
		}
		rep, err := parseDSN(d[0].Data)
		if err != nil {
			t.Fatalf("DSN: %v\n%s", err, d[0].Data)
		}
		if rep.MediaType != "multipart/report" || rep.ReportType != "delivery-status" || len(rep.Recipients) != 2 {
			t.Errorf("DSN %s report-type=%s with %d recipients", rep.MediaType, rep.ReportType, len(rep.Recipients))
		}
		for _, rc := range msgs[1].rcpts {
			h := rep.recipient(rc)
			if h == nil {
				t.Errorf("DSN has no block for %s", rc)
				continue
			}
			if h.Get("Action") != "failed" || h.Get("Status") != "5.0.0" {
				t.Errorf("DSN block for %s: Action %q Status %q, want failed 5.0.0", rc, h.Get("Action"), h.Get("Status"))
			}
			mustContain(t, "Diagnostic-Code of "+rc, h.Get("Diagnostic-Code"), "cancelled by the mail system administrator")
		}
		e.waitQueue("the bounced message to leave the queue", func(q map[string]admin.MessageInfo) bool {
			_, ok := q[id2]
			return !ok
		})
	})

	t.Run("delete removes it", func(t *testing.T) {
		r := e.spoolOK("delete", id3)
		mustContain(t, "delete", r.stdout, "delete (outq): 1 matched, 1 changed", id3+"  changed: deleted")
		if got := e.listJSON(id3); len(got) != 0 {
			t.Errorf("list %s after delete = %+v", id3, got)
		}
		if r := e.spool("show", id3); r.code != 1 {
			t.Errorf("show of a deleted message: %v", r)
		}
	})

	t.Run("retry delivers", func(t *testing.T) {
		sink.SetScript(nil)
		r := e.spoolOK("retry", id1)
		mustContain(t, "retry", r.stdout, id1+"  changed: due now")
		waitDelivered(t, sink, []string{msgs[0].id}, msgs[0].rcpts)
		e.waitQueue("the delivered message to leave the queue", func(q map[string]admin.MessageInfo) bool {
			_, ok := q[id1]
			return !ok
		})
		got := sink.FindByMessageID(msgs[0].id)
		if len(got) != 1 || !bytes.HasSuffix(got[0].Data, msgs[0].data) {
			t.Errorf("delivered %d copies of %s; want one ending in what was sent", len(got), msgs[0].id)
		}
		// Deleting sent nothing: the only DSN is the bounce's.
		if d := dsns(sink.Messages()); len(d) != 1 {
			t.Errorf("DSNs after delete: %s", describe(d))
		}
		// Nothing else was delivered: m4 still waits for its hour.
		if got := idsOf(e.listJSON()); strings.Join(got, ",") != id4 {
			t.Errorf("queue = %v, want [%s]", got, id4)
		}
	})

	t.Run("malformed requests", func(t *testing.T) {
		for _, tc := range []struct {
			name       string
			req        []byte
			closeWrite bool
			want       string
		}{
			{"not JSON", []byte("this is not json\n"), false, "malformed request"},
			{"no newline", []byte(`{"v":1,"op":`), true, "malformed request"},
			{"other version", []byte(`{"v":99,"op":"list"}` + "\n"), false, "unsupported protocol version"},
			{"unknown op", []byte(`{"v":1,"op":"frobnicate"}` + "\n"), false, "unknown operation"},
			{"bad ID", []byte(`{"v":1,"op":"show","filter":{"ids":["../../etc"]}}` + "\n"), false, "invalid message ID"},
			{"oversized", bytes.Repeat([]byte("x"), admin.MaxRequestSize+100), false, "larger than"},
		} {
			resp := rawRequest(t, socket, tc.req, tc.closeWrite)
			if resp.V != admin.Version || !strings.Contains(resp.Error, tc.want) || resp.Done {
				t.Errorf("%s: response %+v, want an error containing %q", tc.name, resp, tc.want)
			}
		}
		// The server still answers afterwards.
		resp := rawRequest(t, socket, []byte(`{"v":1,"op":"instances"}`+"\n"), false)
		if resp.Error != "" || len(resp.Instances) != 1 || resp.Instances[0] != "outq" {
			t.Errorf("instances after malformed requests: %+v", resp)
		}
	})

	t.Run("server down: read-only", func(t *testing.T) {
		if code := e.srv.stop(); code != 0 {
			t.Fatalf("exit status after SIGTERM = %d", code)
		}
		if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("control socket after shutdown: %v", err)
		}
		r := e.spoolOK("list")
		mustContain(t, "offline list stderr", r.stderr, "not running", "read-only")
		mustContain(t, "offline list", r.stdout, id4, "gina@b.example", "hank@x.test  (3 tries)", "-- 1 message, 1 recipient pending")
		if got := idsOf(e.listJSON("--to", "@x.test")); strings.Join(got, ",") != id4 {
			t.Errorf("offline list --json --to @x.test = %v", got)
		}
		r = e.spoolOK("show", id4)
		mustContain(t, "offline show stderr", r.stderr, "read-only")
		mustContain(t, "offline show", r.stdout, id4, "hank@x.test  pending, 3 tries")
		if body := e.spoolOK("show", "--body", id4).stdout; body != testBody(msgs[3].id) {
			t.Errorf("offline show --body = %q", body)
		}
		mustContain(t, "offline stats", e.spoolOK("stats").stdout, "1 message (")

		for _, verb := range []string{"hold", "retry", "release", "delete", "bounce"} {
			r := e.spool(verb, id4)
			if r.code == 0 || !strings.Contains(r.stderr, "maddy is not running") || !strings.Contains(r.stderr, "changes are made by the running server") {
				t.Errorf("offline %s: %v", verb, r)
			}
		}
		// Nothing changed.
		if mi := e.listJSON(); len(mi) != 1 || mi[0].Held || mi[0].Attempts != 3 {
			t.Errorf("queue after refused offline changes: %+v", mi)
		}
	})
}

// TestSpoolAdminSocketDirective: admin_socket moves the control socket (a
// relative path is relative to state_dir, as for the server) and the CLI
// finds it in the configuration; "off" means no socket at all.
func TestSpoolAdminSocketDirective(t *testing.T) {
	t.Parallel()
	sink := newSink(t)

	e := newAdminEnv(t, sink, "admin_socket ctl/admin.sock")
	socket := filepath.Join(e.p.Dir, "ctl", "admin.sock")
	fi, err := os.Lstat(socket)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin_socket ctl/admin.sock: %v, %v", fi, err)
	}
	if _, err := os.Lstat(filepath.Join(e.p.Dir, "run", "spool.sock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the default socket exists too: %v", err)
	}
	r := e.spoolOK("stats")
	if strings.Contains(r.stderr, "read-only") || !strings.Contains(r.stdout, "0 messages") {
		t.Errorf("stats with admin_socket: %v", r)
	}
	if r := e.spool("retry", "--all", "--yes"); r.code != 0 || !strings.Contains(r.stdout, "0 matched") {
		t.Errorf("retry with admin_socket: %v", r)
	}

	off := newAdminEnv(t, sink, "admin_socket off")
	if ents, err := os.ReadDir(filepath.Join(off.p.Dir, "run")); err != nil || len(ents) != 0 {
		t.Errorf("admin_socket off: run directory holds %v (%v)", ents, err)
	}
	if r := off.spool("hold", "--all", "--yes"); r.code == 0 {
		t.Errorf("hold with admin_socket off succeeded: %v", r)
	}
}
