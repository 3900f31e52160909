// Package schedule decides when queued messages are attempted: the retry
// policy, and a scheduler that hands due messages to a bounded number of
// workers.
package schedule

import (
	"container/heap"
	"context"
	"sync"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Request is an operator's request about a message, recorded while the
// message is being attempted and handed back when the attempt ends. Its
// meaning belongs to the caller.
type Request uint8

// State is where a message stands in the scheduler.
type State uint8

const (
	// Unknown: not scheduled and not in flight (held, or not queued).
	Unknown State = iota
	// Scheduled: waiting for its due time.
	Scheduled
	// InFlight: handed to a worker, whose attempt has not finished.
	InFlight
)

type entry struct {
	due   int64 // Unix nanoseconds
	id    store.ID
	index int
}

type entryHeap []*entry

func (h entryHeap) Len() int { return len(h) }
func (h entryHeap) Less(i, j int) bool {
	if h[i].due != h[j].due {
		return h[i].due < h[j].due
	}
	return h[i].id < h[j].id
}
func (h entryHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *entryHeap) Push(x interface{}) {
	e := x.(*entry)
	e.index = len(*h)
	*h = append(*h, e)
}
func (h *entryHeap) Pop() interface{} {
	old := *h
	e := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return e
}

// Scheduler keeps the due times of queued messages in a heap (O(log n) per
// change, independent of queue size) and dispatches due messages.
type Scheduler struct {
	clock Clock

	mu       sync.Mutex
	heap     entryHeap
	index    map[store.ID]*entry
	inflight map[store.ID]Request
	wake     chan struct{}
}

// New returns an empty scheduler.
func New(clock Clock) *Scheduler {
	return &Scheduler{
		clock:    clock,
		index:    make(map[store.ID]*entry),
		inflight: make(map[store.ID]Request),
		wake:     make(chan struct{}, 1),
	}
}

// Add schedules id at due, or moves it there if already scheduled. A
// message in flight is not scheduled again; Add returns false for it.
func (s *Scheduler) Add(id store.ID, due time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.inflight[id]; ok {
		return false
	}
	s.addLocked(id, due)
	return true
}

func (s *Scheduler) addLocked(id store.ID, due time.Time) {
	d := due.UnixNano()
	if e, ok := s.index[id]; ok {
		e.due = d
		heap.Fix(&s.heap, e.index)
	} else {
		e := &entry{due: d, id: id}
		heap.Push(&s.heap, e)
		s.index[id] = e
	}
	if s.heap[0].id == id {
		s.kick()
	}
}

func (s *Scheduler) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Remove unschedules id and returns where it stood and, if it was
// scheduled, its due time. Once Remove has returned Scheduled, the caller
// owns the message: no worker will pick it up until the caller Adds it
// again. For a message in flight, a non-zero req is recorded (replacing an
// earlier one: the operator's latest request wins) and handed to the worker
// by Finish.
func (s *Scheduler) Remove(id store.ID, req Request) (State, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.inflight[id]; ok {
		if req != 0 {
			s.inflight[id] = req
		}
		return InFlight, time.Time{}
	}
	e, ok := s.index[id]
	if !ok {
		return Unknown, time.Time{}
	}
	heap.Remove(&s.heap, e.index)
	delete(s.index, id)
	return Scheduled, time.Unix(0, e.due)
}

// State returns where id stands and, if scheduled, its due time.
func (s *Scheduler) State(id store.ID) (State, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.inflight[id]; ok {
		return InFlight, time.Time{}
	}
	if e, ok := s.index[id]; ok {
		return Scheduled, time.Unix(0, e.due)
	}
	return Unknown, time.Time{}
}

// Len returns the number of scheduled messages (not counting in flight).
func (s *Scheduler) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.heap)
}

// InFlight returns the number of messages being attempted.
func (s *Scheduler) InFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.inflight)
}

