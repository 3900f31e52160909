package migrate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
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
	"github.com/maddy-spool/spool/internal/target/queue/store/postgres"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// srcMsg is a message put into a source store, with its content.
type srcMsg struct {
	m            *store.Message
	header, body []byte
}

var t0 = time.Date(2026, 11, 30, 8, 0, 0, 123456789, time.UTC)

// fullMessage returns a message with every field of store.Message and its
// parts set to a value other than the zero value (checkAllSet proves
// it), so that a round trip that dropped any field would show.
func fullMessage(i int, held bool) *store.Message {
	auth := fmt.Sprintf("user%d", i)
	at := t0.Add(time.Duration(i) * time.Minute)
	return &store.Message{
		MsgID:        fmt.Sprintf("%08x", 0xabc000+i),
		From:         fmt.Sprintf("sender%d@origin.test", i),
		OriginalFrom: fmt.Sprintf("Sender%d@Origin.test", i),
		MailOpts: store.MailOptions{Body: "8BITMIME", Size: 4242, RequireTLS: true, UTF8: true,
			Return: "HDRS", EnvelopeID: fmt.Sprintf("env-%d", i), Auth: &auth},
		Conn:               store.ConnInfo{Proto: "ESMTPS", Hostname: "client.test", RemoteAddr: "192.0.2.7:2345", AuthUser: auth},
		DontTraceSender:    true,
		Quarantine:         true,
		TLSRequireOverride: true,
		Arrival:            at,
		Rcpts: []store.Rcpt{
			{Addr: "done@x.test", Notify: []string{"SUCCESS", "FAILURE"}, OrigType: "rfc822", Orig: "Done@X.test",
				Original: "done-alias@x.test", State: store.RcptDelivered, Tries: 2, LastAttempt: at.Add(time.Minute),
				LastError: &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 4, 1}, Message: "later", Temporary: true, RemoteMTA: "mx.x.test"},
				Reported:  0x5, DelayRepeats: 1, Via: "fallback relay",
				History: []store.RcptAttempt{{Time: at, Status: &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 4, 1}, Message: "later", Temporary: true, RemoteMTA: "mx.x.test"}},
					{Time: at.Add(time.Minute), Via: "fallback relay"}}},
			{Addr: "grey@y.test", Notify: []string{"DELAY"}, OrigType: "rfc822", Orig: "grey@y.test",
				Original: "grey-alias@y.test", State: store.RcptPending, Tries: 3, LastAttempt: at.Add(2 * time.Minute),
				LastError: &store.SMTPStatus{Code: 450, Enhanced: [3]int{4, 2, 1}, Message: "greylisted", Temporary: true, RemoteMTA: "mx.y.test"},
				Reported:  0x2, DelayRepeats: 2},
			{Addr: "gone@z.test", Notify: []string{"NEVER"}, OrigType: "utf-8", Orig: "gone@z.test",
				Original: "gone-alias@z.test", State: store.RcptFailed, Tries: 1, LastAttempt: at.Add(time.Minute),
				LastError: &store.SMTPStatus{Code: 550, Enhanced: [3]int{5, 1, 1}, Message: "no such user", RemoteMTA: "mx.z.test"},
				Reported:  0x1, DelayRepeats: 3},
		},
		Attempts:     3,
		Destination:  "x.test",
		HeaderMsgID:  fmt.Sprintf("<%d@origin.test>", i),
		Postponed:    2,
		FirstAttempt: at.Add(time.Second),
		LastAttempt:  at.Add(2 * time.Minute),
		NextAttempt:  at.Add(time.Hour),
		Held:         held,
		History: []store.AttemptRecord{
			{Time: at.Add(time.Second), Duration: 1500 * time.Millisecond, Delivered: 1, Temporary: 1, Permanent: 1, Error: "550 5.1.1 no such user"},
			{Time: at.Add(2 * time.Minute), Duration: 700 * time.Millisecond, Delivered: 1, Temporary: 1, Permanent: 1, Error: "450 4.2.1 greylisted"},
		},
	}
}

