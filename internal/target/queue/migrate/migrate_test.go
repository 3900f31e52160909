package migrate

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
)

// rawTimes are the times maddy wrote into an entry's metadata.
type rawTimes struct {
	FirstAttempt, LastAttempt time.Time
}

func readTimes(t *testing.T, path string) rawTimes {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rt rawTimes
	if err := json.Unmarshal(b, &rt); err != nil {
		t.Fatal(err)
	}
	return rt
}

// copyFixture copies a fixture directory into a fresh temporary one.
func copyFixture(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "queue")
	if err := copyDir(src, dst); err != nil {
		t.Fatal(err)
	}
	return dst
}

func openStore(t *testing.T, dir string) *embedded.Dir {
	t.Helper()
	s, err := embedded.OpenDir(dir, embedded.DirOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func storeMessages(t *testing.T, s *embedded.Dir) []*store.Message {
	t.Helper()
	var out []*store.Message
	if err := s.Walk(func(m *store.Message) error {
		out = append(out, m)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

func byMsgID(t *testing.T, msgs []*store.Message) map[string]*store.Message {
	t.Helper()
	out := map[string]*store.Message{}
	for _, m := range msgs {
		if out[m.MsgID] != nil {
			t.Fatalf("maddy message %s is in the store twice", m.MsgID)
		}
		out[m.MsgID] = m
	}
	return out
}

// listDir returns the names of the regular files in dir.
func listDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if e.Type().IsRegular() {
			names = append(names, e.Name())
		}
	}
	return names
}

// snapshot maps file names in dir to their contents.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, n := range listDir(t, dir) {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		out[n] = string(b)
	}
	return out
}

func checkContent(t *testing.T, s *embedded.Dir, m *store.Message, header, body []byte) {
	t.Helper()
	c, err := s.Content(m)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(c.Header, header) {
		t.Errorf("%s: header\n%q\nwant\n%q", m.MsgID, c.Header, header)
	}
	r, err := c.Body.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, body) {
		t.Errorf("%s: body of %d bytes differs from the %d submitted", m.MsgID, len(got), len(body))
	}
}

// checkMessage compares got with want; times are compared with Equal
// (they went through JSON twice) and the rest with DeepEqual.
func checkMessage(t *testing.T, got, want *store.Message) {
	t.Helper()
	g, w := *got, *want
	for _, tc := range []struct {
		name string
		g, w *time.Time
	}{
		{"Arrival", &g.Arrival, &w.Arrival},
		{"FirstAttempt", &g.FirstAttempt, &w.FirstAttempt},
		{"LastAttempt", &g.LastAttempt, &w.LastAttempt},
		{"NextAttempt", &g.NextAttempt, &w.NextAttempt},
	} {
		if !tc.g.Equal(*tc.w) {
			t.Errorf("%s: %s = %v, want %v", w.MsgID, tc.name, *tc.g, *tc.w)
		}
		*tc.g, *tc.w = time.Time{}, time.Time{}
	}
	g.Rcpts = slices.Clone(g.Rcpts)
	w.Rcpts = slices.Clone(w.Rcpts)
	if len(g.Rcpts) == len(w.Rcpts) {
		for i := range g.Rcpts {
			if !g.Rcpts[i].LastAttempt.Equal(w.Rcpts[i].LastAttempt) {
				t.Errorf("%s: rcpt %s LastAttempt = %v, want %v", w.MsgID, w.Rcpts[i].Addr, g.Rcpts[i].LastAttempt, w.Rcpts[i].LastAttempt)
			}
			g.Rcpts[i].LastAttempt, w.Rcpts[i].LastAttempt = time.Time{}, time.Time{}
		}
	}
	g.ID, g.HeaderLen, g.BodyLen = 0, 0, 0
	if !reflect.DeepEqual(g, w) {
		gj, _ := json.MarshalIndent(g, "", " ")
		wj, _ := json.MarshalIndent(w, "", " ")
		t.Errorf("%s: message\n%s\nwant\n%s", w.MsgID, gj, wj)
	}
}

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

