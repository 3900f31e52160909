package embedded

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
)

// Start-up with a directory damaged or planted with things the store did
// not write: the store opens, good entries load, bad ones are quarantined
// with a reason naming the entry or file, and nothing outside the store
// directory is read, modified or removed.

// hostileFixture is a store directory with three inline messages and three
// file-backed ones, closed.
type hostileFixture struct {
	dir         string
	outside     string // a file outside the store, with secret content
	outsideData string
	inline      []*store.Message
	files       []*store.Message
}

const (
	outsideSecret = "outside secret, not message content"
	fileBodyText  = "long body line\r\nlong body line\r\nlong body line\r\nlong body line\r\nlong body line\r\n"
)

func newHostileFixture(t *testing.T) *hostileFixture {
	t.Helper()
	fx := &hostileFixture{dir: filepath.Join(t.TempDir(), "queue")}
	fx.outside = filepath.Join(t.TempDir(), "secret")
	// Exactly as long as a file-backed message's content, so that only
	// refusing to follow a symlink keeps it from being served.
	fileSize := len("H: v\r\n\r\n") + len(fileBodyText)
	fx.outsideData = outsideSecret + strings.Repeat(".", fileSize-len(outsideSecret))
	if err := os.WriteFile(fx.outside, []byte(fx.outsideData), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := OpenDir(fx.dir, DirOptions{InlineLimit: 64})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 6; i++ {
		m := newMsg(fmt.Sprintf("r%d@example.com", i))
		body := "short"
		if i >= 3 {
			body = fileBodyText
		}
		if err := s.Create(context.Background(), m, []byte("H: v\r\n\r\n"), strings.NewReader(body), int64(len(body))); err != nil {
			t.Fatal(err)
		}
		if i < 3 {
			fx.inline = append(fx.inline, m)
		} else {
			fx.files = append(fx.files, m)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return fx
}

func (fx *hostileFixture) body(id store.ID) string {
	return filepath.Join(fx.dir, "bodies", id.String())
}

func TestHostileDirectory(t *testing.T) {
	type outcome struct {
		// dbAside: the whole database was moved aside (no entry left).
		dbAside bool
		// bad: entries that must end in quarantine, with a reason
		// containing reason.
		bad    func(fx *hostileFixture) []store.ID
		reason string
		// kept: paths (relative to the store directory) that must still
		// exist afterwards.
		kept []string
		// logged: a substring of some log line.
		logged string
	}
	noBad := func(*hostileFixture) []store.ID { return nil }
	badFile := func(i int) func(fx *hostileFixture) []store.ID {
		return func(fx *hostileFixture) []store.ID { return []store.ID{fx.files[i].ID} }
	}
	truncateDB := func(size int64) func(*testing.T, *hostileFixture) {
		return func(t *testing.T, fx *hostileFixture) {
			if err := os.Truncate(filepath.Join(fx.dir, "queue.db"), size); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, fx *hostileFixture)
		want   outcome
	}{
		{"zero-byte queue.db", truncateDB(0), outcome{dbAside: true, logged: "empty file"}},
		{"queue.db of 100 bytes", truncateDB(100), outcome{dbAside: true, logged: "shorter than the two meta pages"}},
		{"queue.db cut to its meta pages", truncateDB(int64(2 * os.Getpagesize())), outcome{dbAside: true, logged: "truncated"}},
		{"queue.db cut short of its last used page", func(t *testing.T, fx *hostileFixture) {
			// bbolt grows the file ahead of use: cut below the high water
			// mark, where bbolt would fault on the missing page.
			db, err := bolt.Open(filepath.Join(fx.dir, "queue.db"), 0o600, &bolt.Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			var used int64
			db.View(func(tx *bolt.Tx) error { used = tx.Size(); return nil })
			db.Close()
			truncateDB(used-int64(os.Getpagesize()))(t, fx)
		}, outcome{dbAside: true, logged: "truncated"}},
		{"garbage queue.db", func(t *testing.T, fx *hostileFixture) {
			garbage := make([]byte, 64<<10)
			rand.New(rand.NewSource(1)).Read(garbage)
			if err := os.WriteFile(filepath.Join(fx.dir, "queue.db"), garbage, 0o600); err != nil {
				t.Fatal(err)
			}
		}, outcome{dbAside: true, logged: "could not be opened"}},
		{"queue.db is a directory", func(t *testing.T, fx *hostileFixture) {
			p := filepath.Join(fx.dir, "queue.db")
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(p, 0o700); err != nil {
				t.Fatal(err)
			}
		}, outcome{dbAside: true, logged: "not a regular file"}},
		{"entry from a newer format version", func(t *testing.T, fx *hostileFixture) {
			corruptKey(t, fx.dir, bucketMeta, fx.files[1].ID, []byte(`{"v":2,"from":"a@b","rcpts":[{"addr":"x"}],"arrival":"2026-01-01T00:00:00Z"}`))
		}, outcome{bad: badFile(1), reason: "format version 2"}},
		{"content file is a symlink to a file outside", func(t *testing.T, fx *hostileFixture) {
			p := fx.body(fx.files[0].ID)
			os.Remove(p)
			if err := os.Symlink(fx.outside, p); err != nil {
				t.Fatal(err)
			}
		}, outcome{bad: badFile(0), reason: "symlink"}},
		{"orphan symlink to a file outside", func(t *testing.T, fx *hostileFixture) {
			if err := os.Symlink(fx.outside, fx.body(store.ID(0x77))); err != nil {
				t.Fatal(err)
			}
		}, outcome{bad: noBad}},
		{"foreign symlink in bodies", func(t *testing.T, fx *hostileFixture) {
			if err := os.Symlink(fx.outside, filepath.Join(fx.dir, "bodies", "link")); err != nil {
				t.Fatal(err)
			}
		}, outcome{bad: noBad, kept: []string{"bodies/link"}, logged: "ignoring foreign file link"}},
		{"foreign files and directories", func(t *testing.T, fx *hostileFixture) {
			for _, p := range []string{"README", "bodies/README", "bodies/notes.tmp.txt", "quarantine/x"} {
				if err := os.WriteFile(filepath.Join(fx.dir, p), []byte("x"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			for _, p := range []string{"subdir", "bodies/subdir"} {
				if err := os.Mkdir(filepath.Join(fx.dir, p), 0o700); err != nil {
					t.Fatal(err)
				}
			}
		}, outcome{bad: noBad, kept: []string{"README", "bodies/README", "bodies/notes.tmp.txt", "quarantine/x", "subdir", "bodies/subdir"}, logged: "ignoring foreign file README"}},
		{"content file shorter than the metadata says", func(t *testing.T, fx *hostileFixture) {
			if err := os.Truncate(fx.body(fx.files[2].ID), 10); err != nil {
				t.Fatal(err)
			}
		}, outcome{bad: badFile(2), reason: "is 10 bytes, metadata says"}},
		{"content file longer than the metadata says", func(t *testing.T, fx *hostileFixture) {
			f, err := os.OpenFile(fx.body(fx.files[2].ID), os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteString("appended")
			f.Close()
		}, outcome{bad: badFile(2), reason: "metadata says"}},
		{"zero-byte content file", truncateBody(0), outcome{bad: badFile(0), reason: "is 0 bytes"}},
		{"content file replaced by a directory", func(t *testing.T, fx *hostileFixture) {
			p := fx.body(fx.files[1].ID)
			os.Remove(p)
			if err := os.Mkdir(p, 0o700); err != nil {
				t.Fatal(err)
			}
		}, outcome{bad: badFile(1), reason: "not a regular file"}},
		{"content file replaced by a FIFO", func(t *testing.T, fx *hostileFixture) {
			p := fx.body(fx.files[1].ID)
			os.Remove(p)
			if err := syscall.Mkfifo(p, 0o600); err != nil {
				t.Fatal(err)
			}
		}, outcome{bad: badFile(1), reason: "not a regular file"}},
		{"content file missing", func(t *testing.T, fx *hostileFixture) {
			os.Remove(fx.body(fx.files[0].ID))
		}, outcome{bad: badFile(0), reason: "is missing"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newHostileFixture(t)
			tc.damage(t, fx)
			var mu sync.Mutex
			var logs []string
			reasons := map[store.ID]string{}
			s, err := OpenDir(fx.dir, DirOptions{
				InlineLimit: 64,
				Logf: func(f string, a ...interface{}) {
					mu.Lock()
					defer mu.Unlock()
					logs = append(logs, fmt.Sprintf(f, a...))
					t.Logf("log: "+f, a...)
				},
				OnQuarantine: func(id store.ID, _ *SchedEntry, r error) {
					mu.Lock()
					defer mu.Unlock()
					reasons[id] = r.Error()
					t.Logf("quarantined %v: %v", id, r)
				},
			})
			if err != nil {
				t.Fatalf("store does not open: %v", err)
			}
			defer s.Close()

			// Start-up reads the schedule; delivery reads metadata and
			// content. Every entry is either whole or quarantined.
			if err := s.Schedule(func(SchedEntry) error { return nil }); err != nil {
				t.Fatalf("Schedule: %v", err)
			}
			good := 0
			var walked []*store.Message
			if err := s.Walk(func(m *store.Message) error { walked = append(walked, m); return nil }); err != nil {
				t.Fatalf("Walk: %v", err)
			}
			for _, m := range walked {
				c, err := s.Content(m)
				if errors.Is(err, store.ErrCorrupt) {
					continue
				}
				if err != nil {
					t.Fatalf("Content(%v): %v", m.ID, err)
				}
				r, _ := c.Body.Open()
				b, _ := io.ReadAll(r)
				r.Close()
				if bytes.Contains(append(c.Header, b...), []byte(outsideSecret[:20])) {
					t.Fatalf("message %v served a file from outside the store", m.ID)
				}
				good++
			}

			all := append(append([]*store.Message{}, fx.inline...), fx.files...)
			if tc.want.dbAside {
				if good != 0 || len(walked) != 0 {
					t.Fatalf("%d entries after the database was moved aside", len(walked))
				}
				if aside, _ := filepath.Glob(filepath.Join(fx.dir, "queue.db.damaged-*")); len(aside) != 1 {
					t.Fatalf("damaged database not kept: %v", aside)
				}
				moved, _ := filepath.Glob(filepath.Join(fx.dir, "quarantine", "*.damaged-*"))
				if len(moved) != len(fx.files) {
					t.Fatalf("%d content files kept in quarantine/, want %d", len(moved), len(fx.files))
				}
				if err := s.Create(context.Background(), newMsg("new@example.com"), nil, strings.NewReader("x"), 1); err != nil {
					t.Fatalf("store unusable after recovery: %v", err)
				}
			} else {
				bad := tc.want.bad(fx)
				if good != len(all)-len(bad) {
					t.Fatalf("%d good entries, want %d", good, len(all)-len(bad))
				}
				for _, id := range bad {
					r, ok := reasons[id]
					if !ok {
						t.Fatalf("%v not quarantined (reasons: %v)", id, reasons)
					}
					if !strings.Contains(r, tc.want.reason) {
						t.Errorf("reason for %v = %q, want it to mention %q", id, r, tc.want.reason)
					}
					if strings.Contains(r, "content file") && !strings.Contains(r, id.String()) {
						t.Errorf("reason for %v = %q does not name the file", id, r)
					}
				}
				if len(reasons) != len(bad) {
					t.Fatalf("quarantined %v, want %v", reasons, bad)
				}
			}
			if b, err := os.ReadFile(fx.outside); err != nil || string(b) != fx.outsideData {
				t.Fatalf("file outside the store changed or removed: %q, %v", b, err)
			}
			for _, p := range tc.want.kept {
				if _, err := os.Lstat(filepath.Join(fx.dir, p)); err != nil {
					t.Errorf("%s removed: %v", p, err)
				}
			}
			if tc.want.logged != "" && !strings.Contains(strings.Join(logs, "\n"), tc.want.logged) {
				t.Errorf("no log line mentions %q; logs:\n%s", tc.want.logged, strings.Join(logs, "\n"))
			}
		})
	}
}

func truncateBody(size int64) func(*testing.T, *hostileFixture) {
	return func(t *testing.T, fx *hostileFixture) {
		if err := os.Truncate(fx.body(fx.files[0].ID), size); err != nil {
			t.Fatal(err)
		}
	}
}
