package queue

import (
	"errors"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/exterrors"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
)

// syncFailFS is the OS file system whose content-file fsyncs fail with EIO
// while failSync is set, as a failing disk's do.
type syncFailFS struct {
	embedded.OSFS
	failSync atomic.Bool
}

func (fs *syncFailFS) CreateExcl(name string) (embedded.File, error) {
	f, err := fs.OSFS.CreateExcl(name)
	if err != nil {
		return nil, err
	}
	return &syncFailFile{File: f, fs: fs}, nil
}

type syncFailFile struct {
	embedded.File
	fs *syncFailFS
}

func (f *syncFailFile) Sync() error {
	if f.fs.failSync.Load() {
		return syscall.EIO
	}
	return f.File.Sync()
}

// TestFailedFsyncStopsIntakeAndDelivery: once a write fails in a way that
// leaves its durability unknown, the queue answers 451 4.3.0 to new mail,
// stops delivering (queued mail waits for the restart) and says so in
// maddy_spool_store_failed; a restart recovers.
func TestFailedFsyncStopsIntakeAndDelivery(t *testing.T) {
	fs := &syncFailFS{}
	h := newHarness(t, func(h *harness) {
		h.storeOpts = func(o *embedded.Options) { o.FS = fs }
	})
	h.target.StartErr = func(attempt int) error {
		if attempt == 1 {
			return temp451
		}
		return nil
	}
	h.submit("s@example.org", rcpts("queued@x.test"), smtp.MailOptions{})
	h.waitAttempts(1) // deferred to t0+1m

	large := strings.Repeat("x", 100<<10) // stored in its own file
	fs.failSync.Store(true)
	if err := h.trySubmit("s@example.org", rcpts("large@x.test"), smtp.MailOptions{}, large); err == nil {
		t.Fatal("a message whose content could not be fsynced was accepted")
	}
	fs.failSync.Store(false)
	err := h.trySubmit("s@example.org", rcpts("later@x.test"), smtp.MailOptions{}, testBody)
	var se *exterrors.SMTPError
	if !errors.As(err, &se) || se.Code != 451 || se.EnhancedCode != (exterrors.EnhancedCode{4, 3, 0}) {
		t.Fatalf("new mail after the store failed: %v, want 451 4.3.0", err)
	}
	if g := h.q.Gauges(); !g.StoreFailed {
		t.Fatal("gauges do not show the failed store")
	}
	select {
	case <-h.q.runDone:
	case <-time.After(20 * time.Second):
		t.Fatal("dispatch goes on after the store failed")
	}
	h.clock.Advance(time.Hour)
	if n := h.target.Attempts(); n != 1 {
		t.Fatalf("%d attempts; the queued message was attempted after the store failed", n)
	}

	h.restart()
	h.waitAttempts(1)
	if n := h.target.CountDelivered("queued@x.test"); n != 1 {
		t.Fatalf("queued message delivered %d times after the restart", n)
	}
	if g := h.q.Gauges(); g.StoreFailed {
		t.Fatal("the restart did not clear the failed state")
	}
}