func TestImportDeferredMessages(t *testing.T) {
	fx := maddyFixture(t)
	src := copyFixture(t, fx.queue)
	mixedTimes := readTimes(t, filepath.Join(src, msgMixed.id+".meta"))
	largeTimes := readTimes(t, filepath.Join(src, msgLarge.id+".meta"))
	storeDir := t.TempDir()
	s := openStore(t, storeDir)
	now := mixedTimes.LastAttempt.Add(time.Minute)

	var logged []string
	res, err := Import(context.Background(), src, s, Options{
		Now:  fixedClock(now),
		Logf: func(f string, a ...interface{}) { logged = append(logged, f) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Failed)+len(res.Skipped)+len(res.Stray) != 0 {
		t.Fatalf("unexpected failures: %+v", res)
	}
	if len(res.Imported) != 2 || len(logged) != 2 {
		t.Fatalf("imported %+v (log %q), want 2 entries", res.Imported, logged)
	}
	// Arrival order; the refused recipient is reported as dropped, the
	// delivered one left no trace in maddy's metadata.
	if res.Imported[0].Name != msgMixed.id || res.Imported[1].Name != msgLarge.id {
		t.Errorf("import order %s, %s; want arrival order", res.Imported[0].Name, res.Imported[1].Name)
	}
	if d := res.Imported[0].Dropped; !slices.Equal(d, []string{"nouser@remote.test"}) {
		t.Errorf("dropped %q, want the refused recipient", d)
	}
	if left := listDir(t, src); len(left) != 0 {
		t.Errorf("source directory still holds %q", left)
	}

	msgs := byMsgID(t, storeMessages(t, s))
	if len(msgs) != 2 {
		t.Fatalf("store holds %d messages, want 2", len(msgs))
	}
	for _, imp := range res.Imported {
		if msgs[imp.Name] == nil || msgs[imp.Name].ID != imp.ID {
			t.Errorf("result says %s is %v; store disagrees", imp.Name, imp.ID)
		}
	}

	// maddy's first retry is 15 minutes after the attempt.
	checkMessage(t, msgs[msgMixed.id], &store.Message{
		MsgID: msgMixed.id, From: msgMixed.from, OriginalFrom: msgMixed.originalFrom,
		Arrival: mixedTimes.FirstAttempt,
		Rcpts: []store.Rcpt{{
			Addr: "grey@remote.test", State: store.RcptPending, Tries: 1, LastAttempt: mixedTimes.LastAttempt,
			// maddy 0.8.1 loses the enhanced code of errors from targets
			// (it keeps 4.0.0); the code and text survive.
			LastError: &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 0, 0}, Message: "greylisted, try later", Temporary: true},
		}},
		Attempts: 1, FirstAttempt: mixedTimes.FirstAttempt, LastAttempt: mixedTimes.LastAttempt,
		NextAttempt: mixedTimes.LastAttempt.Add(15 * time.Minute),
	})
	checkContent(t, s, msgs[msgMixed.id], msgMixed.headerBytes(t), msgMixed.body)

	checkMessage(t, msgs[msgLarge.id], &store.Message{
		MsgID: msgLarge.id, From: msgLarge.from, OriginalFrom: msgLarge.originalFrom,
		MailOpts: store.MailOptions{Body: "8BITMIME", Size: 300000, RequireTLS: true, UTF8: true,
			Return: "FULL", EnvelopeID: "env-42", Auth: &authUser},
		DontTraceSender: true, Quarantine: true, TLSRequireOverride: true,
		Arrival: largeTimes.FirstAttempt,
		Rcpts: []store.Rcpt{
			{Addr: "grey@remote.test", State: store.RcptPending, Tries: 1, LastAttempt: largeTimes.LastAttempt,
				LastError: &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 0, 0}, Message: "greylisted, try later", Temporary: true}},
			{Addr: "full@other.test", Original: "full-alias@example.test", State: store.RcptPending, Tries: 1,
				LastAttempt: largeTimes.LastAttempt,
				LastError:   &store.SMTPStatus{Code: 452, Enhanced: [3]int{4, 0, 0}, Message: "mailbox full", Temporary: true}},
		},
		Attempts: 1, FirstAttempt: largeTimes.FirstAttempt, LastAttempt: largeTimes.LastAttempt,
		NextAttempt: largeTimes.LastAttempt.Add(15 * time.Minute),
	})
	checkContent(t, s, msgs[msgLarge.id], msgLarge.headerBytes(t), msgLarge.body)
	// Above the inline limit, so in a content file of its own.
	if _, err := os.Stat(filepath.Join(storeDir, "bodies", msgs[msgLarge.id].ID.String())); err != nil {
		t.Errorf("large message content file: %v", err)
	}
}

