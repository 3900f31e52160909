package schedule

import (
	"context"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

var t0 = time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)

func TestPolicyAfterFailure(t *testing.T) {
	p := Policy{Delays: []time.Duration{5 * time.Minute, 30 * time.Minute, time.Hour}, Jitter: 0.1, MaxTries: 5, MaxAge: 6 * time.Hour}
	for _, tc := range []struct {
		name    string
		tries   int
		elapsed time.Duration // since arrival
		rnd     float64
		giveUp  bool
		next    time.Duration // after now
	}{
		{"first failure, no jitter", 1, 0, 0.5, false, 5 * time.Minute},
		{"first failure, low jitter", 1, 0, 0, false, 4*time.Minute + 30*time.Second},
		{"first failure, high jitter", 1, 0, 0.999999999, false, 5*time.Minute + 30*time.Second},
		{"second failure", 2, 10 * time.Minute, 0.5, false, 30 * time.Minute},
		{"last delay repeats", 4, time.Hour, 0.5, false, time.Hour},
		{"max tries reached", 5, time.Hour, 0.5, true, 0},
		{"max age reached", 2, 6 * time.Hour, 0.5, true, 0},
		{"clamped to deadline", 3, 5*time.Hour + 30*time.Minute, 0.5, false, 30 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now := t0.Add(tc.elapsed)
			r := p.AfterFailure(tc.tries, t0, now, tc.rnd)
			if r.GiveUp != tc.giveUp {
				t.Fatalf("GiveUp = %v, want %v", r.GiveUp, tc.giveUp)
			}
			if !tc.giveUp {
				if got := r.At.Sub(now); got < tc.next-time.Millisecond || got > tc.next+time.Millisecond {
					t.Fatalf("next in %v, want %v", got, tc.next)
				}
			}
		})
	}
}

func TestDefaultPolicyFollowsRFC5321(t *testing.T) {
	p := DefaultPolicy()
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	if d := p.Delay(1, 0); d < 4*time.Minute {
		t.Errorf("first retry after %v", d)
	}
	for n := 2; n < 30; n++ {
		if d := p.Delay(n, 0); d < 27*time.Minute { // 30 min minus jitter
			t.Errorf("retry %d after %v, RFC 5321 wants >= 30 min", n, d)
		}
	}
}

func TestExponential(t *testing.T) {
	got, err := Exponential(time.Minute, 2, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	want := []time.Duration{time.Minute, 2 * time.Minute, 4 * time.Minute, 8 * time.Minute, 10 * time.Minute}
	if len(got) != len(want) {
		t.Fatalf("%v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("%v", got)
		}
	}
	for _, bad := range [][3]float64{{0, 2, 10}, {5, 2, 1}, {1, 0.5, 10}} {
		if _, err := Exponential(time.Duration(bad[0])*time.Minute, bad[1], time.Duration(bad[2])*time.Minute); err == nil {
			t.Errorf("Exponential%v accepted", bad)
		}
	}
}

func TestPolicyValidate(t *testing.T) {
	good := DefaultPolicy()
	for name, mut := range map[string]func(*Policy){
		"empty":       func(p *Policy) { p.Delays = nil },
		"zero delay":  func(p *Policy) { p.Delays = []time.Duration{0} },
		"jitter 1":    func(p *Policy) { p.Jitter = 1 },
		"neg jitter":  func(p *Policy) { p.Jitter = -0.1 },
		"zero tries":  func(p *Policy) { p.MaxTries = 0 },
		"zero maxage": func(p *Policy) { p.MaxAge = 0 },
	} {
		p := good
		mut(&p)
		if p.Validate() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// fakeSource is an in-memory store for the dispatcher: messages due at
// a time, claimed once.
type fakeSource struct {
	clock *FakeClock
	mu    sync.Mutex
	due   map[store.ID]time.Time
	wake  chan struct{}
	// claims counts Claim calls; maxAsked is the largest max asked for.
	claims, maxAsked int
	// asked receives a value at each NextDue call.
	asked chan struct{}
}

func newFakeSource(clock *FakeClock) *fakeSource {
	return &fakeSource{clock: clock, due: map[store.ID]time.Time{}, wake: make(chan struct{}, 1), asked: make(chan struct{}, 100)}
}

func (s *fakeSource) add(id store.ID, due time.Time) {
	s.mu.Lock()
	s.due[id] = due
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *fakeSource) ClaimNext(ctx context.Context, dest string) (store.Claim, error) {
	return store.Claim{}, store.ErrNotFound
}

func (s *fakeSource) Claim(ctx context.Context, n int, skip []string) ([]store.Claim, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.claims++
	s.maxAsked = max(s.maxAsked, n)
	now := s.clock.Now()
	var ids []store.ID
	for id, due := range s.due {
		if !due.After(now) {
			ids = append(ids, id)
		}
	}
	sort.Slice(ids, func(i, j int) bool {
		a, b := s.due[ids[i]], s.due[ids[j]]
		if !a.Equal(b) {
			return a.Before(b)
		}
		return ids[i] < ids[j]
	})
	if len(ids) > n {
		ids = ids[:n]
	}
	out := make([]store.Claim, len(ids))
	for i, id := range ids {
		delete(s.due, id)
		out[i] = store.Claim{Lease: &store.Lease{ID: id}, Message: &store.Message{ID: id}}
	}
	return out, nil
}

func (s *fakeSource) NextDue(ctx context.Context, skip []string) (time.Time, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case s.asked <- struct{}{}:
	default:
	}
	var next time.Time
	ok := false
	for _, due := range s.due {
		if !ok || due.Before(next) {
			next, ok = due, true
		}
	}
	return next, ok, nil
}

func (s *fakeSource) Wake() <-chan struct{} { return s.wake }

func (s *fakeSource) claimCalls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.claims
}

func (s *fakeSource) left() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.due)
}

