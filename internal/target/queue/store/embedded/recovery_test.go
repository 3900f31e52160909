package embedded

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// damageDB replaces queue.db by garbage bbolt cannot open.
func damageDB(t *testing.T, dir string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "queue.db"), bytes.Repeat([]byte{0xde}, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
}

// contentFiles maps each file under bodies/ and quarantine/ to its content.
func contentFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	for _, sub := range []string{"bodies", "quarantine"} {
		entries, err := os.ReadDir(filepath.Join(dir, sub))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(dir, sub, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			files[sub+"/"+e.Name()] = string(b)
		}
	}
	return files
}

// sameContents reports whether two file maps hold the same contents,
// whatever the names.
func sameContents(a, b map[string]string) bool {
	count := map[string]int{}
	for _, v := range a {
		count[v]++
	}
	for _, v := range b {
		count[v]--
	}
	for _, n := range count {
		if n != 0 {
			return false
		}
	}
	return len(a) == len(b)
}

// TestRecoveryNeverDeletesWhatItCouldNotMove: when a content file of a
// damaged database cannot be moved to quarantine/, OpenDir fails naming
// the file and the cause, and no content file is deleted, neither then
// nor at the next open once the fault is gone.
func TestRecoveryNeverDeletesWhatItCouldNotMove(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, DirOptions{InlineLimit: 1})
	ids := createN(t, s, 3, true)
	s.Close()
	before := contentFiles(t, dir)
	damageDB(t, dir)

	stuck := filepath.Join(dir, "bodies", ids[1].String())
	ffs := &faultFS{renameErr: func(old string) error {
		if old == stuck {
			return &os.LinkError{Op: "rename", Old: old, New: "x", Err: syscall.EACCES}
		}
		return nil
	}}
	_, err := OpenDir(dir, DirOptions{FS: ffs, Logf: t.Logf})
	if err == nil {
		t.Fatal("OpenDir succeeded although a content file could not be moved")
	}
	t.Logf("OpenDir: %v", err)
	if !strings.Contains(err.Error(), ids[1].String()) || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("error %q does not name the file %v and the cause", err, ids[1])
	}
	if got := contentFiles(t, dir); !sameContents(got, before) {
		t.Fatalf("content files changed by the failed recovery:\nbefore %v\nafter  %v", before, got)
	}

	// With the fault gone, recovery completes and keeps everything.
	s2 := openTest(t, dir, DirOptions{})
	got := contentFiles(t, dir)
	if !sameContents(got, before) {
		t.Fatalf("content files lost:\nbefore %v\nafter  %v", before, got)
	}
	for name := range got {
		if !strings.HasPrefix(name, "quarantine/") {
			t.Errorf("%s not moved to quarantine/", name)
		}
	}
	if n, _ := s2.Quarantined(); n != 0 {
		t.Fatalf("new database holds %d quarantine records", n)
	}
}

// TestRecoveryNeverReusesIDs: a database that replaces a damaged one never
// hands out an ID the damaged one may have used, though it cannot be read.
func TestRecoveryNeverReusesIDs(t *testing.T) {
	moveAside := func(t *testing.T, dir string) {
		if err := os.Rename(filepath.Join(dir, "queue.db"), filepath.Join(dir, "queue.db.damaged-20260101T000000Z")); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name string
		// recoveries is how many times the database is damaged, with
		// messages stored after each.
		recoveries int
		damage     func(t *testing.T, dir string)
	}{
		{"damaged database", 1, damageDB},
		{"damaged twice", 2, damageDB},
		{"crash after the database was moved aside", 1, moveAside},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			var last store.ID
			for i := 0; i <= tc.recoveries; i++ {
				floor := recoveryIDFloor(time.Now())
				s := openTest(t, dir, DirOptions{})
				ids := createN(t, s, 3, false)
				if ids[0] <= last {
					t.Fatalf("after %d recoveries: ID %v reuses one up to %v", i, ids[0], last)
				}
				if i > 0 && ids[0] <= floor {
					t.Fatalf("after %d recoveries: ID %v not above the floor %v", i, ids[0], floor)
				}
				last = ids[len(ids)-1]
				s.Close()
				tc.damage(t, dir)
			}
		})
	}
}

func TestRecoveryIDFloor(t *testing.T) {
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		a, b time.Time
	}{
		{"a second later", base, base.Add(time.Second)},
		{"a microsecond later", base, base.Add(time.Microsecond)},
		{"within the same second", base.Add(100 * time.Millisecond), base.Add(900 * time.Millisecond)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if fa, fb := recoveryIDFloor(tc.a), recoveryIDFloor(tc.b); fb <= fa {
				t.Fatalf("floor at %v = %v, not above %v at %v", tc.b, fb, fa, tc.a)
			}
		})
	}
	// Above what a counter from 1 could reach at one ID per microsecond
	// since 1970.
	if f := recoveryIDFloor(base); f < store.ID(base.UnixMicro()) {
		t.Fatalf("floor %v below %v", f, base.UnixMicro())
	}
}
