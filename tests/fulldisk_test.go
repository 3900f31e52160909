//go:build linux

package tests

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/testutils"
)

// mountTmpfs mounts a tmpfs of the given size (e.g. "16m") on a fresh
// directory and unmounts it in t.Cleanup (after the servers started later
// are stopped, since cleanups run last-registered first). Mounting needs
// root or CAP_SYS_ADMIN: without it the test is skipped, unless CI is set,
// where it fails.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "size="+size+",mode=0700"); err != nil {
		msg := fmt.Sprintf("cannot mount a %s tmpfs on %s (needs root or CAP_SYS_ADMIN): %v", size, dir, err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg + "; CI is set, so this is a failure rather than a skip")
		}
		t.Skip(msg)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmounting %s: %v", dir, err)
			_ = syscall.Unmount(dir, syscall.MNT_DETACH)
		}
	})
	return dir
}

// freeBytes is what statfs says is available to unprivileged writers, the
// figure min_free_space is compared with.
func freeBytes(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Bavail * uint64(st.Bsize)
}

// writeFiller creates path with n bytes (all of the free space if n < 0,
// stopping at ENOSPC) and returns how many bytes it holds.
func writeFiller(t *testing.T, path string, n int64) int64 {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 64<<10)
	var written int64
	for n < 0 || written < n {
		b := chunk
		if n >= 0 && n-written < int64(len(b)) {
			b = b[:n-written]
		}
		k, err := f.Write(b)
		written += int64(k)
		if err != nil {
			if n < 0 && errors.Is(err, syscall.ENOSPC) {
				break
			}
			t.Fatalf("writing filler %s: %v", path, err)
		}
	}
	if n < 0 {
		// Top up whatever page-sized rest the big writes could not take.
		for {
			k, err := f.Write(chunk[:512])
			written += int64(k)
			if err != nil {
				break
			}
		}
	}
	return written
}