// newDispatcher returns a dispatcher on src with destination limits that
// never bind (every test message has the same destination).
func newDispatcher(clock *FakeClock, src Source, parallel int) *Dispatcher {
	dests := NewDestinations(DestinationRules{Limit: parallel}, clock.Now)
	return &Dispatcher{Clock: clock, Source: src, Parallel: parallel, Destinations: dests}
}

// runDispatcher starts a dispatcher on src and returns when the test ends.
// Every attempt is reported done to the destinations when fn returns.
func runDispatcher(t *testing.T, clock *FakeClock, src Source, parallel int, fn func(c store.Claim, delivered func())) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	d := newDispatcher(clock, src, parallel)
	go func() {
		d.Run(ctx, func(c store.Claim, dec Decision, delivered func()) {
			fn(c, delivered)
			d.Destinations.Done(c.Message.Destination, dec, Neutral, nil)
		})
		close(done)
	}()
	t.Cleanup(func() { cancel(); <-done })
}

func TestDispatchOrderAndTiming(t *testing.T) {
	clock := NewFakeClock(t0)
	src := newFakeSource(clock)
	got := make(chan store.ID, 10)
	src.add(3, t0.Add(3*time.Minute))
	src.add(1, t0.Add(time.Minute))
	src.add(2, t0.Add(2*time.Minute))
	src.add(4, t0.Add(time.Minute)) // same time as 1: ID order
	runDispatcher(t, clock, src, 1, func(c store.Claim, _ func()) { got <- c.Message.ID })

	clock.WaitTimers(1)
	select {
	case id := <-got:
		t.Fatalf("%v dispatched before due", id)
	default:
	}
	for _, step := range []struct {
		advance time.Duration
		want    []store.ID
	}{{time.Minute, []store.ID{1, 4}}, {time.Minute, []store.ID{2}}, {time.Minute, []store.ID{3}}} {
		clock.WaitTimers(1)
		clock.Advance(step.advance)
		for _, w := range step.want {
			if id := <-got; id != w {
				t.Fatalf("dispatched %v, want %v", id, w)
			}
		}
	}
	if n := src.left(); n != 0 {
		t.Fatalf("%d left", n)
	}
}

func TestWakeDispatchesEarlierMessage(t *testing.T) {
	clock := NewFakeClock(t0)
	src := newFakeSource(clock)
	got := make(chan store.ID, 1)
	src.add(1, t0.Add(time.Hour))
	runDispatcher(t, clock, src, 1, func(c store.Claim, _ func()) { got <- c.Message.ID })
	clock.WaitTimers(1)
	src.add(2, t0) // due now; the source wakes the dispatcher
	if id := <-got; id != 2 {
		t.Fatalf("dispatched %v", id)
	}
}

