package queue

import (
	"errors"
	"sync/atomic"
	"testing"

	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/exterrors"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/maddy-spool/spool/internal/target/queue/metrics"
)

func TestMinFreeSpaceRefusesWith452AndRecovers(t *testing.T) {
	var free atomic.Uint64
	h := newHarness(t, func(h *harness) { h.cfg.minFreeSpace = 1 << 20 })
	h.q.diskFree = func(string) (uint64, error) { return free.Load(), nil }
	refusals := func() float64 {
		return testutil.ToFloat64(metrics.EnqueueFailures.WithLabelValues("test_queue", metrics.ReasonMinFreeSpace))
	}
	before := refusals()

	for _, tc := range []struct {
		name   string
		free   uint64
		accept bool
	}{
		{"far below the margin", 1000, false},
		{"margin exactly, no room for the message", 1 << 20, false},
		{"margin plus the message", 1<<20 + 4096, true},
		{"plenty", 1 << 30, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			free.Store(tc.free)
			err := h.trySubmit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{}, testBody)
			if tc.accept {
				if err != nil {
					t.Fatalf("refused with %v free: %v", tc.free, err)
				}
				return
			}
			var se *exterrors.SMTPError
			if !errors.As(err, &se) || se.Code != 452 || se.EnhancedCode != (exterrors.EnhancedCode{4, 3, 1}) || !exterrors.IsTemporary(err) {
				t.Fatalf("with %d bytes free: %#v, want temporary 452 4.3.1", tc.free, err)
			}
		})
	}
	if got := refusals() - before; got != 2 {
		t.Fatalf("min_free_space refusals counted %v, want 2", got)
	}
	// Refused messages left nothing behind; accepted ones are queued.
	h.waitAttempts(2)
	if n := h.target.CountDelivered("a@x.test"); n != 2 {
		t.Fatalf("delivered %d, want the 2 accepted messages", n)
	}
	g := h.q.Gauges()
	if !g.HaveFree || g.FreeBytes != 1<<30 || g.MinFree != 1<<20 {
		t.Fatalf("gauges %+v", g)
	}
}

func TestMinFreeSpaceStatfsErrorDoesNotRefuse(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.cfg.minFreeSpace = 1 << 20 })
	h.q.diskFree = func(string) (uint64, error) { return 0, errors.New("statfs: input/output error") }
	if err := h.trySubmit("s@example.org", rcpts("a@x.test"), smtp.MailOptions{}, testBody); err != nil {
		t.Fatalf("refused although free space is unknown: %v", err)
	}
}

func TestMinFreeSpaceDirective(t *testing.T) {
	for _, tc := range []struct {
		arg  string
		want uint64
	}{
		{"0", 0},
		{"512M", 512 << 20},
		{"2G", 2 << 30},
		{"1G 512M", 1<<30 + 512<<20},
		{"4096B", 4096},
	} {
		q, err := configureFromText(t, "target dummy\nmin_free_space "+tc.arg)
		if err != nil {
			t.Fatalf("min_free_space %s: %v", tc.arg, err)
		}
		if q.cfg.minFreeSpace != tc.want {
			t.Errorf("min_free_space %s = %d, want %d", tc.arg, q.cfg.minFreeSpace, tc.want)
		}
	}
}
