package schedule

import (
	"context"
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

// runScheduler starts Run and returns the channel of dispatched IDs.
func runScheduler(t *testing.T, s *Scheduler, parallel int, fn func(store.ID)) context.CancelFunc {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Run(ctx, parallel, func(id store.ID, _ func()) { fn(id) })
		close(done)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return cancel
}

func TestDispatchOrderAndTiming(t *testing.T) {
	clock := NewFakeClock(t0)
	s := New(clock)
	got := make(chan store.ID, 10)
	s.Add(3, t0.Add(3*time.Minute))
	s.Add(1, t0.Add(time.Minute))
	s.Add(2, t0.Add(2*time.Minute))
	s.Add(4, t0.Add(time.Minute)) // same time as 1: ID order
	runScheduler(t, s, 1, func(id store.ID) { got <- id; s.Finish(id, false, time.Time{}) })

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
	if s.Len() != 0 {
		t.Fatalf("Len = %d", s.Len())
	}
}

func TestAddEarlierWakesScheduler(t *testing.T) {
	clock := NewFakeClock(t0)
	s := New(clock)
	got := make(chan store.ID, 1)
	s.Add(1, t0.Add(time.Hour))
	runScheduler(t, s, 1, func(id store.ID) { got <- id; s.Finish(id, false, time.Time{}) })
	clock.WaitTimers(1)
	s.Add(2, t0) // due now
	if id := <-got; id != 2 {
		t.Fatalf("dispatched %v", id)
	}
}

func TestParallelismBound(t *testing.T) {
	clock := NewFakeClock(t0)
	s := New(clock)
	const n, parallel = 200, 7
	for i := 1; i <= n; i++ {
		s.Add(store.ID(i), t0)
	}
	var cur, max, total atomic.Int64
	release := make(chan struct{})
	entered := make(chan struct{}, n)
	var wg sync.WaitGroup
	wg.Add(n)
	runScheduler(t, s, parallel, func(id store.ID) {
		c := cur.Add(1)
		for {
			m := max.Load()
			if c <= m || max.CompareAndSwap(m, c) {
				break
			}
		}
		entered <- struct{}{}
		<-release
		cur.Add(-1)
		total.Add(1)
		s.Finish(id, false, time.Time{})
		wg.Done()
	})
	for i := 0; i < parallel; i++ {
		<-entered
	}
	if s.Len() != n-parallel {
		t.Fatalf("%d left in the heap with %d workers busy", s.Len(), parallel)
	}
	close(release)
	wg.Wait()
	if max.Load() > parallel {
		t.Fatalf("%d attempts at once, limit %d", max.Load(), parallel)
	}
	if total.Load() != n {
		t.Fatalf("%d dispatched", total.Load())
	}
}

func TestRemoveWhileInFlightRecordsRequest(t *testing.T) {
	clock := NewFakeClock(t0)
	s := New(clock)
	s.Add(1, t0)
	s.Add(2, t0.Add(time.Hour))
	started := make(chan struct{})
	finish := make(chan Request)
	runScheduler(t, s, 1, func(id store.ID) {
		if id != 1 {
			return
		}
		close(started)
		<-finish
		first := s.Finish(id, true, t0.Add(time.Minute))
		// The worker applies the request, still owning the message, and
		// finishes again.
		if st, _ := s.State(id); st != InFlight {
			t.Errorf("message left flight while its request was applied: %v", st)
		}
		finish <- first
		finish <- s.Finish(id, true, t0.Add(2*time.Minute))
	})
	<-started
	if st, _ := s.Remove(1, 1); st != InFlight {
		t.Fatalf("Remove in flight = %v", st)
	}
	if st, _ := s.Remove(1, 2); st != InFlight {
		t.Fatalf("second Remove = %v", st)
	}
	if st, _ := s.Remove(1, 0); st != InFlight {
		t.Fatalf("Remove without a request = %v", st)
	}
	if s.Add(1, t0) {
		t.Fatal("Add succeeded for an in-flight message")
	}
	finish <- 0
	if req := <-finish; req != 2 {
		t.Fatalf("Finish returned %v, want the latest request 2", req)
	}
	if req := <-finish; req != 0 {
		t.Fatalf("second Finish returned %v", req)
	}
	if st, due := s.State(1); st != Scheduled || !due.Equal(t0.Add(2*time.Minute)) {
		t.Fatalf("after the last Finish: %v %v", st, due)
	}
	if st, due := s.Remove(2, 0); st != Scheduled || !due.Equal(t0.Add(time.Hour)) {
		t.Fatalf("Remove scheduled = %v %v", st, due)
	}
	if st, _ := s.Remove(2, 0); st != Unknown {
		t.Fatalf("Remove twice = %v", st)
	}
}

func TestFinishReschedules(t *testing.T) {
	s := New(NewFakeClock(t0))
	s.inflight[5] = 0
	if req := s.Finish(5, true, t0.Add(time.Hour)); req != 0 {
		t.Fatal(req)
	}
	if st, due := s.State(5); st != Scheduled || !due.Equal(t0.Add(time.Hour)) {
		t.Fatalf("State = %v %v", st, due)
	}
}

func TestDeliveredFreesSlotWithinSaveBound(t *testing.T) {
	clock := NewFakeClock(t0)
	s := New(clock)
	const n = 20
	for i := 1; i <= n; i++ {
		s.Add(store.ID(i), t0)
	}
	var mu sync.Mutex
	delivering, saving, maxDelivering, maxSaving := 0, 0, 0, 0
	release := make(chan struct{})
	started := make(chan store.ID, n)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Run(ctx, 2, func(id store.ID, delivered func()) {
			mu.Lock()
			delivering++
			maxDelivering = max(maxDelivering, delivering)
			mu.Unlock()
			started <- id
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
			s.Finish(id, false, time.Time{})
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
