package lazyfs

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// mount mounts fsys on a fresh directory, skipping the test where FUSE is
// unavailable (but never in CI).
func mount(t *testing.T, fsys *FS) (string, *fuse.Server) {
	t.Helper()
	dir := t.TempDir()
	skipOrFail := func(err error) {
		t.Helper()
		if os.Getenv("CI") != "" {
			t.Fatalf("FUSE needed in CI: %v", err)
		}
		t.Skipf("FUSE not available: %v", err)
	}
	if err := Available(); err != nil {
		skipOrFail(err)
	}
	srv, err := fsys.Mount(dir)
	if err != nil {
		skipOrFail(err)
	}
	return dir, srv
}

func unmount(t *testing.T, srv *fuse.Server) {
	t.Helper()
	if err := Unmount(srv); err != nil {
		t.Fatalf("unmount: %v", err)
	}
}

func writeFile(t *testing.T, path, data string, sync bool) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(data); err != nil {
		t.Fatal(err)
	}
	if sync {
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func syncDir(t *testing.T, path string) {
	t.Helper()
	d, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
}

// read returns a file's content, or "<missing>".
func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return "<missing>"
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestDurabilityRules(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  map[string]string // path -> content after the crash
	}{
		{"unsynced file and name are lost", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "a"), "data", false)
		}, map[string]string{"a": "<missing>"}},
		{"synced file without directory fsync is lost", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "a"), "data", true)
		}, map[string]string{"a": "<missing>"}},
		{"directory fsync without file fsync keeps an empty file", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "a"), "data", false)
			syncDir(t, dir)
		}, map[string]string{"a": ""}},
		{"file and directory synced survive", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "a"), "data", true)
			syncDir(t, dir)
		}, map[string]string{"a": "data"}},
		{"overwrite after sync is lost", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "a"), "old", true)
			syncDir(t, dir)
			writeFile(t, filepath.Join(dir, "a"), "new!", false)
		}, map[string]string{"a": "old"}},
		{"rename without directory fsync is undone", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "a"), "data", true)
			syncDir(t, dir)
			if err := os.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "b")); err != nil {
				t.Fatal(err)
			}
		}, map[string]string{"a": "data", "b": "<missing>"}},
		{"rename with directory fsync is kept", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "a"), "data", true)
			if err := os.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "b")); err != nil {
				t.Fatal(err)
			}
			syncDir(t, dir)
		}, map[string]string{"a": "<missing>", "b": "data"}},
		{"cross-directory rename durable per side", func(t *testing.T, dir string) {
			if err := os.Mkdir(filepath.Join(dir, "d"), 0o700); err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(dir, "a"), "data", true)
			syncDir(t, dir)
			if err := os.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "d", "a")); err != nil {
				t.Fatal(err)
			}
			syncDir(t, filepath.Join(dir, "d"))
			// The source directory was not synced: both names exist.
		}, map[string]string{"a": "data", "d/a": "data"}},
		{"unlink without directory fsync is undone", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "a"), "data", true)
			syncDir(t, dir)
			if err := os.Remove(filepath.Join(dir, "a")); err != nil {
				t.Fatal(err)
			}
		}, map[string]string{"a": "data"}},
		{"new directory needs its parent synced", func(t *testing.T, dir string) {
			if err := os.Mkdir(filepath.Join(dir, "d"), 0o700); err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(dir, "d", "a"), "data", true)
			syncDir(t, filepath.Join(dir, "d"))
		}, map[string]string{"d/a": "<missing>"}},
		{"truncate is durable on fsync", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "a"), "long data", true)
			syncDir(t, dir)
			if err := os.Truncate(filepath.Join(dir, "a"), 4); err != nil {
				t.Fatal(err)
			}
		}, map[string]string{"a": "long data"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fsys := New()
			dir, srv := mount(t, fsys)
			tc.setup(t, dir)
			checkAfterCrash(t, fsys, dir, srv, tc.want)
		})
	}
}

// checkAfterCrash unmounts fsys from dir (served by srv), crashes it,
// mounts it again and checks the content of each path in want ("<missing>"
// for none).
func checkAfterCrash(t *testing.T, fsys *FS, dir string, srv *fuse.Server, want map[string]string) {
	t.Helper()
	unmount(t, srv)
	fsys.Crash(nil)
	srv = mustMount(t, fsys, dir)
	defer unmount(t, srv)
	for p, want := range want {
		if got := read(t, filepath.Join(dir, p)); got != want {
			t.Errorf("%s after crash = %q, want %q", p, got, want)
		}
	}
}

