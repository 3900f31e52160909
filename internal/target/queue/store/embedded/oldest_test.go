package embedded

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// createArrivals stores one message per arrival offset from t0, in order
// (so IDs grow along the list), and returns them.
func createArrivals(t *testing.T, s *Dir, offsets []time.Duration) []*store.Message {
	t.Helper()
	var ms []*store.Message
	for _, off := range offsets {
		m := newMsg("a@example.com")
		m.Arrival = t0.Add(off)
		if err := s.Create(context.Background(), m, nil, strings.NewReader("b"), 1); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
	}
	return ms
}

func checkOldest(t *testing.T, s *Dir, want time.Time, wantOK bool) {
	t.Helper()
	got, ok, err := s.Oldest()
	if err != nil || ok != wantOK || (ok && !got.Equal(want)) {
		t.Fatalf("Oldest = %v, %v, %v; want %v, %v", got, ok, err, want, wantOK)
	}
}

// TestOldestByArrival: Oldest is the earliest arrival time, whatever the
// order of IDs (imported mail keeps its arrival time but gets new IDs).
func TestOldestByArrival(t *testing.T) {
	h := time.Hour
	for _, tc := range []struct {
		name     string
		arrivals []time.Duration
		// change is applied to the stored messages before Oldest.
		change func(t *testing.T, s *Dir, ms []*store.Message)
		want   time.Duration
		empty  bool
	}{
		{"newer ID arrived earlier", []time.Duration{0, -2 * h, -1 * h}, nil, -2 * h, false},
		{"earliest deleted", []time.Duration{0, -2 * h, -1 * h}, func(t *testing.T, s *Dir, ms []*store.Message) {
			if err := s.Delete(context.Background(), ms[1].ID); err != nil {
				t.Fatal(err)
			}
		}, -1 * h, false},
		{"earliest quarantined", []time.Duration{0, -2 * h, -1 * h}, func(t *testing.T, s *Dir, ms []*store.Message) {
			s.Quarantine(ms[1].ID, errors.New("test"))
		}, -1 * h, false},
		{"arrival updated", []time.Duration{0, -2 * h, -1 * h}, func(t *testing.T, s *Dir, ms []*store.Message) {
			ms[0].Arrival = t0.Add(-3 * h)
			if err := s.Update(context.Background(), ms[0]); err != nil {
				t.Fatal(err)
			}
			ms[1].Arrival = t0.Add(h)
			if err := s.Update(context.Background(), ms[1]); err != nil {
				t.Fatal(err)
			}
		}, -3 * h, false},
		{"same arrival", []time.Duration{h, h}, nil, h, false},
		{"before 1970", []time.Duration{0, -60 * 24 * 365 * h}, nil, -60 * 24 * 365 * h, false},
		{"all deleted", []time.Duration{0, -h}, func(t *testing.T, s *Dir, ms []*store.Message) {
			for _, m := range ms {
				if err := s.Delete(context.Background(), m.ID); err != nil {
					t.Fatal(err)
				}
			}
		}, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, dir, DirOptions{})
			ms := createArrivals(t, s, tc.arrivals)
			if tc.change != nil {
				tc.change(t, s, ms)
			}
			checkOldest(t, s, t0.Add(tc.want), !tc.empty)
			s.Close()
			for _, ro := range []bool{false, true} {
				s2 := openTest(t, dir, DirOptions{ReadOnly: ro})
				checkOldest(t, s2, t0.Add(tc.want), !tc.empty)
				s2.Close()
			}
		})
	}
}

// setFormat1 turns the database in dir into what a format-1 build wrote
// (no arrival index), or what an interrupted migration left (a format-1
// marker next to a partial index: here, one entry of a deleted message).
func setFormat1(t *testing.T, dir string, partialIndex bool) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, dbName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(bucketArrival); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
			return err
		}
		if partialIndex {
			b, err := tx.CreateBucket(bucketArrival)
			if err != nil {
				return err
			}
			if err := b.Put(arrivalKey(0x7777, t0.Add(-100*time.Hour)), nil); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketInfo).Put(keyFormat, []byte{1})
	})
	if err != nil {
		t.Fatal(err)
	}
}

func storedFormat(t *testing.T, dir string) byte {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, dbName), 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v []byte
	db.View(func(tx *bolt.Tx) error { v = bytes.Clone(tx.Bucket(bucketInfo).Get(keyFormat)); return nil })
	if len(v) != 1 {
		t.Fatalf("format marker %x", v)
	}
	return v[0]
}

// TestFormat1Database: a database of format 1 (no arrival index) is read
// as it is by a read-only open, and migrated by a writer's open.
func TestFormat1Database(t *testing.T) {
	for _, tc := range []struct {
		name    string
		partial bool
	}{
		{"written by a format-1 build", false},
		{"migration interrupted", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTest(t, dir, DirOptions{})
			createArrivals(t, s, []time.Duration{0, -2 * time.Hour, -time.Hour})
			s.Close()
			setFormat1(t, dir, tc.partial)

			ro := openTest(t, dir, DirOptions{ReadOnly: true})
			checkOldest(t, ro, t0.Add(-2*time.Hour), true)
			ro.Close()
			if f := storedFormat(t, dir); f != 1 {
				t.Fatalf("read-only open changed the format to %d", f)
			}

			rw := openTest(t, dir, DirOptions{})
			checkOldest(t, rw, t0.Add(-2*time.Hour), true)
			ms := createArrivals(t, rw, []time.Duration{-3 * time.Hour})
			checkOldest(t, rw, t0.Add(-3*time.Hour), true)
			if err := rw.Delete(context.Background(), ms[0].ID); err != nil {
				t.Fatal(err)
			}
			checkOldest(t, rw, t0.Add(-2*time.Hour), true)
			rw.Close()
			if f := storedFormat(t, dir); f != dbFormat {
				t.Fatalf("format %d after a writer's open, want %d", f, dbFormat)
			}
		})
	}
}