func TestImportDSN(t *testing.T) {
	fx := maddyFixture(t)
	src := copyFixture(t, fx.dsn)
	names := listDir(t, src)
	if len(names) != 3 {
		t.Fatalf("DSN queue holds %q, want one entry", names)
	}
	id := strings.TrimSuffix(names[0], filepath.Ext(names[0]))
	times := readTimes(t, filepath.Join(src, id+".meta"))
	s := openStore(t, t.TempDir())
	// Import long after maddy's retry time: due at once.
	now := times.LastAttempt.Add(time.Hour)
	res, err := Import(context.Background(), src, s, Options{Now: fixedClock(now)})
	if err != nil || len(res.Imported) != 1 || len(res.Failed) != 0 {
		t.Fatalf("Import = %+v, %v", res, err)
	}
	msgs := storeMessages(t, s)
	if len(msgs) != 1 {
		t.Fatalf("store holds %d messages", len(msgs))
	}
	// A DSN keeps its null sender, which is what stops Spool from
	// reporting on it; nothing else marks it.
	checkMessage(t, msgs[0], &store.Message{
		MsgID: id, From: "", OriginalFrom: "",
		Arrival: times.FirstAttempt,
		Rcpts: []store.Rcpt{{
			Addr: msgMixed.originalFrom, State: store.RcptPending, Tries: 1, LastAttempt: times.LastAttempt,
			LastError: &store.SMTPStatus{Code: 421, Enhanced: [3]int{4, 0, 0}, Message: "connection dropped", Temporary: true},
		}},
		Attempts: 1, FirstAttempt: times.FirstAttempt, LastAttempt: times.LastAttempt,
		NextAttempt: now,
	})
	c, err := s.Content(msgs[0])
	if err != nil {
		t.Fatal(err)
	}
	body, err := os.ReadFile(filepath.Join(fx.dsn, id+".body"))
	if err != nil {
		t.Fatal(err)
	}
	header, err := os.ReadFile(filepath.Join(fx.dsn, id+".header"))
	if err != nil {
		t.Fatal(err)
	}
	checkContent(t, s, msgs[0], header, body)
	if !bytes.Contains(c.Header, []byte("multipart/report")) || !bytes.Contains(body, []byte("nouser@remote.test")) {
		t.Errorf("imported entry is not maddy's report on nouser@remote.test")
	}
}

func TestImportUnattempted(t *testing.T) {
	fx := maddyFixture(t)
	src := copyFixture(t, fx.unattempted)
	times := readTimes(t, filepath.Join(src, msgUnattempted.id+".meta"))
	s := openStore(t, t.TempDir())
	now := times.FirstAttempt.Add(time.Second)
	res, err := Import(context.Background(), src, s, Options{Now: fixedClock(now)})
	if err != nil || len(res.Imported) != 1 {
		t.Fatalf("Import = %+v, %v", res, err)
	}
	msgs := storeMessages(t, s)
	checkMessage(t, msgs[0], &store.Message{
		MsgID: msgUnattempted.id, From: msgUnattempted.from, OriginalFrom: msgUnattempted.originalFrom,
		Arrival: times.FirstAttempt,
		Rcpts: []store.Rcpt{
			{Addr: "x@remote.test", State: store.RcptPending},
			{Addr: "y@remote.test", State: store.RcptPending},
		},
		NextAttempt: now,
	})
	checkContent(t, s, msgs[0], msgUnattempted.headerBytes(t), msgUnattempted.body)
}

