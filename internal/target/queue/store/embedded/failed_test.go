package embedded

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// TestFailedFsyncStopsStore: after an fsync fails, every write fails at
// once with ErrFailed, reads go on, OnFailed is told once, and a content
// file whose Create failed is left for the next open to remove.
func TestFailedFsyncStopsStore(t *testing.T) {
	const body = "a body longer than the inline limit"
	for _, tc := range []struct {
		name string
		// fail arms the fault and makes the store meet it with victim. It
		// returns the error the store returned (nil where the operation
		// has none) and the ID whose content file the store must keep.
		fail func(t *testing.T, s *Dir, ffs *faultFS, dir string, victim *store.Message) (error, store.ID)
	}{
		{"content file fsync", func(t *testing.T, s *Dir, ffs *faultFS, dir string, _ *store.Message) (error, store.ID) {
			ffs.failSync = true
			m := newMsg("new@example.com")
			return s.Create(context.Background(), m, nil, strings.NewReader(body), int64(len(body))), m.ID
		}},
		{"bodies/ fsync", func(t *testing.T, s *Dir, ffs *faultFS, dir string, _ *store.Message) (error, store.ID) {
			ffs.failSyncDir = true
			m := newMsg("new@example.com")
			return s.Create(context.Background(), m, nil, strings.NewReader(body), int64(len(body))), m.ID
		}},
		{"quarantine/ fsync", func(t *testing.T, s *Dir, ffs *faultFS, dir string, victim *store.Message) (error, store.ID) {
			if err := os.Truncate(filepath.Join(dir, "bodies", victim.ID.String()), 1); err != nil {
				t.Fatal(err)
			}
			ffs.failSyncDir = true
			if _, err := s.Content(victim); !errors.Is(err, store.ErrCorrupt) {
				t.Fatalf("Content of a damaged entry = %v", err)
			}
			return nil, 0
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			ffs := &faultFS{}
			var mu sync.Mutex
			var told []error
			s := openTest(t, dir, DirOptions{InlineLimit: 16, FS: ffs, OnFailed: func(err error) {
				mu.Lock()
				defer mu.Unlock()
				told = append(told, err)
			}})
			keep, victim := newMsg("keep@example.com"), newMsg("victim@example.com")
			for _, m := range []*store.Message{keep, victim} {
				if err := s.Create(context.Background(), m, nil, strings.NewReader(body), int64(len(body))); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Failed(); err != nil {
				t.Fatalf("Failed() = %v on a healthy store", err)
			}

			err, kept := tc.fail(t, s, ffs, dir, victim)
			if err != nil && (!errors.Is(err, store.ErrFailed) || !errors.Is(err, syscall.EIO)) {
				t.Fatalf("failing operation returned %v, want ErrFailed and EIO", err)
			}
			failed := s.Failed()
			if !errors.Is(failed, store.ErrFailed) || !errors.Is(failed, syscall.EIO) {
				t.Fatalf("Failed() = %v, want ErrFailed and EIO", failed)
			}
			t.Logf("Failed() = %v", failed)

			// The fault is gone; the store stays stopped.
			*ffs = faultFS{}
			m := newMsg("later@example.com")
			writes := map[string]error{
				"Create": s.Create(context.Background(), m, nil, strings.NewReader("x"), 1),
				"Update": s.Update(context.Background(), keep),
				"Delete": s.Delete(context.Background(), keep.ID),
			}
			for op, err := range writes {
				if !errors.Is(err, store.ErrFailed) {
					t.Errorf("%s after the failure = %v, want ErrFailed", op, err)
				}
			}
			s.Quarantine(keep.ID, errors.New("test"))
			mu.Lock()
			if len(told) != 1 || told[0] != failed {
				t.Errorf("OnFailed told %v, want once %v", told, failed)
			}
			mu.Unlock()

			// Reads go on.
			if _, b := readContent(t, s, keep); b != body {
				t.Fatalf("content of %v: %q", keep.ID, b)
			}
			n := 0
			if err := s.Walk(func(*store.Message) error { n++; return nil }); err != nil || n == 0 {
				t.Fatalf("Walk: %d entries, %v", n, err)
			}
			if _, ok, err := s.Oldest(); err != nil || !ok {
				t.Fatalf("Oldest: %v %v", ok, err)
			}
			if kept != 0 {
				if _, err := os.Stat(filepath.Join(dir, "bodies", kept.String())); err != nil {
					t.Fatalf("content file of the failed Create removed: %v", err)
				}
			}

			// A restart recovers.
			s.Close()
			s2 := openTest(t, dir, DirOptions{InlineLimit: 16})
			if err := s2.Failed(); err != nil {
				t.Fatalf("Failed() = %v after reopening", err)
			}
			if _, b := readContent(t, s2, keep); b != body {
				t.Fatalf("content of %v after reopening: %q", keep.ID, b)
			}
			if kept != 0 {
				if _, err := os.Stat(filepath.Join(dir, "bodies", kept.String())); !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("orphan content file not removed at open: %v", err)
				}
			}
			if err := s2.Create(context.Background(), newMsg("a@example.com"), nil, strings.NewReader("x"), 1); err != nil {
				t.Fatalf("Create after reopening: %v", err)
			}
		})
	}
}