func mustMount(t *testing.T, fsys *FS, dir string) *fuse.Server {
	t.Helper()
	srv, err := fsys.Mount(dir)
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

func TestFreezeFailsWritesKeepsReads(t *testing.T) {
	fsys := New()
	dir, srv := mount(t, fsys)
	defer func() { unmount(t, srv) }()
	writeFile(t, filepath.Join(dir, "a"), "data", true)
	syncDir(t, dir)
	fsys.FreezeAfter(1)
	f, err := os.OpenFile(filepath.Join(dir, "a"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString("more"); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write after freeze = %v, want EIO", err)
	}
	select {
	case <-fsys.Frozen():
	default:
		t.Fatal("Frozen not closed")
	}
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o700); !errors.Is(err, syscall.EIO) {
		t.Fatalf("mkdir after freeze = %v, want EIO", err)
	}
	if got := read(t, filepath.Join(dir, "a")); got != "data" {
		t.Fatalf("read after freeze = %q", got)
	}
}

func TestTornWritesKeepAPrefix(t *testing.T) {
	const all = "one two three "
	kept := map[string]bool{}
	for seed := int64(0); seed < 16; seed++ {
		fsys := New()
		dir, srv := mount(t, fsys)
		path := filepath.Join(dir, "a")
		writeFile(t, path, "", true)
		syncDir(t, dir)
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []string{"one ", "two ", "three "} {
			if _, err := f.WriteString(s); err != nil {
				t.Fatal(err)
			}
		}
		f.Close()
		unmount(t, srv)
		fsys.Crash(rand.New(rand.NewSource(seed)))
		srv = mustMount(t, fsys, dir)
		got := read(t, path)
		unmount(t, srv)
		if len(got) > len(all) || got != all[:len(got)] {
			t.Fatalf("seed %d: %q is not a prefix of the writes", seed, got)
		}
		kept[got] = true
	}
	// Different seeds keep different prefixes, torn ones included.
	if len(kept) < 3 {
		t.Fatalf("only %d distinct outcomes over 16 seeds: %v", len(kept), kept)
	}
	t.Logf("outcomes: %v", kept)
}

func TestFailFsync(t *testing.T) {
	// syncErr fsyncs path and returns the error.
	syncErr := func(t *testing.T, path string) error {
		f, err := os.OpenFile(path, os.O_RDONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		return f.Sync()
	}
	overwrite := func(t *testing.T, path, data string) {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteString(data); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name string
		fail string // path whose fsyncs fail
		// run gets the mount point; fsyncs of fail fail from its start.
		run  func(t *testing.T, fsys *FS, dir string)
		want map[string]string // path -> content after the crash
	}{
		{"failed file fsync makes nothing durable", "a", func(t *testing.T, fsys *FS, dir string) {
			overwrite(t, filepath.Join(dir, "a"), "new")
			if err := syncErr(t, filepath.Join(dir, "a")); !errors.Is(err, syscall.EIO) {
				t.Fatalf("fsync = %v, want EIO", err)
			}
			if got := read(t, filepath.Join(dir, "a")); got != "new" {
				t.Fatalf("after the failed fsync a reads %q, want the written data", got)
			}
		}, map[string]string{"a": "old"}},
		{"writes of a failed fsync are not made durable by a later one", "a", func(t *testing.T, fsys *FS, dir string) {
			overwrite(t, filepath.Join(dir, "a"), "lost")
			if err := syncErr(t, filepath.Join(dir, "a")); !errors.Is(err, syscall.EIO) {
				t.Fatalf("fsync = %v, want EIO", err)
			}
			fsys.FailFsync(nil)
			if err := syncErr(t, filepath.Join(dir, "a")); err != nil {
				t.Fatalf("second fsync: %v", err)
			}
		}, map[string]string{"a": "old"}},
		{"other files are not affected", "a", func(t *testing.T, fsys *FS, dir string) {
			writeFile(t, filepath.Join(dir, "b"), "b data", true)
			syncDir(t, dir)
		}, map[string]string{"a": "old", "b": "b data"}},
		{"failed directory fsync keeps the old entries", "", func(t *testing.T, fsys *FS, dir string) {
			writeFile(t, filepath.Join(dir, "b"), "b data", true)
			if err := syncErr(t, dir); !errors.Is(err, syscall.EIO) {
				t.Fatalf("directory fsync = %v, want EIO", err)
			}
		}, map[string]string{"a": "old", "b": "<missing>"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fsys := New()
			dir, srv := mount(t, fsys)
			writeFile(t, filepath.Join(dir, "a"), "old", true)
			syncDir(t, dir)
			fsys.FailFsync(func(c Fsync) bool { return c.Path == tc.fail })
			tc.run(t, fsys, dir)
			checkAfterCrash(t, fsys, dir, srv, tc.want)
		})
	}
}

// TestFsyncDescription: FailFsync's function sees the path and the writes
// each fsync is to make durable.
func TestFsyncDescription(t *testing.T) {
	fsys := New()
	dir, srv := mount(t, fsys)
	defer func() { unmount(t, srv) }()
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o700); err != nil {
		t.Fatal(err)
	}
	var seen []Fsync
	fsys.FailFsync(func(c Fsync) bool { seen = append(seen, c); return false })
	f, err := os.Create(filepath.Join(dir, "d", "a"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, w := range []struct {
		off  int64
		data string
	}{{0, "ab"}, {10, "cde"}} {
		if _, err := f.WriteAt([]byte(w.data), w.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	syncDir(t, filepath.Join(dir, "d"))
	fsys.FailFsync(nil)
	want := []Fsync{
		{Path: "d/a", Writes: []Extent{{0, 2}, {10, 3}}},
		{Path: "d", Dir: true},
	}
	if fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Fatalf("fsyncs seen: %+v, want %+v", seen, want)
	}
}
