package embedded

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// movedAside lists what recovery would have moved: damaged databases and
// files in quarantine/.
func movedAside(t *testing.T, dir string) []string {
	t.Helper()
	aside, _ := filepath.Glob(filepath.Join(dir, dbName+damagedSuffix+"*"))
	quar, _ := filepath.Glob(filepath.Join(dir, "quarantine", "*"))
	return append(aside, quar...)
}

// TestSecondOpenerRefused: while a store is open, another opener fails at
// once with an error naming the holder's PID, and moves nothing. Read-only
// openers share the lock with each other.
func TestSecondOpenerRefused(t *testing.T) {
	lockedMsg := fmt.Sprintf("is locked by PID %d (is another maddy running on this queue?)", os.Getpid())
	for _, tc := range []struct {
		name          string
		first, second bool // ReadOnly of each opener
		wantErr       string
	}{
		{"writer, then writer", false, false, lockedMsg},
		{"writer, then reader", false, true, lockedMsg},
		{"reader, then writer", true, false, "is locked by another process"},
		{"reader, then reader", true, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, dir, DirOptions{InlineLimit: 1})
			createN(t, s, 2, true)
			s.Close()
			openTest(t, dir, DirOptions{ReadOnly: tc.first})
			s2, err := OpenDir(dir, DirOptions{ReadOnly: tc.second, LockTimeout: 50 * time.Millisecond, Logf: t.Logf})
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("second OpenDir: %v", err)
				}
				s2.Close()
				return
			}
			if err == nil {
				s2.Close()
				t.Fatal("second OpenDir succeeded")
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("second OpenDir = %q, want it to say %q", err, tc.wantErr)
			}
			if moved := movedAside(t, dir); len(moved) != 0 {
				t.Fatalf("second opener moved %v", moved)
			}
		})
	}
}

// TestLockedDatabaseNeverJudged: a queue.db that looks damaged (as a new
// one does while its creator is still writing it) is left alone while
// another process holds the store's lock, or (a build without the lock
// file) bbolt's lock on queue.db.
func TestLockedDatabaseNeverJudged(t *testing.T) {
	// holdLock takes an exclusive flock on dir/name and writes pid into it.
	holdLock := func(name, pid string) func(t *testing.T, dir string) {
		return func(t *testing.T, dir string) {
			f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR|os.O_CREATE, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
				t.Fatal(err)
			}
			if pid != "" {
				f.WriteString(pid)
			}
		}
	}
	for _, tc := range []struct {
		name    string
		size    int64
		hold    func(t *testing.T, dir string)
		wantErr string
	}{
		{"empty, being created", 0, holdLock(lockName, "4242\n"), "is locked by PID 4242"},
		{"shorter than its meta pages", 100, holdLock(lockName, "4242\n"), "is locked by PID 4242"},
		{"empty, held by a build without the lock file", 0, holdLock(dbName, ""), "is locked by another process"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, dir, DirOptions{InlineLimit: 1})
			createN(t, s, 2, true)
			s.Close()
			if err := os.Truncate(filepath.Join(dir, dbName), tc.size); err != nil {
				t.Fatal(err)
			}
			tc.hold(t, dir)

			_, err := OpenDir(dir, DirOptions{LockTimeout: 50 * time.Millisecond, Logf: t.Logf})
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("OpenDir = %v, want an error saying %q", err, tc.wantErr)
			}
			if moved := movedAside(t, dir); len(moved) != 0 {
				t.Fatalf("moved aside under another process's lock: %v", moved)
			}
			if fi, err := os.Stat(filepath.Join(dir, dbName)); err != nil || fi.Size() != tc.size {
				t.Fatalf("queue.db changed: %v, %v", fi, err)
			}
		})
	}
}

// TestReadOnlyWithoutLockFile: a store written by a build without the
// lock file opens read-only, and the read-only open creates nothing.
func TestReadOnlyWithoutLockFile(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, DirOptions{})
	createN(t, s, 1, false)
	s.Close()
	if err := os.Remove(filepath.Join(dir, "lock")); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	ro := openTest(t, dir, DirOptions{ReadOnly: true})
	n := 0
	if err := ro.Walk(func(*store.Message) error { n++; return nil }); err != nil || n != 1 {
		t.Fatalf("Walk: %d entries, %v", n, err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "lock")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("read-only open created the lock file: %v", err)
	}
}

// TestTryLockDir: a tool's lock fails at once, naming the holder, while a
// maddy holds the store, and keeps a maddy out while the tool holds it.
func TestTryLockDir(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, DirOptions{})
	if _, err := TryLockDir(dir); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("locked by PID %d", os.Getpid())) {
		t.Fatalf("TryLockDir of an open store = %v", err)
	}
	s.Close()
	release, err := TryLockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s, err := OpenDir(dir, DirOptions{LockTimeout: 50 * time.Millisecond, Logf: t.Logf}); err == nil {
		s.Close()
		t.Fatal("OpenDir succeeded while a tool held the lock")
	}
	release()
	openTest(t, dir, DirOptions{})
}