// TestWakeClaimsOnlyWhatIsDue: a claim that leaves slots free is not
// repeated at once, and a wake-up while nothing is due asks when the next
// message is due rather than claiming: in a cluster, most wake-ups are
// for mail another node has claimed already, and a claim is a write.
func TestWakeClaimsOnlyWhatIsDue(t *testing.T) {
	clock := NewFakeClock(t0)
	src := newFakeSource(clock)
	got := make(chan store.ID, 2)
	src.add(1, t0)
	src.add(2, t0.Add(time.Hour))
	runDispatcher(t, clock, src, 4, func(c store.Claim, _ func()) { got <- c.Message.ID })
	if id := <-got; id != 1 {
		t.Fatalf("dispatched %v", id)
	}
	clock.WaitTimers(1) // asleep until message 2 is due
	if n := src.claimCalls(); n != 1 {
		t.Fatalf("%d claims for one due message, want 1", n)
	}
	for i := 0; i < 5; i++ {
		for len(src.asked) > 0 {
			<-src.asked
		}
		src.wake <- struct{}{}
		<-src.asked // the wake-up asked the source again
		clock.WaitTimers(1)
	}
	if n := src.claimCalls(); n != 1 {
		t.Fatalf("%d claims after wake-ups with nothing due, want 1", n)
	}
	clock.Advance(time.Hour)
	if id := <-got; id != 2 {
		t.Fatalf("dispatched %v", id)
	}
	if n := src.claimCalls(); n != 2 {
		t.Fatalf("%d claims, want 2", n)
	}
}

// TestClaimsFillFreeSlots: one claim asks for every free slot, and no more
// than parallel attempts run at once.
func TestClaimsFillFreeSlots(t *testing.T) {
	clock := NewFakeClock(t0)
	src := newFakeSource(clock)
	const n, parallel = 200, 7
	for i := 1; i <= n; i++ {
		src.add(store.ID(i), t0)
	}
	var cur, maxCur, total atomic.Int64
	release := make(chan struct{})
	entered := make(chan struct{}, n)
	var wg sync.WaitGroup
	wg.Add(n)
	runDispatcher(t, clock, src, parallel, func(c store.Claim, _ func()) {
		c2 := cur.Add(1)
		for {
			m := maxCur.Load()
			if c2 <= m || maxCur.CompareAndSwap(m, c2) {
				break
			}
		}
		entered <- struct{}{}
		<-release
		cur.Add(-1)
		total.Add(1)
		wg.Done()
	})
	for i := 0; i < parallel; i++ {
		<-entered
	}
	if left := src.left(); left != n-parallel {
		t.Fatalf("%d left in the store with %d workers busy", left, parallel)
	}
	src.mu.Lock()
	if src.maxAsked != parallel {
		t.Errorf("the first claims asked for at most %d messages, want all %d free slots", src.maxAsked, parallel)
	}
	src.mu.Unlock()
	close(release)
	wg.Wait()
	if maxCur.Load() > parallel {
		t.Fatalf("%d attempts at once, limit %d", maxCur.Load(), parallel)
	}
	if total.Load() != n {
		t.Fatalf("%d dispatched", total.Load())
	}
}

func TestDeliveredFreesSlotWithinSaveBound(t *testing.T) {
	clock := NewFakeClock(t0)
	src := newFakeSource(clock)
	const n = 20
	for i := 1; i <= n; i++ {
		src.add(store.ID(i), t0)
	}
	var mu sync.Mutex
	delivering, saving, maxDelivering, maxSaving := 0, 0, 0, 0
	release := make(chan struct{})
	started := make(chan store.ID, n)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		d := newDispatcher(clock, src, 2)
		d.Run(ctx, func(c store.Claim, dec Decision, delivered func()) {
			defer d.Destinations.Done(c.Message.Destination, dec, Neutral, nil)
			mu.Lock()
			delivering++
			maxDelivering = max(maxDelivering, delivering)
			mu.Unlock()
			started <- c.Message.ID
			mu.Lock()
			delivering--
			saving++
			maxSaving = max(maxSaving, saving)
			mu.Unlock()
			delivered()
			delivered() // idempotent
			<-release   // the save waits for the disk
			mu.Lock()
			saving--
			mu.Unlock()
		})
		close(done)
	}()
	// With every save stuck, dispatch stops after the 2 delivery slots and
	// the 2*SavesPerSlot saves are taken.
	want := 2 + 2*SavesPerSlot
	for i := 0; i < want; i++ {
		<-started
	}
	select {
	case id := <-started:
		t.Fatalf("message %v dispatched beyond the save bound", id)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	for i := want; i < n; i++ {
		<-started
	}
	cancel()
	<-done
	if maxDelivering > 2 || maxSaving > 2*SavesPerSlot+2 {
		t.Fatalf("at most %d delivering and %d saving at once", maxDelivering, maxSaving)
	}
}
