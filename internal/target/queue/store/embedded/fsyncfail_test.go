package embedded

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	"github.com/maddy-spool/spool/internal/testutils/lazyfs"
)

// TestFsyncFailure runs the store on lazyfs in a child process (this test
// binary, re-executed) and makes one fsync fail with EIO while a
// file-backed message is created: that of the content file, of bodies/, or
// bbolt's fdatasync of the database's data pages or of its meta page. The
// child checks that the store stops (every later write fails with
// ErrFailed, OnFailed is told once, reads go on, the content file is kept)
// and prints "bad ..." otherwise. Then the file system crashes, and a
// second child (plVerify) reopens the store: every acknowledged message is
// whole, and no entry refers to missing content.

const ffChildEnv = "SPOOL_FSYNCFAIL_CHILD"

func TestFsyncFailureChild(t *testing.T) {
	dir := os.Getenv(ffChildEnv)
	if dir == "" {
		t.Skip("helper for TestFsyncFailure")
	}
	ffWork(dir)
	os.Exit(0)
}

// ffWork creates two messages, prints "ready", waits for a line on stdin
// (the parent arms the fault meanwhile), and then meets the fault.
func ffWork(dir string) {
	out := os.Stdout
	bad := func(format string, args ...interface{}) { fmt.Fprintf(out, "bad "+format+"\n", args...) }
	var mu sync.Mutex
	var told []error
	s, err := OpenDir(dir, DirOptions{InlineLimit: plInline, OnFailed: func(err error) {
		mu.Lock()
		defer mu.Unlock()
		told = append(told, err)
	}})
	if err != nil {
		bad("open: %v", err)
		return
	}
	defer s.Close()
	ctx := context.Background()
	create := func(n int) (*store.Message, error) {
		m := plMessage(n, 0)
		body := crashBody(n)
		err := s.Create(ctx, m, []byte(plHeader(n)), strings.NewReader(body), int64(len(body)))
		if err == nil {
			fmt.Fprintf(out, "create-ok %d %d\n", m.ID, n)
		}
		return m, err
	}
	// Message 1 is inline, 40 and up are file-backed (see crashBody).
	small, err1 := create(1)
	large, err2 := create(40)
	if err := errors.Join(err1, err2); err != nil {
		bad("create before the fault: %v", err)
		return
	}
	fmt.Fprintln(out, "ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		bad("reading stdin: %v", err)
		return
	}

	m, err := create(41)
	if !errors.Is(err, store.ErrFailed) {
		bad("Create meeting the fault = %v, want ErrFailed", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "bodies", m.ID.String())); err != nil {
		bad("content file of the failed Create removed: %v", err)
	}
	if _, err := create(42); !errors.Is(err, store.ErrFailed) {
		bad("Create after the failure = %v, want ErrFailed", err)
	}
	upd := plMessage(1, 1)
	upd.ID, upd.HeaderLen, upd.BodyLen = small.ID, small.HeaderLen, small.BodyLen
	if err := s.Update(ctx, upd); !errors.Is(err, store.ErrFailed) {
		bad("Update after the failure = %v, want ErrFailed", err)
	}
	if err := s.Delete(ctx, large.ID); !errors.Is(err, store.ErrFailed) {
		bad("Delete after the failure = %v, want ErrFailed", err)
	}
	mu.Lock()
	if failed := s.Failed(); len(told) != 1 || told[0] != failed {
		bad("OnFailed told %v, Failed() = %v", told, failed)
	}
	mu.Unlock()
	for _, m := range []*store.Message{small, large} {
		if _, err := s.Content(m); err != nil {
			bad("reading %v after the failure: %v", m.ID, err)
		}
	}
	fmt.Fprintln(out, "done")
}

func TestFsyncFailure(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes and mounts FUSE")
	}
	lazyfs.Require(t)
	page := int64(os.Getpagesize())
	// bbolt's data pages follow its two meta pages.
	dataPage := func(w lazyfs.Extent) bool { return w.Off+w.Len > 2*page }
	for _, tc := range []struct {
		name  string
		match func(lazyfs.Fsync) bool
	}{
		{"content file", func(c lazyfs.Fsync) bool { return !c.Dir && strings.HasPrefix(c.Path, "queue/bodies/") }},
		{"bodies directory", func(c lazyfs.Fsync) bool { return c.Dir && c.Path == "queue/bodies" }},
		{"database data pages", func(c lazyfs.Fsync) bool {
			return c.Path == "queue/"+dbName && slices.ContainsFunc(c.Writes, dataPage)
		}},
		{"database meta page", func(c lazyfs.Fsync) bool {
			return c.Path == "queue/"+dbName && len(c.Writes) > 0 && !slices.ContainsFunc(c.Writes, dataPage)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fsys := lazyfs.New()
			mnt := t.TempDir()
			dir := filepath.Join(mnt, "queue")
			unmount := plMount(t, fsys, mnt)
			var fired atomic.Bool
			lines := ffRun(t, dir, func() {
				// Only the first matching fsync fails.
				fsys.FailFsync(func(c lazyfs.Fsync) bool {
					return tc.match(c) && fired.CompareAndSwap(false, true)
				})
			})
			unmount()
			if !fired.Load() {
				t.Fatalf("no fsync matched; child said:\n%s", strings.Join(lines, "\n"))
			}
			fsys.Crash(nil)

			acked := map[string]bool{}
			for _, l := range lines {
				f := strings.Fields(l)
				switch {
				case len(f) == 3 && f[0] == "create-ok":
					acked[f[1]+" "+f[2]] = true
				case l == "ready" || l == "done":
				default:
					t.Errorf("child: %s", l)
				}
			}
			unmount = plMount(t, fsys, mnt)
			out := plRun(t, "verify:"+dir, nil)
			unmount()
			for _, l := range out {
				f := strings.Fields(l)
				switch {
				case len(f) == 4 && f[0] == "entry":
					delete(acked, f[1]+" "+f[2])
				case len(f) > 0 && f[0] == "log":
				default:
					t.Errorf("after crash: %s", l)
				}
			}
			for a := range acked {
				t.Errorf("acknowledged message (ID, number) %s lost", a)
			}
		})
	}
}

// ffRun runs the TestFsyncFailureChild child on dir, calls arm once it
// says "ready", and returns its output lines.
func ffRun(t *testing.T, dir string, arm func()) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestFsyncFailureChild$")
	cmd.Env = append(os.Environ(), ffChildEnv+"="+dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var lines []string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if sc.Text() == "ready" {
			arm()
			fmt.Fprintln(stdin, "go")
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v; stderr:\n%s", err, stderr.String())
	}
	return lines
}