// editMeta rewrites one field set of an entry's metadata, as JSON.
func editMeta(t *testing.T, path string, edit func(m map[string]interface{})) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]interface{}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	if b, err = json.Marshal(m); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// A report whose null sender a bounce pipeline rewrote: maddy would never
// report on it (no original sender), so Spool must not either.
func TestImportRewrittenNullSender(t *testing.T) {
	fx := maddyFixture(t)
	src := copyFixture(t, fx.dsn)
	name := strings.TrimSuffix(listDir(t, src)[0], filepath.Ext(listDir(t, src)[0]))
	editMeta(t, filepath.Join(src, name+".meta"), func(m map[string]interface{}) { m["From"] = "postmaster@example.test" })
	s := openStore(t, t.TempDir())
	if _, err := Import(context.Background(), src, s, Options{}); err != nil {
		t.Fatal(err)
	}
	msgs := storeMessages(t, s)
	if len(msgs) != 1 || msgs[0].From != "postmaster@example.test" || msgs[0].Rcpts[0].Reported != 0xff {
		t.Fatalf("got %+v, want the sender kept and every report marked sent", msgs[0])
	}
	// A normal message keeps Spool's reports.
	src = copyFixture(t, fx.unattempted)
	s2 := openStore(t, t.TempDir())
	if _, err := Import(context.Background(), src, s2, Options{}); err != nil {
		t.Fatal(err)
	}
	if r := storeMessages(t, s2)[0].Rcpts[0].Reported; r != 0 {
		t.Errorf("Reported = %#x on a message with a sender, want 0", r)
	}
}

func TestConvertRetrySchedule(t *testing.T) {
	last := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name    string
		tries   map[string]int
		to      []string
		now     time.Time
		want    time.Time
		attempt int
	}{
		// 15m * 1.25^(n-1), the power truncated to a whole number.
		{"1 try", map[string]int{"a": 1}, []string{"a"}, last, last.Add(15 * time.Minute), 1},
		{"4 tries", map[string]int{"a": 4}, []string{"a"}, last, last.Add(15 * time.Minute), 4},
		{"5 tries", map[string]int{"a": 5}, []string{"a"}, last, last.Add(30 * time.Minute), 5},
		{"6 tries", map[string]int{"a": 6}, []string{"a"}, last, last.Add(45 * time.Minute), 6},
		{"10 tries", map[string]int{"a": 10}, []string{"a"}, last, last.Add(105 * time.Minute), 10},
		// Smallest count among pending recipients decides; a delivered
		// recipient's count (kept by maddy) does not.
		{"smallest pending", map[string]int{"a": 6, "b": 5, "done": 1}, []string{"a", "b"}, last, last.Add(30 * time.Minute), 6},
		{"overdue", map[string]int{"a": 1}, []string{"a"}, last.Add(time.Hour), last.Add(time.Hour), 1},
		{"untried recipient", map[string]int{"a": 3}, []string{"a", "b"}, last, last, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := convert(&maddyMeta{
				MsgMeta: &maddyMsgMeta{ID: "x"}, From: "s@x", To: tc.to, TriesCount: tc.tries,
				FirstAttempt: last.Add(-time.Hour), LastAttempt: last,
			}, tc.now)
			if !c.msg.NextAttempt.Equal(tc.want) || c.msg.Attempts != tc.attempt {
				t.Errorf("next %v attempts %d, want %v and %d", c.msg.NextAttempt, c.msg.Attempts, tc.want, tc.attempt)
			}
		})
	}
}