// treeListing lists the regular files under dir with their sizes, one
// "path size" per entry, sorted; queue.db's size is left out because the
// database may grow its file without storing anything.
func treeListing(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		if d.IsDir() {
			out = append(out, rel+"/")
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.Name() == "queue.db" {
			out = append(out, rel)
		} else {
			out = append(out, fmt.Sprintf("%s %d", rel, info.Size()))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// diskBody returns a body of about n bytes, above the 64 KiB kept inline,
// so the message goes to a file under bodies/.
func diskBody(id string, n int) string {
	line := "full disk test " + id + " 0123456789 abcdefghijklmnopqrstuvwxyz\r\n"
	return strings.Repeat(line, n/len(line)+1)
}

// TestFullDisk runs the server with its state directory on a 16 MiB tmpfs.
// With min_free_space, mail is refused with 452 4.3.1 once free space
// falls below the margin (visible in the metrics), queued mail is still
// delivered, and intake resumes by itself once delivery frees space. With
// the margin disabled and the disk completely full, a message gets
// 451 4.3.1, nothing of it is left in the queue directory, the server keeps
// running and delivering, and mail is accepted again once space is freed.
func TestFullDisk(t *testing.T) {
	t.Parallel()
	const (
		margin  = 4 << 20
		msgSize = 512 << 10 // < 1 MiB, so the endpoint buffers it in memory
		from    = "sender@origin.test"
	)
	mnt := mountTmpfs(t, "16m")
	deferAll := func(stage, _, _ string, _ int) *smtp.SMTPError {
		if stage == testutils.StageRCPT {
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "deferred by sink")
		}
		return nil
	}
	sink := newSink(t, testutils.WithScript(deferAll))
	e := newEnv(t, sink, func(p *params) {
		p.Dir = mnt
		p.MaxTries = "100"
		p.Extra = append(p.Extra, "min_free_space 4M")
	})
	rcpts := []string{"alice@remote.test"}

	// Part 1: the min_free_space margin.
	if v := e.mustMetric("maddy_spool_min_free_space_bytes"); v != margin {
		t.Errorf("maddy_spool_min_free_space_bytes = %v, want %d", v, margin)
	}
	// Leave about 6 MiB, so a handful of messages reach the margin.
	filler := filepath.Join(mnt, "filler")
	writeFiller(t, filler, int64(freeBytes(t, mnt))-6<<20)

	var queued []string
	var refused txResult
	for i := 1; ; i++ {
		if i > 20 {
			t.Fatalf("20 messages of %d bytes accepted with %d bytes free: min_free_space never refused one", msgSize, freeBytes(t, mnt))
		}
		id := msgID(t, i)
		free := freeBytes(t, mnt)
		res := submitTx(e.smtpAddr(), from, rcpts, newMessage(from, rcpts, id, diskBody(id, msgSize)), waitTimeout)
		if res.Accepted {
			if free < margin {
				t.Errorf("message %d accepted with %d bytes free, below the %d margin", i, free, margin)
			}
			queued = append(queued, id)
			continue
		}
		refused = res
		t.Logf("message %d refused with %d bytes free (margin %d): %v", i, free, margin, res.Err)
		if free >= margin+2*msgSize {
			t.Errorf("refused with %d bytes free, well above margin %d + message", free, margin)
		}
		break
	}
	if refused.code() != 452 || refused.enhanced() != "4.3.1" {
		t.Fatalf("refusal at %s: %v; want 452 4.3.1", refused.Stage, refused.Err)
	}
	if len(queued) == 0 {
		t.Fatal("no message was queued before the margin was reached")
	}
	e.waitMetric("maddy_spool_enqueue_failures_total", atLeast(1), "reason", "min_free_space")
	if v, _ := e.metric("maddy_spool_enqueue_failures_total", "reason", "store_error"); v != 0 {
		t.Errorf("enqueue_failures_total{reason=store_error} = %v, want 0 (the margin should refuse first)", v)
	}
	diskFree := e.mustMetric("maddy_spool_disk_free_bytes")
	if diskFree >= margin+msgSize || diskFree <= 0 {
		t.Errorf("maddy_spool_disk_free_bytes = %v while refusing; want below margin+message = %d", diskFree, margin+msgSize)
	}
	t.Logf("min_free_space: %d messages queued, then 452 4.3.1; disk_free_bytes %v", len(queued), diskFree)

	// Queued mail is delivered when the sink accepts, and that frees the
	// space for new mail, without a restart.
	sink.SetScript(nil)
	waitDelivered(t, sink, queued, rcpts)
	e.waitMetric("maddy_spool_messages_queued", eq(0))
	e.waitMetric("maddy_spool_disk_free_bytes", atLeast(margin+msgSize))
	after := msgID(t, 100)
	if res := submitTx(e.smtpAddr(), from, rcpts, newMessage(from, rcpts, after, diskBody(after, msgSize)), waitTimeout); !res.Accepted {
		t.Fatalf("after delivery freed space: %s: %v; want 250", res.Stage, res.Err)
	}
	waitDelivered(t, sink, []string{after}, rcpts)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}

	// Part 2: no margin, the disk completely full.
	if code := e.srv.stop(); code != 0 {
		t.Fatalf("exit status after SIGTERM = %d", code)
	}
	patchConfig(t, e.cfg, "min_free_space 4M", "min_free_space 0")
	const held = "held@remote.test"
	release := make(chan struct{})
	sink.SetScript(func(stage, _, rcpt string, _ int) *smtp.SMTPError {
		select {
		case <-release:
			return nil
		default:
		}
		if stage == testutils.StageRCPT && strings.EqualFold(rcpt, held) {
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "held by sink")
		}
		return nil
	})
	e.restart()
	if v := e.mustMetric("maddy_spool_min_free_space_bytes"); v != 0 {
		t.Errorf("maddy_spool_min_free_space_bytes = %v with min_free_space 0", v)
	}
	// One large message stays queued (its content in bodies/) while the
	// disk is full.
	heldID := msgID(t, 200)
	if res := submitTx(e.smtpAddr(), from, []string{held}, newMessage(from, []string{held}, heldID, diskBody(heldID, msgSize)), waitTimeout); !res.Accepted {
		t.Fatalf("queueing the held message: %s: %v", res.Stage, res.Err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := sink.WaitRcptAttempts(ctx, held, 1); err != nil {
		t.Fatal(err)
	}

	full := filepath.Join(mnt, "filler-full")
	n := writeFiller(t, full, -1)
	t.Logf("disk filled: filler of %d bytes, %d bytes left", n, freeBytes(t, mnt))
	before := treeListing(t, e.queueDir())
	if bodies := dirFiles(t, filepath.Join(e.queueDir(), "bodies")); len(bodies) != 1 {
		t.Fatalf("bodies/ holds %v, want the held message's content file", bodies)
	}

	failID := msgID(t, 300)
	failMsg := newMessage(from, rcpts, failID, diskBody(failID, msgSize))
	res := submitTx(e.smtpAddr(), from, rcpts, failMsg, waitTimeout)
	if res.Accepted || res.code() != 451 || res.enhanced() != "4.3.1" {
		t.Fatalf("message on a full disk: accepted=%v at %s: %v; want 451 4.3.1", res.Accepted, res.Stage, res.Err)
	}
	t.Logf("full disk: %v", res.Err)
	e.waitMetric("maddy_spool_enqueue_failures_total", atLeast(1), "reason", "store_error")
	if got := treeListing(t, e.queueDir()); strings.Join(got, "\n") != strings.Join(before, "\n") {
		t.Errorf("queue directory changed by the failed message:\nbefore:\n%s\nafter:\n%s", strings.Join(before, "\n"), strings.Join(got, "\n"))
	}
	if e.srv.exited() {
		t.Fatalf("the server exited on a full disk: %v", e.srv.exitErr)
	}

	// Delivery of what is queued goes on while the disk is full.
	close(release)
	waitDelivered(t, sink, []string{heldID}, []string{held})
	if e.srv.exited() {
		t.Fatalf("the server exited delivering on a full disk: %v", e.srv.exitErr)
	}

	// Freeing space: mail is accepted and delivered again, no restart.
	if err := os.Remove(full); err != nil {
		t.Fatal(err)
	}
	if res := submitTx(e.smtpAddr(), from, rcpts, failMsg, waitTimeout); !res.Accepted {
		t.Fatalf("after freeing space: %s: %v; want 250", res.Stage, res.Err)
	}
	waitDelivered(t, sink, []string{failID}, rcpts)
	e.waitMetric("maddy_spool_messages_queued", eq(0))
	eventually(t, waitTimeout, func() bool { return len(dirFiles(t, filepath.Join(e.queueDir(), "bodies"))) == 0 })
	if n := sink.DeliveryCount(failID, rcpts[0]); n != 1 {
		t.Errorf("the message refused on the full disk and then accepted reached %s %d times, want 1", rcpts[0], n)
	}
	t.Logf("held message delivered %d time(s) across the full-disk period", sink.DeliveryCount(heldID, held))
	if n := sink.DeliveryCount(heldID, held); n > 2 {
		t.Errorf("held message delivered %d times; a failed state update may repeat it once, not more", n)
	}
	if code := e.srv.stop(); code != 0 {
		t.Errorf("exit status after SIGTERM = %d, want 0", code)
	}
}
