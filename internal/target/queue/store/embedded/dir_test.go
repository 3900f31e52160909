package embedded

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
)

var t0 = time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)

func newMsg(rcpts ...string) *store.Message {
	m := &store.Message{MsgID: "abcd", From: "sender@example.org", Arrival: t0, NextAttempt: t0}
	for _, r := range rcpts {
		m.Rcpts = append(m.Rcpts, store.Rcpt{Addr: r})
	}
	return m
}

func openTest(t *testing.T, dir string, opts DirOptions) *Dir {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	s, err := OpenDir(dir, opts)
	if err != nil {
		t.Fatalf("OpenDir: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func readContent(t *testing.T, s *Dir, m *store.Message) (string, string) {
	t.Helper()
	c, err := s.Content(m)
	if err != nil {
		t.Fatalf("Content: %v", err)
	}
	r, err := c.Body.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	body, err := io.ReadAll(r)
	if int64(c.Body.Len()) != m.BodyLen {
		t.Fatalf("Len() = %d, want %d", c.Body.Len(), m.BodyLen)
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(c.Header), string(body)
}

func TestCreateGetContent(t *testing.T) {
	for _, tc := range []struct {
		name     string
		bodySize int
		file     bool
	}{
		{"empty body", 0, false},
		{"inline", 1000, false},
		{"at limit", 256 - len("Subject: x\r\n\r\n"), false},
		{"file", 300, true},
		{"large file", 3 << 20, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, dir, DirOptions{InlineLimit: 256})
			if !tc.file && tc.bodySize > 256 {
				s.inlineLimit = 1 << 20
			}
			header := "Subject: x\r\n\r\n"
			body := strings.Repeat("b", tc.bodySize)
			m := newMsg("a@example.com", "b@example.com")
			if err := s.Create(context.Background(), m, []byte(header), strings.NewReader(body), int64(len(body))); err != nil {
				t.Fatal(err)
			}
			if m.ID == 0 {
				t.Fatal("no ID assigned")
			}
			_, statErr := os.Stat(filepath.Join(dir, "bodies", m.ID.String()))
			if tc.file != (statErr == nil) {
				t.Fatalf("content file exists=%v, want %v", statErr == nil, tc.file)
			}
			got, err := s.Get(m.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got.From != m.From || len(got.Rcpts) != 2 || got.BodyLen != int64(len(body)) || got.HeaderLen != int64(len(header)) {
				t.Fatalf("Get = %+v", got)
			}
			h, b := readContent(t, s, got)
			if h != header || b != body {
				t.Fatalf("content mismatch: header %q, body len %d", h, len(b))
			}
		})
	}
}

func TestBodyLongerThanAnnounced(t *testing.T) {
	s := openTest(t, t.TempDir(), DirOptions{InlineLimit: 100})
	body := strings.Repeat("x", 500)
	m := newMsg("a@example.com")
	if err := s.Create(context.Background(), m, []byte("H: v\r\n\r\n"), strings.NewReader(body), 10); err != nil {
		t.Fatal(err)
	}
	if _, b := readContent(t, s, m); b != body {
		t.Fatalf("body of %d bytes, want %d", len(b), len(body))
	}
}

func TestPersistenceAcrossReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenDir(dir, DirOptions{InlineLimit: 64})
	if err != nil {
		t.Fatal(err)
	}
	var ids []store.ID
	for i := 0; i < 5; i++ {
		m := newMsg(fmt.Sprintf("r%d@example.com", i))
		m.NextAttempt = t0.Add(time.Duration(i) * time.Minute)
		m.Held = i == 3
		body := strings.Repeat("z", i*40)
		if err := s.Create(context.Background(), m, []byte("A: b\r\n\r\n"), strings.NewReader(body), int64(len(body))); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	if err := s.Delete(context.Background(), ids[1]); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s2 := openTest(t, dir, DirOptions{InlineLimit: 64})
	var got []SchedEntry
	if err := s2.Schedule(func(e SchedEntry) error { got = append(got, e); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 {
		t.Fatalf("got %d entries, want 4", len(got))
	}
	for _, e := range got {
		i := -1
		for j, id := range ids {
			if id == e.ID {
				i = j
			}
		}
		if !e.NextAttempt.Equal(t0.Add(time.Duration(i)*time.Minute)) || e.Held != (i == 3) || !e.Arrival.Equal(t0) {
			t.Errorf("entry %d = %+v", i, e)
		}
	}
	// New IDs continue after the old ones, even the deleted one.
	m := newMsg("new@example.com")
	if err := s2.Create(context.Background(), m, nil, strings.NewReader(""), 0); err != nil {
		t.Fatal(err)
	}
	if m.ID <= ids[len(ids)-1] {
		t.Fatalf("new ID %v not above %v", m.ID, ids[len(ids)-1])
	}
	if oldest, ok, err := s2.Oldest(); err != nil || !ok || !oldest.Equal(t0) {
		t.Fatalf("Oldest = %v %v %v", oldest, ok, err)
	}
}

func TestUpdateAndDelete(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, DirOptions{InlineLimit: 10})
	m := newMsg("a@example.com")
	if err := s.Create(context.Background(), m, []byte("H: v\r\n\r\n"), strings.NewReader("a long enough body"), 18); err != nil {
		t.Fatal(err)
	}
	m.Rcpts[0].State = store.RcptDelivered
	m.Rcpts[0].LastError = &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 4, 1}, Message: "later", Temporary: true}
	m.Attempts = 3
	if err := s.Update(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get(m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Rcpts[0].State != store.RcptDelivered || got.Attempts != 3 || got.Rcpts[0].LastError.Code != 451 {
		t.Fatalf("after update: %+v", got)
	}
	if err := s.Delete(context.Background(), m.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "bodies", m.ID.String())); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("content file left after delete: %v", err)
	}
	if _, err := s.Get(m.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after delete: %v", err)
	}
	if err := s.Update(context.Background(), m); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Update after delete: %v", err)
	}
	if err := s.Delete(context.Background(), m.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Delete twice: %v", err)
	}
}