// fieldsSet records, for every field under v (slice elements folded
// into path[]), whether it is set (not its zero value) anywhere.
func fieldsSet(path string, v reflect.Value, except map[string]bool, set map[string]bool) {
	if _, ok := set[path]; !ok {
		set[path] = false
	}
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() {
			set[path] = true
			fieldsSet(path, v.Elem(), except, set)
		}
	case reflect.Struct:
		if v.Type() == reflect.TypeOf(time.Time{}) {
			set[path] = set[path] || !v.Interface().(time.Time).IsZero()
			return
		}
		set[path] = true
		for i := 0; i < v.NumField(); i++ {
			f := v.Type().Field(i)
			if except[f.Name] || !f.IsExported() {
				continue
			}
			fieldsSet(path+"."+f.Name, v.Field(i), except, set)
		}
	case reflect.Slice:
		if v.Len() > 0 {
			set[path] = true
		}
		for i := 0; i < v.Len(); i++ {
			fieldsSet(path+"[]", v.Index(i), except, set)
		}
	default:
		set[path] = set[path] || !v.IsZero()
	}
}

func TestFullMessageCoversEveryField(t *testing.T) {
	set := map[string]bool{}
	// ID and the lengths are the store's; Lease is not stored; Held is
	// set on some messages (makeSourceStore).
	for _, held := range []bool{false, true} {
		fieldsSet("Message", reflect.ValueOf(fullMessage(1, held)), map[string]bool{"ID": true, "HeaderLen": true, "BodyLen": true, "Lease": true}, set)
	}
	for path, ok := range set {
		if !ok {
			t.Errorf("%s is never set: the fixture does not cover it", path)
		}
	}
}

// makeSourceStore writes an embedded store in a new directory: n messages,
// every third one held, the second one larger than the inline limit (so
// in a content file of its own). It returns the directory and the
// messages with their content, in ID order.
func makeSourceStore(t *testing.T, n int) (string, []srcMsg) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "queue")
	s, err := embedded.OpenDir(dir, embedded.DirOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var out []srcMsg
	for i := 0; i < n; i++ {
		m := fullMessage(i, i%3 == 2)
		header := []byte(fmt.Sprintf("Message-ID: <m%d@origin.test>\r\nSubject: message %d\r\n\r\n", i, i))
		body := []byte(strings.Repeat(fmt.Sprintf("line %d of the body\r\n", i), 10))
		if i == 1 {
			body = bytes.Repeat([]byte("0123456789abcdef"), 100<<10/16)
		}
		if err := s.Create(context.Background(), m, header, bytes.NewReader(body), int64(len(body))); err != nil {
			t.Fatal(err)
		}
		out = append(out, srcMsg{m: m, header: header, body: body})
	}
	return dir, out
}

// testDest is a destination under test with what the checks need.
type testDest struct {
	name string
	// dst is the Destination the import writes to; restart replaces it
	// as a new process would open it (after a crash).
	dst     Destination
	restart func(t *testing.T)
	list    func(t *testing.T) []*store.Message
	content func(t *testing.T, m *store.Message) ([]byte, []byte)
	// claim, if set, claims what a running node could.
	claim func(t *testing.T) []store.ID
	// backend is the store.Backend behind dst, if there is one.
	backend func() store.Backend
}

func embeddedDest(t *testing.T) *testDest {
	dir := t.TempDir()
	var s *embedded.Dir
	td := &testDest{name: "embedded"}
	td.restart = func(t *testing.T) {
		if s != nil {
			s.Close()
		}
		var err error
		if s, err = embedded.OpenDir(dir, embedded.DirOptions{}); err != nil {
			t.Fatal(err)
		}
		td.dst = s
	}
	td.restart(t)
	t.Cleanup(func() { s.Close() })
	td.list = func(t *testing.T) []*store.Message { return storeMessages(t, s) }
	td.content = func(t *testing.T, m *store.Message) ([]byte, []byte) {
		c, err := s.Content(m)
		if err != nil {
			t.Fatal(err)
		}
		return c.Header, readBody(t, c.Body)
	}
	return td
}

