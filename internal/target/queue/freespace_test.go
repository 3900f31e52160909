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

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"0", 0, true},
		{"512", 512, true},
		{"64K", 64 << 10, true},
		{"100M", 100 << 20, true},
		{"100MB", 100 << 20, true},
		{"100MiB", 100 << 20, true},
		{"2g", 2 << 30, true},
		{"1T", 1 << 40, true},
		{"", 0, false},
		{"M", 0, false},
		{"-1M", 0, false},
		{"1.5G", 0, false},
		{"lots", 0, false},
		{"99999999999999T", 0, false},
	} {
		got, err := parseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}