func TestConcurrentCreatesShareCommits(t *testing.T) {
	s := openTest(t, t.TempDir(), DirOptions{})
	const n = 200
	var wg sync.WaitGroup
	ids := make(chan store.ID, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			m := newMsg("a@example.com")
			body := fmt.Sprintf("body %d", i)
			if err := s.Create(context.Background(), m, nil, strings.NewReader(body), int64(len(body))); err != nil {
				t.Error(err)
				return
			}
			ids <- m.ID
		}(i)
	}
	wg.Wait()
	close(ids)
	seen := map[store.ID]bool{}
	for id := range ids {
		if seen[id] {
			t.Fatalf("duplicate ID %v", id)
		}
		seen[id] = true
	}
	if len(seen) != n {
		t.Fatalf("%d messages stored, want %d", len(seen), n)
	}
	if st := s.db.Stats(); st.TxStats.GetWrite() >= n {
		t.Logf("note: %d write transactions for %d creates (no batching happened)", st.TxStats.GetWrite(), n)
	}
}

func TestOrphanAndTempFilesRemovedAtOpen(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenDir(dir, DirOptions{InlineLimit: 1})
	if err != nil {
		t.Fatal(err)
	}
	m := newMsg("a@example.com")
	if err := s.Create(context.Background(), m, []byte("H: v\r\n\r\n"), strings.NewReader("kept"), 4); err != nil {
		t.Fatal(err)
	}
	s.Close()
	orphan := filepath.Join(dir, "bodies", store.ID(999).String())
	tmp := filepath.Join(dir, "bodies", store.ID(1000).String()+".tmp")
	foreign := filepath.Join(dir, "bodies", "README")
	for _, p := range []string{orphan, tmp, foreign} {
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s2 := openTest(t, dir, DirOptions{InlineLimit: 1})
	for _, p := range []string{orphan, tmp} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s not removed", p)
		}
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("foreign file removed: %v", err)
	}
	if _, b := readContent(t, s2, m); b != "kept" {
		t.Fatalf("body %q", b)
	}
	// The orphan's ID is never handed out again.
	m2 := newMsg("b@example.com")
	if err := s2.Create(context.Background(), m2, nil, strings.NewReader(""), 0); err != nil {
		t.Fatal(err)
	}
	if m2.ID <= 1000 {
		t.Fatalf("ID %v reuses an ID seen on disk", m2.ID)
	}
}