func TestConvertRecipients(t *testing.T) {
	at := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	c := convert(&maddyMeta{
		MsgMeta: &maddyMsgMeta{ID: "x", OriginalFrom: "s@x"},
		From:    "s@x",
		// maddy does not deduplicate recipients.
		To:          []string{"a@x", "b@x", "a@x"},
		FailedRcpts: []string{"f2@x"},
		RcptErrs: map[string]*maddySMTPError{
			"a@x":    {Code: 421, EnhancedCode: [3]int{4, 4, 2}, Message: "line\r\nbreak"},
			"f@x":    {Code: 550, EnhancedCode: [3]int{5, 1, 1}, Message: "no"},
			"late@x": {Code: 451, EnhancedCode: [3]int{4, 0, 0}, Message: "later"},
			// A pending recipient with a 5xx code was classified temporary
			// by maddy (that is why it is pending).
			"b@x": {Code: 554, EnhancedCode: [3]int{5, 0, 0}, Message: "odd"},
		},
		TriesCount:   map[string]int{"a@x": 2, "b@x": 2, "late@x": 1},
		FirstAttempt: at, LastAttempt: at,
	}, at)
	var addrs []string
	for _, r := range c.msg.Rcpts {
		addrs = append(addrs, r.Addr)
	}
	if !slices.Equal(addrs, []string{"a@x", "b@x"}) {
		t.Errorf("recipients %q", addrs)
	}
	if !slices.Equal(c.dropped, []string{"f2@x", "f@x", "late@x"}) {
		t.Errorf("dropped %q", c.dropped)
	}
	wantA := store.SMTPStatus{Code: 421, Enhanced: [3]int{4, 4, 2}, Message: "line break", Temporary: true}
	if got := *c.msg.Rcpts[0].LastError; got != wantA {
		t.Errorf("a@x error %+v, want %+v", got, wantA)
	}
	wantB := store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 0, 0}, Message: "odd", Temporary: true}
	if got := *c.msg.Rcpts[1].LastError; got != wantB {
		t.Errorf("b@x error %+v, want %+v", got, wantB)
	}
	// Nothing pending: nothing to import.
	if c := convert(&maddyMeta{MsgMeta: &maddyMsgMeta{ID: "x"}, FirstAttempt: at}, at); c.msg != nil {
		t.Errorf("converted a message without pending recipients")
	}
}

