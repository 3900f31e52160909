package bench

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/buffer"
	"github.com/foxcpp/maddy/framework/config"
	"github.com/foxcpp/maddy/framework/module"
)

// NullModName is the module name of the in-memory nested target both
// queues deliver to. Its one inline argument names the instance, so the
// benchmark can find the object maddy's config code created:
//
//	target bench.null NAME
const NullModName = "bench.null"

// SentHeader carries the time (Unix nanoseconds) the driver started
// enqueueing a message; the null target turns it into a latency sample.
const SentHeader = "X-Bench-Sent"

var (
	nullMu      sync.Mutex
	nullTargets = map[string]*NullTarget{}
)

func init() {
	module.Register(NullModName, func(_, instName string, _, inlineArgs []string) (module.Module, error) {
		if len(inlineArgs) != 1 {
			return nil, fmt.Errorf("%s: want exactly one inline argument (the instance key)", NullModName)
		}
		key := inlineArgs[0]
		nullMu.Lock()
		defer nullMu.Unlock()
		t, ok := nullTargets[key]
		if !ok {
			return nil, fmt.Errorf("%s: no null target %q was prepared with NewNullTarget", NullModName, key)
		}
		return t, nil
	})
}

// NullTarget is a delivery target that reads each message fully and keeps
// nothing but counts: what is left is the cost of the queue in front of it.
// It records how many deliveries run at once and, for messages carrying
// SentHeader, the enqueue→delivery latency.
type NullTarget struct {
	key string

	delivered atomic.Int64
	inFlight  atomic.Int64
	maxFlight atomic.Int64

	mu        sync.Mutex
	latencies []time.Duration
	first     time.Time
	last      time.Time
	// waiters are woken whenever delivered reaches their count.
	waiters []waiter
	// ids counts deliveries per Message-ID once TrackIDs was called.
	ids map[string]int
}

type waiter struct {
	n  int64
	ch chan struct{}
}

// NewNullTarget creates a null target and makes it available to maddy's
// config as `bench.null KEY`. Release removes it again.
func NewNullTarget(key string) *NullTarget {
	t := &NullTarget{key: key}
	nullMu.Lock()
	nullTargets[key] = t
	nullMu.Unlock()
	return t
}

// Release forgets the target's key.
func (t *NullTarget) Release() {
	nullMu.Lock()
	delete(nullTargets, t.key)
	nullMu.Unlock()
}

func (t *NullTarget) Name() string           { return NullModName }
func (t *NullTarget) InstanceName() string   { return t.key }
func (t *NullTarget) Init(*config.Map) error { return nil }
func (t *NullTarget) Delivered() int64       { return t.delivered.Load() }
func (t *NullTarget) MaxInFlight() int64     { return t.maxFlight.Load() }
func (t *NullTarget) InFlight() int64        { return t.inFlight.Load() }
func (t *NullTarget) Start(ctx context.Context, meta *module.MsgMetadata, from string) (module.Delivery, error) {
	n := t.inFlight.Add(1)
	for {
		m := t.maxFlight.Load()
		if n <= m || t.maxFlight.CompareAndSwap(m, n) {
			break
		}
	}
	return &nullDelivery{t: t}, nil
}

// TrackIDs makes the target count deliveries per Message-ID from now on,
// for Duplicates. Call it before deliveries start.
func (t *NullTarget) TrackIDs() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ids == nil {
		t.ids = map[string]int{}
	}
}

// Duplicates is the number of deliveries of a Message-ID that had been
// delivered before (0 unless TrackIDs was called).
func (t *NullTarget) Duplicates() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	var n int64
	for _, c := range t.ids {
		n += int64(c - 1)
	}
	return n
}

// Latencies returns the latency samples recorded so far.
func (t *NullTarget) Latencies() []time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]time.Duration(nil), t.latencies...)
}

// Span returns the times of the first and the last delivery.
func (t *NullTarget) Span() (first, last time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.first, t.last
}

// WaitDelivered blocks until at least n messages were delivered or the
// timeout passes; it reports whether n was reached.
func (t *NullTarget) WaitDelivered(n int64, timeout time.Duration) bool {
	t.mu.Lock()
	if t.delivered.Load() >= n {
		t.mu.Unlock()
		return true
	}
	w := waiter{n: n, ch: make(chan struct{})}
	t.waiters = append(t.waiters, w)
	t.mu.Unlock()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-w.ch:
		return true
	case <-timer.C:
		return t.delivered.Load() >= n
	}
}

type nullDelivery struct {
	t      *NullTarget
	rcpts  int
	sent   time.Time
	msgID  string
	closed bool
}

func (d *nullDelivery) AddRcpt(context.Context, string, smtp.RcptOptions) error {
	d.rcpts++
	return nil
}

func (d *nullDelivery) Body(_ context.Context, h textproto.Header, body buffer.Buffer) error {
	if v := h.Get(SentHeader); v != "" {
		if ns, err := strconv.ParseInt(v, 10, 64); err == nil {
			d.sent = time.Unix(0, ns)
		}
	}
	d.msgID = h.Get("Message-ID")
	r, err := body.Open()
	if err != nil {
		return err
	}
	defer r.Close()
	_, err = io.Copy(io.Discard, r)
	return err
}

func (d *nullDelivery) Abort(context.Context) error {
	d.finish()
	return nil
}

func (d *nullDelivery) Commit(context.Context) error {
	now := time.Now()
	t := d.t
	t.mu.Lock()
	if !d.sent.IsZero() {
		t.latencies = append(t.latencies, now.Sub(d.sent))
	}
	if t.first.IsZero() {
		t.first = now
	}
	t.last = now
	if t.ids != nil {
		t.ids[d.msgID]++
	}
	n := t.delivered.Add(1)
	kept := t.waiters[:0]
	for _, w := range t.waiters {
		if n >= w.n {
			close(w.ch)
		} else {
			kept = append(kept, w)
		}
	}
	t.waiters = kept
	t.mu.Unlock()
	d.finish()
	return nil
}

func (d *nullDelivery) finish() {
	if !d.closed {
		d.closed = true
		d.t.inFlight.Add(-1)
	}
}