// corruptKey overwrites one key of a bucket behind the store's back.
func corruptKey(t *testing.T, dir string, bucket []byte, id store.ID, val []byte) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, "queue.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Put(idKey(id), val) }); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptEntriesAreQuarantined(t *testing.T) {
	for _, tc := range []struct {
		name   string
		bucket []byte
		value  []byte
		via    string // which read meets the damage
	}{
		{"garbage meta", bucketMeta, []byte("\x00\x01garbage"), "walk"},
		{"truncated meta", bucketMeta, []byte(`{"v":1,"from":"a@`), "get"},
		{"empty meta", bucketMeta, []byte{}, "get"},
		{"newer format", bucketMeta, []byte(`{"v":2,"from":"a@b","rcpts":[{"addr":"x"}],"arrival":"2026-01-01T00:00:00Z"}`), "walk"},
		{"no recipients", bucketMeta, []byte(`{"v":1,"from":"a@b","rcpts":[],"arrival":"2026-01-01T00:00:00Z"}`), "get"},
		{"short sched", bucketSched, []byte{1, 2, 3}, "schedule"},
		{"unknown sched flag", bucketSched, append(make([]byte, 16), 0x80, 0, 0, 0, 0), "schedule"},
		{"truncated inline content", bucketContent, []byte("H"), "content"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := OpenDir(dir, DirOptions{})
			if err != nil {
				t.Fatal(err)
			}
			var ms []*store.Message
			for i := 0; i < 3; i++ {
				m := newMsg("a@example.com")
				if err := s.Create(context.Background(), m, []byte("H: v\r\n\r\n"), strings.NewReader("body"), 4); err != nil {
					t.Fatal(err)
				}
				ms = append(ms, m)
			}
			s.Close()
			bad := ms[1]
			corruptKey(t, dir, tc.bucket, bad.ID, tc.value)

			var quarantined []store.ID
			s2 := openTest(t, dir, DirOptions{OnQuarantine: func(id store.ID, _ *SchedEntry, reason error) {
				t.Logf("quarantined %v: %v", id, reason)
				quarantined = append(quarantined, id)
			}})
			switch tc.via {
			case "get":
				if _, err := s2.Get(bad.ID); !errors.Is(err, store.ErrCorrupt) {
					t.Fatalf("Get: %v, want ErrCorrupt", err)
				}
			case "walk":
				n := 0
				if err := s2.Walk(func(*store.Message) error { n++; return nil }); err != nil {
					t.Fatal(err)
				}
				if n != 2 {
					t.Fatalf("walked %d good entries, want 2", n)
				}
			case "schedule":
				n := 0
				if err := s2.Schedule(func(SchedEntry) error { n++; return nil }); err != nil {
					t.Fatal(err)
				}
				if n != 2 {
					t.Fatalf("scheduled %d good entries, want 2", n)
				}
			case "content":
				if _, err := s2.Content(bad); !errors.Is(err, store.ErrCorrupt) {
					t.Fatalf("Content: %v, want ErrCorrupt", err)
				}
			}
			if len(quarantined) != 1 || quarantined[0] != bad.ID {
				t.Fatalf("quarantined %v, want [%v]", quarantined, bad.ID)
			}
			if n, _ := s2.Quarantined(); n != 1 {
				t.Fatalf("%d entries in quarantine, want 1", n)
			}
			if _, err := s2.Get(bad.ID); !errors.Is(err, store.ErrNotFound) {
				t.Fatalf("bad entry still queued: %v", err)
			}
			for _, m := range []*store.Message{ms[0], ms[2]} {
				if _, b := readContent(t, s2, m); b != "body" {
					t.Fatalf("good entry damaged: %q", b)
				}
			}
		})
	}
}