func TestImportDamagedEntries(t *testing.T) {
	fx := maddyFixture(t)
	src := copyFixture(t, fx.queue)
	extra := copyFixture(t, fx.unattempted)
	u := msgUnattempted.id
	// Build one damaged entry per case from copies of the unattempted one.
	type damage struct {
		name    string
		apply   func(dir, name string)
		failed  string // substring of the reason, "" if not failed
		skipped bool
		stray   []string
	}
	write := func(path, data string) {
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	clone := func(name string) {
		for _, suf := range []string{".meta", ".header", ".body"} {
			b, err := os.ReadFile(filepath.Join(extra, u+suf))
			if err != nil {
				t.Fatal(err)
			}
			b = bytes.ReplaceAll(b, []byte(`"ID":"`+u+`"`), []byte(`"ID":"`+name+`"`))
			write(filepath.Join(src, name+suf), string(b))
		}
	}
	cases := []damage{
		{name: "d0000001", apply: func(dir, n string) {
			b, _ := os.ReadFile(filepath.Join(dir, n+".meta"))
			write(filepath.Join(dir, n+".meta"), string(b[:len(b)/2]))
		}, failed: "unexpected EOF"},
		{name: "d0000002", apply: func(dir, n string) { write(filepath.Join(dir, n+".meta"), "\x00\x01garbage") }, failed: "invalid character"},
		{name: "d0000003", apply: func(dir, n string) {
			editMeta(t, filepath.Join(dir, n+".meta"), func(m map[string]interface{}) { m["Priority"] = 1 })
		}, failed: `unknown field "Priority"`},
		{name: "d0000004", apply: func(dir, n string) { os.Remove(filepath.Join(dir, n+".body")) }, failed: "no such file"},
		{name: "d0000005", apply: func(dir, n string) { os.Remove(filepath.Join(dir, n+".header")) }, failed: "no such file"},
		{name: "d0000006", apply: func(dir, n string) { write(filepath.Join(dir, n+".header"), "Subject: cut") }, failed: "truncated"},
		{name: "d0000007", apply: func(dir, n string) {
			editMeta(t, filepath.Join(dir, n+".meta"), func(m map[string]interface{}) { m["MsgMeta"].(map[string]interface{})["ID"] = "other" })
		}, failed: "does not match"},
		{name: "d0000008", apply: func(dir, n string) {
			os.Rename(filepath.Join(dir, n+".meta"), filepath.Join(dir, n+".meta_broken"))
		}, failed: "marked this entry broken"},
		{name: "d0000009", apply: func(dir, n string) {
			editMeta(t, filepath.Join(dir, n+".meta"), func(m map[string]interface{}) { m["To"] = []string{} })
		}, skipped: true},
		{name: "d000000a", apply: func(dir, n string) {
			os.Remove(filepath.Join(dir, n+".meta"))
			write(filepath.Join(dir, n+".meta.new"), "{")
		}, stray: []string{"d000000a.body", "d000000a.header", "d000000a.meta.new"}},
	}
	for _, c := range cases {
		clone(c.name)
		c.apply(src, c.name)
	}
	before := snapshot(t, src)

	s := openStore(t, t.TempDir())
	res, err := Import(context.Background(), src, s, Options{})
	if err != nil {
		t.Fatal(err)
	}
	failed := map[string]string{}
	for _, f := range res.Failed {
		failed[f.Name] = f.Err.Error()
	}
	skipped := map[string]bool{}
	for _, sk := range res.Skipped {
		skipped[sk.Name] = true
	}
	var wantStray []string
	for _, c := range cases {
		switch {
		case c.failed != "":
			if !strings.Contains(failed[c.name], c.failed) {
				t.Errorf("%s: failure %q, want one mentioning %q", c.name, failed[c.name], c.failed)
			}
		case c.skipped:
			if !skipped[c.name] {
				t.Errorf("%s: not skipped", c.name)
			}
		}
		wantStray = append(wantStray, c.stray...)
	}
	if !slices.Equal(res.Stray, wantStray) {
		t.Errorf("stray %q, want %q", res.Stray, wantStray)
	}
	// The good entries went through; the damaged ones are untouched.
	if len(res.Imported) != 2 || len(storeMessages(t, s)) != 2 {
		t.Errorf("imported %+v", res.Imported)
	}
	after := snapshot(t, src)
	for name, data := range before {
		if strings.HasPrefix(name, "0000") {
			continue
		}
		if after[name] != data {
			t.Errorf("%s was changed or removed", name)
		}
	}
	for name := range after {
		if strings.HasPrefix(name, "0000") {
			t.Errorf("%s left behind after import", name)
		}
	}
	var out bytes.Buffer
	if err := res.Write(&out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "2 imported, 1 skipped, 8 not imported, 3 stray file(s)") {
		t.Errorf("report:\n%s", out.String())
	}
}

func TestImportDryRun(t *testing.T) {
	fx := maddyFixture(t)
	src := copyFixture(t, fx.queue)
	before := snapshot(t, src)
	s := openStore(t, t.TempDir())
	res, err := Import(context.Background(), src, s, Options{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Imported) != 2 || res.Imported[0].ID != 0 || !res.DryRun {
		t.Errorf("dry run result %+v", res)
	}
	if n := len(storeMessages(t, s)); n != 0 {
		t.Errorf("dry run stored %d messages", n)
	}
	if after := snapshot(t, src); !reflect.DeepEqual(after, before) {
		t.Errorf("dry run changed the source directory")
	}
	var out bytes.Buffer
	res.Write(&out)
	if !strings.Contains(out.String(), "would import "+msgMixed.id+": 1 recipient(s)") {
		t.Errorf("report:\n%s", out.String())
	}
}

// The default locations of target.queue and target.spool are the same
// directory: the store's files and maddy's live side by side.
func TestImportIntoSameDirectory(t *testing.T) {
	fx := maddyFixture(t)
	dir := copyFixture(t, fx.queue)
	s := openStore(t, dir)
	res, err := Import(context.Background(), dir, s, Options{})
	if err != nil || len(res.Imported) != 2 || len(res.Failed)+len(res.Stray) != 0 {
		t.Fatalf("Import = %+v, %v", res, err)
	}
	if left := listDir(t, dir); !slices.Equal(left, []string{"lock", "queue.db"}) {
		t.Errorf("directory holds %q, want only the store", left)
	}
	// A second run finds nothing to do.
	res, err = Import(context.Background(), dir, s, Options{})
	if err != nil || len(res.Imported)+len(res.Failed)+len(res.Skipped)+len(res.Stray) != 0 {
		t.Errorf("re-run = %+v, %v", res, err)
	}
}

// faultStore fails one call to a Destination for the message with maddy
// ID target, before or after passing it on, to leave the state a crash at
// that point would leave.
type faultStore struct {
	Destination
	target string
	// createBefore fails Create without storing; createAfter stores and
	// then fails (a crash right after the commit, or a lost reply);
	// update fails the Update that releases the message (clears Held);
	// walk fails every Walk.
	createBefore, createAfter, update, walk bool
}

var errInjected = errors.New("injected failure")

func (f *faultStore) Create(ctx context.Context, m *store.Message, header []byte, body io.Reader, n int64) error {
	if m.MsgID == f.target && f.createBefore {
		return errInjected
	}
	if err := f.Destination.Create(ctx, m, header, body, n); err != nil {
		return err
	}
	if m.MsgID == f.target && f.createAfter {
		return errInjected
	}
	return nil
}

func (f *faultStore) Update(ctx context.Context, m *store.Message) error {
	if m.MsgID == f.target && f.update && !m.Held {
		return errInjected
	}
	return f.Destination.Update(ctx, m)
}

func (f *faultStore) Walk(fn func(*store.Message) error) error {
	if f.walk {
		return errInjected
	}
	return f.Destination.Walk(fn)
}

func TestImportResumesAfterCrash(t *testing.T) {
	fx := maddyFixture(t)
	target := msgLarge.id
	tests := []struct {
		name string
		// firstRun leaves the crash state: a faulty store, or a change
		// made after a clean import.
		fault      *faultStore
		afterwards func(t *testing.T, src string, s *embedded.Dir, origMeta []byte)
		wantLeft   []string // files of target left by the first run
		wantHeld   bool     // target held in the store after the first run
		wantStore  int      // store entries for target after the first run
		// second run
		wantResumed bool
		wantSkipped bool
		wantFinal   int // store entries for target at the end
	}{
		{name: "after marker, before create", fault: &faultStore{createBefore: true},
			wantLeft: []string{".body", ".header", ".meta.importing"}, wantStore: 0,
			wantResumed: true, wantFinal: 1},
		{name: "after create, before removal", fault: &faultStore{createAfter: true},
			wantLeft: []string{".body", ".header", ".meta.importing"}, wantHeld: true, wantStore: 1,
			wantResumed: true, wantFinal: 1},
		{name: "after removal, before release", fault: &faultStore{update: true},
			wantLeft: []string{".meta.importing"}, wantHeld: true, wantStore: 1,
			wantResumed: true, wantFinal: 1},
		{name: "after release, before marker removal",
			afterwards: func(t *testing.T, src string, _ *embedded.Dir, orig []byte) {
				if err := os.WriteFile(filepath.Join(src, target+".meta.importing"), orig, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantLeft: []string{".meta.importing"}, wantStore: 1,
			wantResumed: true, wantFinal: 1},
		{name: "after release, then delivered by spool",
			afterwards: func(t *testing.T, src string, s *embedded.Dir, orig []byte) {
				if err := os.WriteFile(filepath.Join(src, target+".meta.importing"), orig, 0o600); err != nil {
					t.Fatal(err)
				}
				for _, m := range storeMessages(t, s) {
					if m.MsgID == target {
						if err := s.Delete(context.Background(), m.ID); err != nil {
							t.Fatal(err)
						}
					}
				}
			},
			wantLeft: []string{".meta.importing"}, wantStore: 0,
			wantSkipped: true, wantFinal: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := copyFixture(t, fx.queue)
			origMeta, err := os.ReadFile(filepath.Join(src, target+".meta"))
			if err != nil {
				t.Fatal(err)
			}
			s := openStore(t, t.TempDir())
			var first Destination = s
			if tc.fault != nil {
				tc.fault.Destination, tc.fault.target = s, target
				first = tc.fault
			}
			res, err := Import(context.Background(), src, first, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if tc.fault != nil && (len(res.Failed) != 1 || res.Failed[0].Name != target || !errors.Is(res.Failed[0].Err, errInjected)) {
				t.Fatalf("first run failures %+v", res.Failed)
			}
			if tc.afterwards != nil {
				tc.afterwards(t, src, s, origMeta)
			}
			var left []string
			for _, n := range listDir(t, src) {
				if !strings.HasPrefix(n, target) {
					t.Errorf("first run left %s", n)
				}
				left = append(left, strings.TrimPrefix(n, target))
			}
			if !slices.Equal(left, tc.wantLeft) {
				t.Errorf("first run left %q, want %q", left, tc.wantLeft)
			}
			count := func() (n int, held bool) {
				for _, m := range storeMessages(t, s) {
					if m.MsgID == target {
						n++
						held = held || m.Held
					}
				}
				return n, held
			}
			if n, held := count(); n != tc.wantStore || held != tc.wantHeld {
				t.Errorf("after the first run the store has %d entries (held %v), want %d (held %v)", n, held, tc.wantStore, tc.wantHeld)
			}

			res, err = Import(context.Background(), src, s, Options{})
			if err != nil || len(res.Failed) != 0 {
				t.Fatalf("second run = %+v, %v", res, err)
			}
			resumed := len(res.Imported) == 1 && res.Imported[0].Name == target && res.Imported[0].Resumed
			skipped := len(res.Skipped) == 1 && res.Skipped[0].Name == target
			if resumed != tc.wantResumed || skipped != tc.wantSkipped || len(res.Imported)+len(res.Skipped) != 1 {
				t.Errorf("second run %+v", res)
			}
			if n, held := count(); n != tc.wantFinal || held {
				t.Errorf("at the end the store has %d entries (held %v) for %s, want %d, not held", n, held, target, tc.wantFinal)
			}
			if n := len(storeMessages(t, s)); n != tc.wantFinal+1 {
				t.Errorf("store holds %d messages, want %d", n, tc.wantFinal+1)
			}
			if left := listDir(t, src); len(left) != 0 {
				t.Errorf("second run left %q", left)
			}
			// And a third run has nothing to do.
			res, err = Import(context.Background(), src, s, Options{})
			if err != nil || len(res.Imported)+len(res.Skipped)+len(res.Failed) != 0 {
				t.Errorf("third run = %+v, %v", res, err)
			}
		})
	}
}

func TestImportStopsOnCancel(t *testing.T) {
	fx := maddyFixture(t)
	src := copyFixture(t, fx.queue)
	before := snapshot(t, src)
	s := openStore(t, t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Import(ctx, src, s, Options{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Import = %v, want context.Canceled", err)
	}
	if !reflect.DeepEqual(snapshot(t, src), before) {
		t.Errorf("cancelled import changed the source")
	}
}
