package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
)

var t0 = time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)

// fakeQueue serves a real store; Apply records what it was asked.
type fakeQueue struct {
	*embedded.Dir
	mu      sync.Mutex
	applied []Filter
}

func (q *fakeQueue) Apply(ctx context.Context, op Op, f Filter) (Result, error) {
	q.mu.Lock()
	q.applied = append(q.applied, f)
	q.mu.Unlock()
	res := Result{Op: op}
	ids, err := Select(q, f, t0)
	for _, id := range ids {
		res.Add(id, Changed, "", f.Explicit())
	}
	return res, err
}
func (q *fakeQueue) Now() time.Time         { return t0 }
func (q *fakeQueue) Suspended() []Suspended { return nil }

func newFakeQueue(t *testing.T, msgs ...*store.Message) *fakeQueue {
	t.Helper()
	st, err := embedded.OpenDir(t.TempDir(), embedded.DirOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	for _, m := range msgs {
		body := "body\r\n"
		if err := st.Create(context.Background(), m, []byte("Subject: x\r\n\r\n"), strings.NewReader(body), int64(len(body))); err != nil {
			t.Fatal(err)
		}
	}
	return &fakeQueue{Dir: st}
}

func msg(from string, arrival time.Time, to ...string) *store.Message {
	m := &store.Message{From: from, Arrival: arrival, NextAttempt: arrival}
	for _, a := range to {
		m.Rcpts = append(m.Rcpts, store.Rcpt{Addr: a})
	}
	return m
}

// serve registers qs on a fresh socket and returns its path.
func serve(t *testing.T, qs map[string]Queue) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "spool.sock")
	for name, q := range qs {
		unreg, err := Register(path, name, q, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(unreg)
	}
	return path
}

func do(t *testing.T, path string, req Request) ([]Response, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out []Response
	err := Do(ctx, path, req, func(r Response) error { out = append(out, r); return nil })
	return out, err
}

func TestSocketListShowStatsApply(t *testing.T) {
	q := newFakeQueue(t,
		msg("a@one.test", t0.Add(-2*time.Hour), "x@dest.test"),
		msg("b@two.test", t0.Add(-time.Minute), "y@dest.test", "z@else.test"))
	path := serve(t, map[string]Queue{"outbound": q})

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a socket with 0600", fi.Mode())
	}

	resps, err := do(t, path, Request{Op: OpList, Filter: Filter{To: "@else.test"}})
	if err != nil || len(resps) != 1 || resps[0].Message.From != "b@two.test" || len(resps[0].Message.Pending) != 2 {
		t.Fatalf("list: %+v, %v", resps, err)
	}
	resps, err = do(t, path, Request{Op: OpShow, Filter: Filter{IDs: []store.ID{1}}, Headers: true, Body: true})
	if err != nil || len(resps) != 2 || resps[0].Detail.Header != "Subject: x\r\n\r\n" || string(resps[1].Content) != "body\r\n" {
		t.Fatalf("show: %+v, %v", resps, err)
	}
	resps, err = do(t, path, Request{Op: OpStats})
	if err != nil || len(resps) != 1 || resps[0].Stats.Messages != 2 || resps[0].Stats.Recipients != 3 {
		t.Fatalf("stats: %+v, %v", resps, err)
	}
	resps, err = do(t, path, Request{Op: string(OpHold), Filter: Filter{OlderThan: time.Hour}})
	if err != nil || len(resps) != 1 || resps[0].Result.Changed != 1 || resps[0].Result.Instance != "outbound" {
		t.Fatalf("hold: %+v, %v", resps, err)
	}
	if _, err := do(t, path, Request{Op: OpShow, Filter: Filter{IDs: []store.ID{99}}}); err == nil || !strings.Contains(err.Error(), "not queued") && !strings.Contains(err.Error(), "no such message") {
		t.Fatalf("show of a missing message: %v", err)
	}
}

func TestSocketSeveralInstances(t *testing.T) {
	a := newFakeQueue(t, msg("a@one.test", t0, "x@dest.test"))
	b := newFakeQueue(t, msg("b@two.test", t0, "y@dest.test"))
	path := serve(t, map[string]Queue{"a": a, "b": b})

	resps, err := do(t, path, Request{Op: OpList})
	if err != nil || len(resps) != 2 || resps[0].Message.Instance != "a" || resps[1].Message.Instance != "b" {
		t.Fatalf("list of all: %+v, %v", resps, err)
	}
	// IDs are per instance: a change by ID must name one.
	if _, err := do(t, path, Request{Op: string(OpDelete), Filter: Filter{IDs: []store.ID{1}}}); err == nil || !strings.Contains(err.Error(), "--instance") {
		t.Fatalf("delete by ID without instance: %v", err)
	}
	resps, err = do(t, path, Request{Op: string(OpDelete), Instance: "b", Filter: Filter{IDs: []store.ID{1}}})
	if err != nil || len(resps) != 1 || resps[0].Result.Instance != "b" || len(a.applied) != 0 || len(b.applied) != 1 {
		t.Fatalf("delete in b: %+v, %v", resps, err)
	}
	if _, err := do(t, path, Request{Op: OpList, Instance: "c"}); err == nil || !strings.Contains(err.Error(), `"c"`) {
		t.Fatalf("unknown instance: %v", err)
	}
	resps, err = do(t, path, Request{Op: OpInstances})
	if err != nil || strings.Join(resps[0].Instances, ",") != "a,b" {
		t.Fatalf("instances: %+v, %v", resps, err)
	}
}

