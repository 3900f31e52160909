package embedded

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// TestFullDiskDoesNotStopStore: a commit that fails because the disk is
// full (bbolt cannot write its pages) fails only itself; once space is
// freed, the store takes new mail again without a restart.
func TestFullDiskDoesNotStopStore(t *testing.T) {
	mnt := t.TempDir()
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size=4m"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("mounting a tmpfs (needs root): %v", err)
		}
		t.Skipf("cannot mount a tmpfs (needs root): %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	s := openTest(t, filepath.Join(mnt, "queue"), DirOptions{})

	filler := filepath.Join(mnt, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	f.Close()

	// Inline messages: only bbolt writes, and meets the full disk.
	body := strings.Repeat("x", 32<<10)
	var acked []*store.Message
	var createErr error
	for i := 0; i < 1000 && createErr == nil; i++ {
		m := newMsg(fmt.Sprintf("r%d@example.com", i))
		if createErr = s.Create(context.Background(), m, nil, strings.NewReader(body), int64(len(body))); createErr == nil {
			acked = append(acked, m)
		}
	}
	if !errors.Is(createErr, syscall.ENOSPC) {
		t.Fatalf("Create on a full disk = %v, want ENOSPC", createErr)
	}
	t.Logf("%d messages stored, then: %v", len(acked), createErr)
	if err := s.Failed(); err != nil {
		t.Fatalf("store stopped on a full disk: %v", err)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	m := newMsg("after@example.com")
	if err := s.Create(context.Background(), m, nil, strings.NewReader(body), int64(len(body))); err != nil {
		t.Fatalf("Create after space was freed: %v", err)
	}
	for _, m := range append(acked, m) {
		if _, b := readContent(t, s, m); b != body {
			t.Fatalf("message %v damaged", m.ID)
		}
	}
}