// Finish ends the worker's hold on id. If a request was recorded meanwhile,
// Finish returns it and id stays in flight: the worker applies the request
// and calls Finish again, until no request is left. Otherwise id leaves
// the in-flight state and, if reschedule is true, is scheduled at due in
// the same step, so no operator can act on it in between.
func (s *Scheduler) Finish(id store.ID, reschedule bool, due time.Time) Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	if req := s.inflight[id]; req != 0 {
		s.inflight[id] = 0
		return req
	}
	delete(s.inflight, id)
	if reschedule {
		s.addLocked(id, due)
	}
	return 0
}

// SavesPerSlot bounds the attempts that have finished delivering and wait
// for their outcome to be saved, as a multiple of the delivery limit.
// Saves are group-committed: letting the next deliveries start while
// earlier outcomes wait for the disk makes batches larger, so one fsync
// covers many attempts. The bound keeps memory, and what a crash can
// repeat, proportional to the delivery limit.
const SavesPerSlot = 4

// Run dispatches due messages to fn, each in its own goroutine. At most
// parallel of them deliver at once: fn calls delivered when its delivery
// is over and only its bookkeeping (saving, DSNs) is left, which frees its
// slot for the next message; at most SavesPerSlot*parallel more may be in
// that state. A message is marked in flight before fn is called and stays
// so until fn calls Finish. Run returns when ctx is done and every fn it
// started has returned. fn must call Finish.
func (s *Scheduler) Run(ctx context.Context, parallel int, fn func(id store.ID, delivered func())) {
	deliveries := make(chan struct{}, parallel)
	saves := make(chan struct{}, SavesPerSlot*parallel)
	// A fixed set of workers, as many as messages can be in fn at once,
	// rather than a goroutine per message: their stacks, grown once by
	// decoding and delivering, are reused.
	work := make(chan store.ID)
	var wg sync.WaitGroup
	for i := 0; i < parallel+cap(saves); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range work {
				runOne(id, fn, deliveries, saves)
			}
		}()
	}
	defer wg.Wait()
	defer close(work)
	for {
		// Take a delivery slot first: due messages stay in the heap (where
		// operators can still act on them) until a slot is free.
		select {
		case deliveries <- struct{}{}:
		case <-ctx.Done():
			return
		}
		id, ok := s.next(ctx)
		if !ok {
			return
		}
		// A worker is always free here: fn runs at most parallel times
		// holding a delivery slot plus cap(saves) times holding a save.
		work <- id
	}
}

// runOne calls fn for one message holding a delivery slot, which fn trades
// for a save slot by calling delivered, and releases the slot it holds at
// the end.
func runOne(id store.ID, fn func(store.ID, func()), deliveries, saves chan struct{}) {
	saving := false
	delivered := func() {
		if saving {
			return
		}
		// Wait for room among the saves before giving the delivery slot
		// away: a slow disk slows dispatch down.
		saves <- struct{}{}
		saving = true
		<-deliveries
	}
	defer func() {
		if saving {
			<-saves
		} else {
			<-deliveries
		}
	}()
	fn(id, delivered)
}

// next waits until the earliest message is due, then pops it and marks it
// in flight.
func (s *Scheduler) next(ctx context.Context) (store.ID, bool) {
	for {
		s.mu.Lock()
		var wait time.Duration = -1
		if len(s.heap) > 0 {
			top := s.heap[0]
			wait = time.Duration(top.due - s.clock.Now().UnixNano())
			if wait <= 0 {
				heap.Pop(&s.heap)
				delete(s.index, top.id)
				s.inflight[top.id] = 0
				s.mu.Unlock()
				return top.id, true
			}
		}
		s.mu.Unlock()

		var timer Timer
		var fire <-chan time.Time
		if wait > 0 {
			timer = s.clock.NewTimer(wait)
			fire = timer.C()
		}
		select {
		case <-fire:
		case <-s.wake:
		case <-ctx.Done():
		}
		if timer != nil {
			timer.Stop()
		}
		if ctx.Err() != nil {
			return 0, false
		}
	}
}
