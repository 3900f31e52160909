package embedded

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
)

// logRecorder collects log lines of a store.
type logRecorder struct {
	t     *testing.T
	mu    sync.Mutex
	lines []string
}

func (l *logRecorder) logf(format string, args ...interface{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
	l.t.Logf("log: "+format, args...)
}

func (l *logRecorder) contains(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Contains(strings.Join(l.lines, "\n"), s)
}

// TestQuarantineMoveNeverReplaces: a content file moved to quarantine/
// never replaces a file already there; it is kept under another name.
func TestQuarantineMoveNeverReplaces(t *testing.T) {
	const planted = "an earlier quarantined file"
	for _, tc := range []struct {
		name string
		// quarantine moves m's content file to quarantine/ by way of the
		// store at dir (closed), and returns the store.
		quarantine func(t *testing.T, dir string, m *store.Message, logs *logRecorder) *Dir
	}{
		{"entry quarantined", func(t *testing.T, dir string, m *store.Message, logs *logRecorder) *Dir {
			s := openTest(t, dir, DirOptions{InlineLimit: 1, Logf: logs.logf})
			if err := os.Truncate(filepath.Join(dir, "bodies", m.ID.String()), 1); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Content(m); !errors.Is(err, store.ErrCorrupt) {
				t.Fatalf("Content = %v, want ErrCorrupt", err)
			}
			return s
		}},
		{"lost move finished at open", func(t *testing.T, dir string, m *store.Message, logs *logRecorder) *Dir {
			// The quarantine record is committed, the move of the file
			// was lost.
			db, err := bolt.Open(filepath.Join(dir, "queue.db"), 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			err = db.Update(func(tx *bolt.Tx) error {
				k := idKey(m.ID)
				if err := tx.Bucket(bucketQuarantine).Put(k, []byte(`{"reason":"test"}`)); err != nil {
					return err
				}
				tx.Bucket(bucketSched).Delete(k)
				return tx.Bucket(bucketMeta).Delete(k)
			})
			db.Close()
			if err != nil {
				t.Fatal(err)
			}
			return openTest(t, dir, DirOptions{InlineLimit: 1, Logf: logs.logf})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, dir, DirOptions{InlineLimit: 1})
			m := newMsg("a@example.com")
			if err := s.Create(context.Background(), m, []byte("H: v\r\n\r\n"), strings.NewReader("body"), 4); err != nil {
				t.Fatal(err)
			}
			s.Close()
			content, err := os.ReadFile(filepath.Join(dir, "bodies", m.ID.String()))
			if err != nil {
				t.Fatal(err)
			}
			clash := filepath.Join(dir, "quarantine", m.ID.String())
			if err := os.WriteFile(clash, []byte(planted), 0o600); err != nil {
				t.Fatal(err)
			}
			logs := &logRecorder{t: t}
			tc.quarantine(t, dir, m, logs)

			if b, err := os.ReadFile(clash); err != nil || string(b) != planted {
				t.Fatalf("quarantine/%v replaced: %q, %v", m.ID, b, err)
			}
			renamed := clash + ".1"
			b, err := os.ReadFile(renamed)
			if err != nil {
				t.Fatalf("content file not kept under another name: %v", err)
			}
			if tc.name == "lost move finished at open" && string(b) != string(content) {
				t.Fatalf("quarantine/%s holds %q, want the content file", filepath.Base(renamed), b)
			}
			if _, err := os.Lstat(filepath.Join(dir, "bodies", m.ID.String())); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("content file still in bodies/: %v", err)
			}
			if !logs.contains(filepath.Base(renamed)) {
				t.Errorf("the new name %s is not logged", filepath.Base(renamed))
			}
		})
	}
}
