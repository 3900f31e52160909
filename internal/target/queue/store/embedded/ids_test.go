package embedded

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
)

// createN stores n messages; file-backed when large is set.
func createN(t *testing.T, s *Dir, n int, large bool) []store.ID {
	t.Helper()
	body := "short"
	if large {
		body = strings.Repeat("x", int(s.inlineLimit)+1)
	}
	var ids []store.ID
	for i := 0; i < n; i++ {
		m := newMsg("a@example.com")
		if err := s.Create(context.Background(), m, nil, strings.NewReader(body), int64(len(body))); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	return ids
}

// TestIDsNeverReused: the newest messages are deleted (so no entry or file
// shows their IDs any more) and the store reopened; the next ID is still
// above every ID handed out before.
func TestIDsNeverReused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		large bool
		// remove is how many of the newest messages go before the reopen.
		remove int
	}{
		{"inline, newest deleted", false, 2},
		{"file-backed, newest deleted", true, 2},
		{"all deleted", false, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, dir, DirOptions{InlineLimit: 64})
			ids := createN(t, s, 3, tc.large)
			for _, id := range ids[len(ids)-tc.remove:] {
				if err := s.Delete(context.Background(), id); err != nil {
					t.Fatal(err)
				}
			}
			s.Close()
			s2 := openTest(t, dir, DirOptions{InlineLimit: 64})
			next := createN(t, s2, 1, false)[0]
			if next <= ids[len(ids)-1] {
				t.Fatalf("new ID %v reuses an ID handed out before (last was %v)", next, ids[len(ids)-1])
			}
		})
	}
}

// TestNextIDWithoutHighWaterMark: a database written by a build that kept
// no high-water mark continues after the highest ID it or the content
// directories show.
func TestNextIDWithoutHighWaterMark(t *testing.T) {
	for _, tc := range []struct {
		name string
		// plant leaves a trace of ID 0x500 somewhere; "" plants nothing.
		plant string
		want  store.ID
	}{
		{"highest entry", "", 3},
		{"file in bodies/", "bodies/0000000000000500.tmp", 0x500},
		{"file in quarantine/", "quarantine/0000000000000500.damaged-20260101T000000Z", 0x500},
		{"renamed file in quarantine/", "quarantine/0000000000000500.1", 0x500},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, dir, DirOptions{})
			createN(t, s, 3, false)
			s.Close()
			db, err := bolt.Open(filepath.Join(dir, "queue.db"), 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketInfo).Delete(keyLastID) }); err != nil {
				t.Fatal(err)
			}
			db.Close()
			if tc.plant != "" {
				if err := os.WriteFile(filepath.Join(dir, tc.plant), []byte("x"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			s2 := openTest(t, dir, DirOptions{})
			if next := createN(t, s2, 1, false)[0]; next != tc.want+1 {
				t.Fatalf("next ID %v, want %v", next, tc.want+1)
			}
		})
	}
}