func readBody(t *testing.T, b store.Body) []byte {
	t.Helper()
	r, err := b.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func quiet(string, ...any) {}

func pgDest(t *testing.T) *testDest {
	dsn := pgtest.Database(t)
	ctx := context.Background()
	open := func(t *testing.T, node string) *postgres.Store {
		st, err := postgres.Open(ctx, postgres.Options{DSN: dsn, Node: node, Logf: quiet})
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	var st *postgres.Store
	td := &testDest{name: "postgres"}
	td.restart = func(t *testing.T) {
		if st != nil {
			st.Close()
		}
		st = open(t, "import@test")
		td.dst = BackendDestination(st)
	}
	td.backend = func() store.Backend { return st }
	td.restart(t)
	// A node of the cluster, running all along.
	node := open(t, "mx1")
	t.Cleanup(func() { st.Close(); node.Close() })
	td.list = func(t *testing.T) []*store.Message {
		var out []*store.Message
		if err := node.Walk(ctx, func(m *store.Message) error { out = append(out, m); return nil }); err != nil {
			t.Fatal(err)
		}
		return out
	}
	td.content = func(t *testing.T, m *store.Message) ([]byte, []byte) {
		c, err := node.Content(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		return c.Header, readBody(t, c.Body)
	}
	td.claim = func(t *testing.T) []store.ID {
		claims, err := node.Claim(ctx, 1000, nil)
		if err != nil {
			t.Fatal(err)
		}
		var ids []store.ID
		for _, c := range claims {
			ids = append(ids, c.Message.ID)
			if _, err := node.Release(ctx, c.Lease); err != nil {
				t.Fatal(err)
			}
		}
		return ids
	}
	return td
}

// destinations runs fn against an embedded and a PostgreSQL destination.
func destinations(t *testing.T, fn func(t *testing.T, newDest func(t *testing.T) *testDest)) {
	t.Run("embedded", func(t *testing.T) { fn(t, embeddedDest) })
	t.Run("postgres", func(t *testing.T) { fn(t, pgDest) })
}

// encodeState is a message's stored metadata, for exact comparison.
func encodeState(t *testing.T, m *store.Message) string {
	t.Helper()
	b, err := store.EncodeMeta(m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// checkCopied checks that the destination holds each message of want
// exactly once, with the same metadata (held flag included) and content,
// and nothing else.
func checkCopied(t *testing.T, td *testDest, want []srcMsg) {
	t.Helper()
	got := map[string]*store.Message{}
	for _, m := range td.list(t) {
		if got[m.MsgID] != nil {
			t.Errorf("message %s is in the destination twice", m.MsgID)
		}
		got[m.MsgID] = m
	}
	if len(got) != len(want) {
		t.Errorf("destination holds %d messages, want %d", len(got), len(want))
	}
	for _, w := range want {
		g := got[w.m.MsgID]
		if g == nil {
			t.Errorf("message %s is missing from the destination", w.m.MsgID)
			continue
		}
		if gs, ws := encodeState(t, g), encodeState(t, w.m); gs != ws {
			t.Errorf("message %s:\n got %s\nwant %s", w.m.MsgID, gs, ws)
		}
		h, b := td.content(t, g)
		if !bytes.Equal(h, w.header) || !bytes.Equal(b, w.body) {
			t.Errorf("message %s: content differs (%d+%d bytes, want %d+%d)", w.m.MsgID, len(h), len(b), len(w.header), len(w.body))
		}
	}
}

// checkRoundDone checks that the source directory's database was moved,
// whole, into one finished round directory.
func checkRoundDone(t *testing.T, dir string, want []srcMsg) {
	t.Helper()
	if fileExists(filepath.Join(dir, storeDBName)) {
		t.Errorf("%s still in the source directory", storeDBName)
	}
	rounds, _ := filepath.Glob(filepath.Join(dir, roundPrefix+"*"))
	if len(rounds) != 1 || strings.HasSuffix(rounds[0], partialSuffix) {
		t.Fatalf("round directories %q, want one finished", rounds)
	}
	aside, err := embedded.OpenDir(rounds[0], embedded.DirOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer aside.Close()
	msgs := storeMessages(t, aside)
	if len(msgs) != len(want) {
		t.Fatalf("moved-aside database holds %d messages, want %d", len(msgs), len(want))
	}
	for i, m := range msgs {
		// Whole: the content is readable there too (bodies/ moved along).
		c, err := aside.Content(m)
		if err != nil {
			t.Fatalf("moved-aside message %v: %v", m.ID, err)
		}
		if !bytes.Equal(readBody(t, c.Body), want[i].body) {
			t.Errorf("moved-aside message %v: body differs", m.ID)
		}
	}
	for _, d := range storeContentDirs {
		if fileExists(filepath.Join(dir, d)) {
			t.Errorf("%s left in the source directory", d)
		}
	}
}

func TestImportStoreRoundTrip(t *testing.T) {
	destinations(t, func(t *testing.T, newDest func(t *testing.T) *testDest) {
		td := newDest(t)
		dir, want := makeSourceStore(t, 6)
		var phases []string
		res, err := ImportStore(context.Background(), dir, td.dst, Options{
			Progress: func(p Progress) {
				if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
					phases = append(phases, p.Phase)
				}
			},
		})
		if err != nil || len(res.Failed) != 0 {
			t.Fatalf("ImportStore = %+v, %v", res, err)
		}
		if len(res.Imported) != 6 || len(res.Rounds) != 1 || !res.Rounds[0].Done ||
			res.Rounds[0].Released != 4 || res.Rounds[0].KeptHeld != 2 {
			t.Fatalf("result %+v", res)
		}
		if !slices.Equal(phases, []string{PhaseImporting, PhaseReleasing}) {
			t.Errorf("progress phases %q", phases)
		}
		checkCopied(t, td, want)
		checkRoundDone(t, dir, want)
		if td.claim != nil {
			// A running node takes the released messages once due, and
			// never the ones held in the source.
			ids := td.claim(t)
			if len(ids) != 4 {
				t.Errorf("a node claimed %d messages, want the 4 not held", len(ids))
			}
		}
		var out bytes.Buffer
		res.Write(&out)
		for _, s := range []string{"imported 0000000000000001 as ", "source database moved to " + res.Rounds[0].Dir,
			"released 4 message(s), 2 kept held", "6 imported, 0 skipped, 0 not imported"} {
			if !strings.Contains(out.String(), s) {
				t.Errorf("report lacks %q:\n%s", s, out.String())
			}
		}

		// Again: nothing to do, and it says so.
		res, err = ImportStore(context.Background(), dir, td.dst, Options{})
		if err != nil || len(res.Imported)+len(res.Failed)+len(res.Rounds) != 0 || len(res.Notes) != 1 ||
			!strings.Contains(res.Notes[0], "imported by an earlier run") {
			t.Fatalf("second run = %+v, %v", res, err)
		}
		checkCopied(t, td, want)
	})
}

// failAt is a step hook that fails at the named step.
func failAt(step string) func(string) error {
	return func(s string) error {
		if s == step {
			return errInjected
		}
		return nil
	}
}

// checkNothingDeliverableTwice is the invariant at every crash point:
// while the source database is still in place, every copy is held, so
// no node can deliver a message that maddy could deliver from the source.
func checkNothingDeliverableTwice(t *testing.T, dir string, td *testDest) {
	t.Helper()
	if !fileExists(filepath.Join(dir, storeDBName)) {
		return
	}
	for _, m := range td.list(t) {
		if !m.Held {
			t.Errorf("copy %v (%s) is released while the source database is still in place", m.ID, m.MsgID)
		}
	}
	if td.claim != nil {
		if ids := td.claim(t); len(ids) != 0 {
			t.Errorf("a running node claimed %v while the source database is still in place", ids)
		}
	}
}

func TestImportStoreResumesAfterCrash(t *testing.T) {
	target := fullMessage(3, false).MsgID
	tests := []struct {
		name  string
		fault *faultStore
		step  string
		// wantErr: the first run stops with an error (else it reports the
		// message as failed).
		wantErr bool
		// sealed: the database was moved aside by the first run.
		sealed bool
	}{
		{name: "destination unreadable", fault: &faultStore{walk: true}, wantErr: true},
		{name: "after the round directory", step: "round", wantErr: true},
		{name: "create fails before storing", fault: &faultStore{createBefore: true}},
		{name: "create stored, reply lost", fault: &faultStore{createAfter: true}},
		{name: "all copied, before the seal", step: "seal", wantErr: true},
		{name: "after moving the database", step: "sealed", wantErr: true, sealed: true},
		{name: "after moving the content", step: "release", wantErr: true, sealed: true},
		{name: "a release fails", fault: &faultStore{update: true}, sealed: true},
		{name: "all released, before the rename", step: "done", wantErr: true, sealed: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			destinations(t, func(t *testing.T, newDest func(t *testing.T) *testDest) {
				td := newDest(t)
				dir, want := makeSourceStore(t, 6)
				var first Destination = td.dst
				if tc.fault != nil {
					f := *tc.fault
					f.Destination, f.target = td.dst, target
					first = &f
				}
				opts := Options{}
				if tc.step != "" {
					opts.beforeStep = failAt(tc.step)
				}
				res, err := ImportStore(context.Background(), dir, first, opts)
				switch {
				case tc.wantErr && !errors.Is(err, errInjected):
					t.Fatalf("first run = %+v, %v; want the injected error", res, err)
				case !tc.wantErr && (err != nil || len(res.Failed) != 1 || !errors.Is(res.Failed[0].Err, errInjected)):
					t.Fatalf("first run = %+v, %v; want one message failed", res, err)
				}
				if sealed := !fileExists(filepath.Join(dir, storeDBName)); sealed != tc.sealed {
					t.Errorf("after the first run, database moved aside = %v, want %v", sealed, tc.sealed)
				}
				checkNothingDeliverableTwice(t, dir, td)
				for _, m := range td.list(t) {
					if m.Lease != nil && m.Lease.Owner != "" && !m.Lease.Receiving {
						t.Errorf("copy %v left leased by %s", m.ID, m.Lease.Owner)
					}
				}

				td.restart(t)
				res, err = ImportStore(context.Background(), dir, td.dst, Options{})
				if err != nil || len(res.Failed) != 0 {
					t.Fatalf("second run = %+v, %v", res, err)
				}
				if len(res.Rounds) != 1 || !res.Rounds[0].Done || res.Rounds[0].Released != 4 || res.Rounds[0].KeptHeld != 2 {
					t.Errorf("second run rounds %+v", res.Rounds)
				}
				checkCopied(t, td, want)
				checkRoundDone(t, dir, want)
				if td.claim != nil {
					if ids := td.claim(t); len(ids) != 4 {
						t.Errorf("a node claimed %d messages, want the 4 not held", len(ids))
					}
				}
				res, err = ImportStore(context.Background(), dir, td.dst, Options{})
				if err != nil || len(res.Imported)+len(res.Failed)+len(res.Rounds) != 0 {
					t.Errorf("third run = %+v, %v", res, err)
				}
			})
		})
	}
}

// TestImportStoreAfterMaddyRanOnSource: an import stops before the seal,
// the operator goes back and runs maddy on the source for a while (it
// finishes one message, delivers a recipient of another, takes a new
// one), then runs the import again. What ends up in the destination is
// the source's last state: the finished message's held copy is removed,
// the other copy is brought up to date (its delivered recipient is not
// delivered again), the new message is copied.
func TestImportStoreAfterMaddyRanOnSource(t *testing.T) {
	destinations(t, func(t *testing.T, newDest func(t *testing.T) *testDest) {
		td := newDest(t)
		dir, want := makeSourceStore(t, 4)
		_, err := ImportStore(context.Background(), dir, td.dst, Options{beforeStep: failAt("seal")})
		if !errors.Is(err, errInjected) {
			t.Fatalf("first run: %v", err)
		}
		if n := len(td.list(t)); n != 4 {
			t.Fatalf("first run copied %d messages, want 4", n)
		}

		// maddy runs on the source.
		s, err := embedded.OpenDir(dir, embedded.DirOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		if err := s.Delete(ctx, want[0].m.ID); err != nil {
			t.Fatal(err)
		}
		changed := *want[3].m
		changed.Rcpts = slices.Clone(changed.Rcpts)
		changed.Rcpts[1].State, changed.Rcpts[1].Tries = store.RcptDelivered, 4
		changed.Attempts++
		changed.AddHistory(store.AttemptRecord{Time: t0.Add(3 * time.Hour), Duration: time.Second, Delivered: 1})
		if err := s.Update(ctx, &changed); err != nil {
			t.Fatal(err)
		}
		fresh := fullMessage(9, false)
		freshHeader, freshBody := []byte("Subject: new\r\n\r\n"), []byte("new\r\n")
		if err := s.Create(ctx, fresh, freshHeader, bytes.NewReader(freshBody), int64(len(freshBody))); err != nil {
			t.Fatal(err)
		}
		s.Close()

		td.restart(t)
		res, err := ImportStore(ctx, dir, td.dst, Options{})
		if err != nil || len(res.Failed) != 0 {
			t.Fatalf("second run = %+v, %v", res, err)
		}
		if len(res.Rounds) != 1 || len(res.Rounds[0].Removed) != 1 || !strings.Contains(res.Rounds[0].Removed[0], want[0].m.MsgID) {
			t.Errorf("second run rounds %+v, want the copy of %s removed", res.Rounds, want[0].m.MsgID)
		}
		now := []srcMsg{want[1], want[2], {m: &changed, header: want[3].header, body: want[3].body},
			{m: fresh, header: freshHeader, body: freshBody}}
		checkCopied(t, td, now)
		checkRoundDone(t, dir, now)
	})
}

func TestImportStoreDryRun(t *testing.T) {
	destinations(t, func(t *testing.T, newDest func(t *testing.T) *testDest) {
		td := newDest(t)
		dir, _ := makeSourceStore(t, 3)
		before := treeSnapshot(t, dir)
		res, err := ImportStore(context.Background(), dir, td.dst, Options{DryRun: true})
		if err != nil || len(res.Failed) != 0 || len(res.Imported) != 3 || res.Imported[0].ID != 0 {
			t.Fatalf("dry run = %+v, %v", res, err)
		}
		if len(res.Rounds) != 1 || res.Rounds[0].Released != 2 || res.Rounds[0].KeptHeld != 1 {
			t.Errorf("dry run rounds %+v", res.Rounds)
		}
		if !reflect.DeepEqual(treeSnapshot(t, dir), before) {
			t.Errorf("dry run changed the source directory")
		}
		if n := len(td.list(t)); n != 0 {
			t.Errorf("dry run stored %d messages", n)
		}
		var out bytes.Buffer
		res.Write(&out)
		for _, s := range []string{"would import 0000000000000001: 1 recipient(s)", "would move the source database to ",
			"then release 2 message(s); 1 would stay held", "3 would import, 0 skipped"} {
			if !strings.Contains(out.String(), s) {
				t.Errorf("report lacks %q:\n%s", s, out.String())
			}
		}

		// And in the middle of a release: it says what is left.
		if _, err := ImportStore(context.Background(), dir, td.dst, Options{beforeStep: failAt("release")}); !errors.Is(err, errInjected) {
			t.Fatal(err)
		}
		before = treeSnapshot(t, dir)
		beforeDst := len(td.list(t))
		res, err = ImportStore(context.Background(), dir, td.dst, Options{DryRun: true})
		if err != nil || len(res.Rounds) != 1 || !res.Rounds[0].Sealed || res.Rounds[0].Released != 2 {
			t.Fatalf("dry run while releasing = %+v, %v", res, err)
		}
		if !reflect.DeepEqual(treeSnapshot(t, dir), before) || len(td.list(t)) != beforeDst {
			t.Errorf("dry run changed something")
		}
		for _, m := range td.list(t) {
			if !m.Held {
				t.Errorf("dry run released %v", m.ID)
			}
		}
	})
}

// treeSnapshot maps every file under dir to its size and modification
// time (the database is not read byte for byte: bbolt files are large).
func treeSnapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		out[rel] = fmt.Sprintf("%v %d %v", fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// The maddy that uses the source must be stopped: its lock refuses the
// import, which says so.
func TestImportStoreRefusesRunningSource(t *testing.T) {
	dir, _ := makeSourceStore(t, 2)
	running, err := embedded.OpenDir(dir, embedded.DirOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer running.Close()
	td := embeddedDest(t)
	for _, dry := range []bool{false, true} {
		_, err := ImportStore(context.Background(), dir, td.dst, Options{DryRun: dry})
		if err == nil || !strings.Contains(err.Error(), "locked by PID") || !strings.Contains(err.Error(), "stop the maddy that uses it") {
			t.Errorf("dry run %v: error %v, want one naming the lock and saying to stop maddy", dry, err)
		}
	}
	if n := len(td.list(t)); n != 0 {
		t.Errorf("%d messages imported from a store in use", n)
	}
}

// A message whose content is damaged in the source is quarantined there
// and reported; the others move on.
func TestImportStoreDamagedSourceMessage(t *testing.T) {
	dir, want := makeSourceStore(t, 3)
	// The large message's content file.
	if err := os.Remove(filepath.Join(dir, "bodies", want[1].m.ID.String())); err != nil {
		t.Fatal(err)
	}
	td := embeddedDest(t)
	res, err := ImportStore(context.Background(), dir, td.dst, Options{})
	if err != nil || len(res.Failed) != 1 || res.Failed[0].Name != want[1].m.ID.String() ||
		!strings.Contains(res.Failed[0].Err.Error(), "quarantine") {
		t.Fatalf("ImportStore = %+v, %v", res, err)
	}
	checkCopied(t, td, []srcMsg{want[0], want[2]})
	if len(res.Rounds) != 1 || !res.Rounds[0].Done {
		t.Errorf("rounds %+v: the damaged message must not keep the rest from moving on", res.Rounds)
	}
}

func TestImportStoreEmptyOrMissing(t *testing.T) {
	td := embeddedDest(t)
	dir := filepath.Join(t.TempDir(), "queue")
	s, err := embedded.OpenDir(dir, embedded.DirOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	res, err := ImportStore(context.Background(), dir, td.dst, Options{})
	if err != nil || len(res.Notes) != 1 || !strings.Contains(res.Notes[0], "no message queued") {
		t.Errorf("empty store: %+v, %v", res, err)
	}
	if !fileExists(filepath.Join(dir, storeDBName)) {
		t.Errorf("an empty store was moved aside")
	}
	if _, err := ImportStore(context.Background(), t.TempDir(), td.dst, Options{}); err == nil || !strings.Contains(err.Error(), "no Spool store") {
		t.Errorf("directory without a store: %v", err)
	}
}

func TestIsSpoolStore(t *testing.T) {
	dir, _ := makeSourceStore(t, 1)
	if ok, err := IsSpoolStore(dir); !ok || err != nil {
		t.Errorf("store: %v, %v", ok, err)
	}
	fx := maddyFixture(t)
	if ok, err := IsSpoolStore(fx.queue); ok || err != nil {
		t.Errorf("target.queue directory: %v, %v", ok, err)
	}
}

// failCommit stores the message with maddy ID target and then fails its
// Commit: the import's process died between the two, leaving the copy
// under its receiving lease.
type failCommit struct {
	store.Backend
	target string
	ids    map[store.ID]bool
}

func (f *failCommit) Create(ctx context.Context, m *store.Message, header []byte, body io.Reader, n int64) (*store.Lease, error) {
	l, err := f.Backend.Create(ctx, m, header, body, n)
	if err == nil && m.MsgID == f.target {
		f.ids[l.ID] = true
	}
	return l, err
}

func (f *failCommit) Commit(ctx context.Context, l *store.Lease) (store.Request, error) {
	if f.ids[l.ID] {
		return 0, errInjected
	}
	return f.Backend.Commit(ctx, l)
}

// A copy stored in PostgreSQL but not committed (the import died in
// between) is found by the next run, once the import's node name, taken
// again, has ended the lease it held.
func TestImportStorePostgresCommitLost(t *testing.T) {
	td := pgDest(t)
	dir, want := makeSourceStore(t, 4)
	target := want[1].m.MsgID
	fc := &failCommit{Backend: td.backend(), target: target, ids: map[store.ID]bool{}}
	res, err := ImportStore(context.Background(), dir, BackendDestination(fc), Options{})
	if err != nil || len(res.Failed) != 1 || !errors.Is(res.Failed[0].Err, errInjected) {
		t.Fatalf("first run = %+v, %v", res, err)
	}
	receiving := 0
	for _, m := range td.list(t) {
		if m.MsgID == target && m.Lease != nil && m.Lease.Receiving {
			receiving++
		}
	}
	if receiving != 1 {
		t.Fatalf("%d copies of %s being received, want 1", receiving, target)
	}
	checkNothingDeliverableTwice(t, dir, td)
	td.restart(t)
	res, err = ImportStore(context.Background(), dir, td.dst, Options{})
	if err != nil || len(res.Failed) != 0 {
		t.Fatalf("second run = %+v, %v", res, err)
	}
	checkCopied(t, td, want)
	checkRoundDone(t, dir, want)
	if ids := td.claim(t); len(ids) != 3 {
		t.Errorf("a node claimed %d messages, want the 3 not held", len(ids))
	}
}

// The target.queue import into a PostgreSQL store: messages arrive
// released once their maddy files are gone, and a crash after a create
// is resumed without a second copy.
func TestImportTargetQueueIntoPostgres(t *testing.T) {
	fx := maddyFixture(t)
	td := pgDest(t)
	src := copyFixture(t, fx.queue)
	f := &faultStore{Destination: td.dst, target: msgLarge.id, createAfter: true}
	res, err := Import(context.Background(), src, f, Options{})
	if err != nil || len(res.Imported) != 1 || len(res.Failed) != 1 || !errors.Is(res.Failed[0].Err, errInjected) {
		t.Fatalf("first run = %+v, %v", res, err)
	}
	td.restart(t)
	res, err = Import(context.Background(), src, td.dst, Options{})
	if err != nil || len(res.Imported) != 1 || !res.Imported[0].Resumed || len(res.Failed) != 0 {
		t.Fatalf("second run = %+v, %v", res, err)
	}
	msgs := td.list(t)
	if len(msgs) != 2 {
		t.Fatalf("%d messages in the store, want 2", len(msgs))
	}
	for _, m := range msgs {
		if m.Held {
			t.Errorf("%s still held", m.MsgID)
		}
		if m.MsgID == msgLarge.id {
			if h, b := td.content(t, m); !bytes.Equal(h, msgLarge.headerBytes(t)) || !bytes.Equal(b, msgLarge.body) {
				t.Errorf("%s: content differs", m.MsgID)
			}
		}
	}
	if left := listDir(t, src); len(left) != 0 {
		t.Errorf("source directory still holds %q", left)
	}
}