// raw sends bytes as they are and returns the first response line.
func raw(t *testing.T, path string, data []byte, closeWrite bool) Response {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		c.Write(data)
		if closeWrite {
			c.(*net.UnixConn).CloseWrite()
		}
	}()
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		t.Fatalf("no response line: %v", err)
	}
	var r Response
	if err := json.Unmarshal(line, &r); err != nil {
		t.Fatalf("response %q: %v", line, err)
	}
	return r
}

func TestSocketBadRequests(t *testing.T) {
	old := requestTimeout
	requestTimeout = 200 * time.Millisecond
	t.Cleanup(func() { requestTimeout = old })
	path := serve(t, map[string]Queue{"q": newFakeQueue(t)})
	for _, tc := range []struct {
		name       string
		data       string
		closeWrite bool
		want       string
	}{
		{"not JSON", "hello\n", false, "malformed request"},
		{"wrong version", `{"v":2,"op":"list"}` + "\n", false, "unsupported protocol version"},
		{"unknown op", `{"v":1,"op":"format-disk"}` + "\n", false, "unknown operation"},
		{"bad ID", `{"v":1,"op":"hold","filter":{"ids":["../../etc"]}}` + "\n", false, "invalid message ID"},
		{"show without ID", `{"v":1,"op":"show"}` + "\n", false, "exactly one"},
		{"negative age", `{"v":1,"op":"list","filter":{"older_than_seconds":-5}}` + "\n", false, "out of range"},
		{"bad address", `{"v":1,"op":"list","filter":{"from":"a b"}}` + "\n", false, "address"},
		{"oversized", `{"v":1,"op":"list","instance":"` + strings.Repeat("x", MaxRequestSize) + `"}` + "\n", false, "larger than"},
		{"no newline, writer closed", `{"v":1,"op":"instances"}`, true, ""},
		{"silent client", "", false, "reading request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := raw(t, path, []byte(tc.data), tc.closeWrite)
			if tc.want == "" {
				if r.Error != "" {
					t.Fatalf("error %q", r.Error)
				}
				return
			}
			if !strings.Contains(r.Error, tc.want) {
				t.Fatalf("error %q, want it to mention %q", r.Error, tc.want)
			}
		})
	}
	// The server still answers after all that.
	if _, err := do(t, path, Request{Op: OpList}); err != nil {
		t.Fatal(err)
	}
}

func TestListenReplacesOnlyStaleSockets(t *testing.T) {
	dir := t.TempDir()
	q := newFakeQueue(t)

	// A file that is not a socket is never removed.
	notSock := filepath.Join(dir, "file.sock")
	os.WriteFile(notSock, []byte("x"), 0o600)
	if _, err := Register(notSock, "q", q, nil); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("over a plain file: %v", err)
	}

	// A socket nobody listens on (a server killed with -9) is replaced.
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	unreg, err := Register(stale, "q", q, nil)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}

	// A live socket (another server) is not taken over, even by a second
	// registry entry under another name.
	other := filepath.Join(dir, "live.sock")
	live, err := net.Listen("unix", other)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	if _, err := Register(other, "q", q, nil); err == nil || !strings.Contains(err.Error(), "another server") {
		t.Fatalf("over a live socket: %v", err)
	}

	// Unregistering the last queue removes the socket file.
	unreg()
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file left behind: %v", err)
	}
	if _, err := do(t, stale, Request{Op: OpList}); !errors.Is(err, ErrServerDown) {
		t.Fatalf("after close: %v, want ErrServerDown", err)
	}
}

func TestFilterJSONRoundTrip(t *testing.T) {
	held := true
	f := Filter{IDs: []store.ID{1, 0xabc}, From: "@a.test", To: "b@c.test", OlderThan: 90 * time.Minute, Held: &held}
	b, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"ids":["0000000000000001","0000000000000abc"]`) || !strings.Contains(string(b), `"older_than_seconds":5400`) {
		t.Fatalf("wire form %s", b)
	}
	var g Filter
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	if len(g.IDs) != 2 || g.IDs[1] != 0xabc || g.From != f.From || g.To != f.To || g.OlderThan != f.OlderThan || g.Held == nil || !*g.Held {
		t.Fatalf("round trip: %+v", g)
	}
}

func TestFilterMatch(t *testing.T) {
	m := msg("Alice@Example.ORG", t0.Add(-time.Hour), "bob@dest.test", "carol@other.test")
	m.ID = 7
	m.Rcpts[1].State = store.RcptDelivered
	held, notHeld := true, false
	for _, tc := range []struct {
		name string
		f    Filter
		want bool
	}{
		{"empty", Filter{}, true},
		{"id", Filter{IDs: []store.ID{7}}, true},
		{"other id", Filter{IDs: []store.ID{8}}, false},
		{"sender any case", Filter{From: "alice@example.org"}, true},
		{"sender domain", Filter{From: "@EXAMPLE.org"}, true},
		{"domain is not a suffix match", Filter{From: "@ample.org"}, false},
		{"pending recipient", Filter{To: "@dest.test"}, true},
		{"delivered recipient does not count", Filter{To: "carol@other.test"}, false},
		{"older", Filter{OlderThan: 30 * time.Minute}, true},
		{"not old enough", Filter{OlderThan: 2 * time.Hour}, false},
		{"held", Filter{Held: &held}, false},
		{"not held", Filter{Held: &notHeld}, true},
		{"all of them", Filter{IDs: []store.ID{7}, From: "@example.org", To: "bob@dest.test", OlderThan: time.Minute, Held: &notHeld}, true},
	} {
		if got := tc.f.Match(m, t0); got != tc.want {
			t.Errorf("%s: Match = %v, want %v", tc.name, got, tc.want)
		}
	}
}