func TestMissingContentFileIsQuarantined(t *testing.T) {
	dir := t.TempDir()
	var quarantined []store.ID
	s := openTest(t, dir, DirOptions{InlineLimit: 1, OnQuarantine: func(id store.ID, _ *SchedEntry, _ error) { quarantined = append(quarantined, id) }})
	m := newMsg("a@example.com")
	if err := s.Create(context.Background(), m, []byte("H: v\r\n\r\n"), strings.NewReader("body"), 4); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(dir, "bodies", m.ID.String()), 3); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Content(m); !errors.Is(err, store.ErrCorrupt) {
		t.Fatalf("Content: %v", err)
	}
	if len(quarantined) != 1 {
		t.Fatal("not quarantined")
	}
	if _, err := os.Stat(filepath.Join(dir, "quarantine", m.ID.String())); err != nil {
		t.Fatalf("content file not moved to quarantine/: %v", err)
	}
}

func TestDamagedDatabaseMovedAside(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenDir(dir, DirOptions{InlineLimit: 1})
	if err != nil {
		t.Fatal(err)
	}
	m := newMsg("a@example.com")
	if err := s.Create(context.Background(), m, nil, strings.NewReader("body"), 4); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := os.WriteFile(filepath.Join(dir, "queue.db"), bytes.Repeat([]byte{0xde}, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	var reasons []error
	s2 := openTest(t, dir, DirOptions{OnQuarantine: func(_ store.ID, _ *SchedEntry, r error) { reasons = append(reasons, r) }})
	if len(reasons) != 1 {
		t.Fatalf("damage not reported: %v", reasons)
	}
	matches, _ := filepath.Glob(filepath.Join(dir, "queue.db.damaged-*"))
	if len(matches) != 1 {
		t.Fatalf("damaged database not kept: %v", matches)
	}
	moved, _ := filepath.Glob(filepath.Join(dir, "quarantine", m.ID.String()+".damaged-*"))
	if len(moved) != 1 {
		t.Fatalf("content file not kept in quarantine: %v", moved)
	}
	if err := s2.Create(context.Background(), newMsg("b@example.com"), nil, strings.NewReader(""), 0); err != nil {
		t.Fatalf("store unusable after recovery: %v", err)
	}
}

func TestNewerDatabaseFormatRefused(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenDir(dir, DirOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	db, err := bolt.Open(filepath.Join(dir, "queue.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketInfo).Put(keyFormat, []byte{99}) })
	db.Close()
	if _, err := OpenDir(dir, DirOptions{}); err == nil || !strings.Contains(err.Error(), "format") {
		t.Fatalf("OpenDir = %v, want a format error", err)
	}
}

func TestReadOnly(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenDir(dir, DirOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m := newMsg("a@example.com")
	if err := s.Create(context.Background(), m, nil, strings.NewReader("b"), 1); err != nil {
		t.Fatal(err)
	}
	s.Close()
	ro := openTest(t, dir, DirOptions{ReadOnly: true})
	n := 0
	if err := ro.Walk(func(*store.Message) error { n++; return nil }); err != nil || n != 1 {
		t.Fatalf("Walk: %d %v", n, err)
	}
	if err := ro.Delete(context.Background(), m.ID); err == nil {
		t.Fatal("Delete succeeded on a read-only store")
	}
}

func TestScheduleVisitsManyEntriesInChunks(t *testing.T) {
	s := openTest(t, t.TempDir(), DirOptions{})
	const n = scanChunk*2 + 17
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := s.Create(context.Background(), newMsg("a@example.com"), nil, strings.NewReader(""), 0); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	var last store.ID
	count := 0
	err := s.Schedule(func(e SchedEntry) error {
		if e.ID <= last {
			return fmt.Errorf("out of order: %v after %v", e.ID, last)
		}
		last = e.ID
		count++
		return nil
	})
	if err != nil || count != n {
		t.Fatalf("Schedule visited %d of %d: %v", count, n, err)
	}
}

// faultFS fails chosen operations on content files.
type faultFS struct {
	OSFS
	failWrite, failSync, failSyncDir bool
	// renameErr, if set, is asked before each rename of oldName.
	renameErr func(oldName string) error
}

func (fs *faultFS) Rename(oldName, newName string) error {
	if fs.renameErr != nil {
		if err := fs.renameErr(oldName); err != nil {
			return err
		}
	}
	return fs.OSFS.Rename(oldName, newName)
}

func (fs *faultFS) RenameNoReplace(oldName, newName string) error {
	if fs.renameErr != nil {
		if err := fs.renameErr(oldName); err != nil {
			return err
		}
	}
	return fs.OSFS.RenameNoReplace(oldName, newName)
}

type faultFile struct {
	*os.File
	fs *faultFS
}

func (f faultFile) Write(p []byte) (int, error) {
	if f.fs.failWrite {
		n, _ := f.File.Write(p[:len(p)/2])
		return n, syscall.ENOSPC
	}
	return f.File.Write(p)
}

func (f faultFile) Sync() error {
	if f.fs.failSync {
		return syscall.EIO
	}
	return f.File.Sync()
}

func (fs *faultFS) CreateExcl(name string) (File, error) {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	return faultFile{f, fs}, nil
}

func (fs *faultFS) SyncDir(name string) error {
	if fs.failSyncDir {
		return syscall.EIO
	}
	return fs.OSFS.SyncDir(name)
}

func TestCreateFailuresLeaveNothingBehind(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(*faultFS)
		want error
	}{
		// Failed fsyncs stop the store: TestFailedFsyncStopsStore.
		{"ENOSPC on write", func(f *faultFS) { f.failWrite = true }, syscall.ENOSPC},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			ffs := &faultFS{}
			s := openTest(t, dir, DirOptions{InlineLimit: 1, FS: ffs})
			tc.set(ffs)
			m := newMsg("a@example.com")
			err := s.Create(context.Background(), m, []byte("H: v\r\n\r\n"), strings.NewReader("body body"), 9)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Create = %v, want %v", err, tc.want)
			}
			if entries, _ := os.ReadDir(filepath.Join(dir, "bodies")); len(entries) != 0 {
				t.Fatalf("files left behind: %v", entries)
			}
			if _, err := s.Get(m.ID); !errors.Is(err, store.ErrNotFound) {
				t.Fatalf("failed message is visible: %v", err)
			}
			if err := s.Failed(); err != nil {
				t.Fatalf("store stopped after a write failure: %v", err)
			}
			// Once the fault clears, the same store works again.
			*ffs = faultFS{}
			if err := s.Create(context.Background(), newMsg("a@example.com"), []byte("H: v\r\n\r\n"), strings.NewReader("body"), 4); err != nil {
				t.Fatalf("Create after fault cleared: %v", err)
			}
		})
	}
}

func TestParseID(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want store.ID
		ok   bool
	}{
		{"000000000000002a", 42, true},
		{"2A", 42, true},
		{"", 0, false},
		{"0", 0, false},
		{"../etc/passwd", 0, false},
		{"12/34", 0, false},
		{"00000000000000001", 0, false},
		{"xyz", 0, false},
		{"ffffffffffffffff", ^store.ID(0), true},
	} {
		got, err := store.ParseID(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseID(%q) = %v, %v", tc.in, got, err)
		}
		if tc.ok && got.String() != strings.Repeat("0", 16-len(strings.TrimLeft(strings.ToLower(tc.in), "0")))+strings.TrimLeft(strings.ToLower(tc.in), "0") {
			t.Errorf("String() = %q", got.String())
		}
	}
}
