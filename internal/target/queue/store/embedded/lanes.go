package embedded

import (
	"container/heap"
	"math"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// lanes holds the claimable messages by destination: each destination's
// messages in a heap of due times (a lane), and the lanes in a heap of
// their earliest due time. A claim that leaves out busy destinations then
// skips each of them once, however many of its messages are due, instead
// of stepping over every one of those messages.
//
// Every claimable message costs one index entry and one dueEntry (32
// bytes) here, the store's whole memory per queued message: the index
// finds both an entry and its lane, so no second map is needed.
type lanes struct {
	byDest map[string]*lane
	order  laneHeap
	index  map[store.ID]*dueEntry
}

func newLanes() lanes {
	return lanes{byDest: map[string]*lane{}, index: map[store.ID]*dueEntry{}}
}

// lane is one destination's claimable messages.
type lane struct {
	dest string
	due  dueHeap
	pos  int // in lanes.order
}

// dueEntry is one claimable message: due in nanoseconds since the Unix
// epoch (see dueNanos), at position pos of its lane's heap.
type dueEntry struct {
	due  int64
	id   store.ID
	pos  int
	lane *lane
}

// dueNanos is t as dueEntry keeps it. Times past what nanoseconds since
// 1970 can hold (years before 1678 or after 2262) are kept as the
// nearest end: they order the same against every real due time.
func dueNanos(t time.Time) int64 {
	switch {
	case t.Before(minDue):
		return math.MinInt64
	case t.After(maxDue):
		return math.MaxInt64
	}
	return t.UnixNano()
}

var minDue, maxDue = time.Unix(0, math.MinInt64), time.Unix(0, math.MaxInt64)

func (e *dueEntry) dueTime() time.Time { return time.Unix(0, e.due) }

func (ls *lanes) len() int { return len(ls.index) }

// push makes id of dest claimable at due, or moves it there.
func (ls *lanes) push(id store.ID, dest string, due time.Time) {
	if e := ls.index[id]; e != nil {
		if e.lane.dest == dest {
			e.due = dueNanos(due)
			heap.Fix(&e.lane.due, e.pos)
			heap.Fix(&ls.order, e.lane.pos)
			return
		}
		ls.remove(id)
	}
	l := ls.byDest[dest]
	isNew := l == nil
	if isNew {
		l = &lane{dest: dest}
		ls.byDest[dest] = l
	}
	e := &dueEntry{due: dueNanos(due), id: id, lane: l}
	heap.Push(&l.due, e)
	ls.index[id] = e
	if isNew {
		heap.Push(&ls.order, l) // only once it has an entry to order by
	} else {
		heap.Fix(&ls.order, l.pos)
	}
}

// remove makes id not claimable and returns the time it was due at
// (zero if it was not in the lanes).
func (ls *lanes) remove(id store.ID) time.Time {
	e := ls.index[id]
	if e == nil {
		return time.Time{}
	}
	delete(ls.index, id)
	heap.Remove(&e.lane.due, e.pos)
	ls.settle(e.lane)
	return e.dueTime()
}

// pop takes the message of l due first out of the lanes.
func (ls *lanes) pop(l *lane) taken {
	e := heap.Pop(&l.due).(*dueEntry)
	delete(ls.index, e.id)
	ls.settle(l)
	return taken{e.id, e.dueTime()}
}

// settle puts l back in order after its heap changed, or drops it empty.
func (ls *lanes) settle(l *lane) {
	if l.due.Len() == 0 {
		heap.Remove(&ls.order, l.pos)
		delete(ls.byDest, l.dest)
		return
	}
	heap.Fix(&ls.order, l.pos)
}

// taken is a message taken out of the lanes, with the time it was due.
type taken struct {
	id  store.ID
	due time.Time
}

// take pops up to max messages due at now, earliest first, from the
// lanes not in skip.
func (ls *lanes) take(now time.Time, max int, skip map[string]bool) []taken {
	var out []taken
	var skipped []*lane
	nowN := dueNanos(now)
	for len(out) < max && ls.order.Len() > 0 {
		l := ls.order[0]
		if l.due.top().due > nowN {
			break
		}
		if skip[l.dest] {
			skipped = append(skipped, heap.Pop(&ls.order).(*lane))
			continue
		}
		out = append(out, ls.pop(l))
	}
	for _, l := range skipped {
		heap.Push(&ls.order, l)
	}
	return out
}

// next returns the earliest due time of the lanes not in skip.
func (ls *lanes) next(skip map[string]bool) (time.Time, bool) {
	var skipped []*lane
	defer func() {
		for _, l := range skipped {
			heap.Push(&ls.order, l)
		}
	}()
	for ls.order.Len() > 0 {
		l := ls.order[0]
		if !skip[l.dest] {
			return l.due.top().dueTime(), true
		}
		skipped = append(skipped, heap.Pop(&ls.order).(*lane))
	}
	return time.Time{}, false
}

// first pops the message of dest that is due first, whatever its time.
func (ls *lanes) first(dest string) (taken, bool) {
	l := ls.byDest[dest]
	if l == nil {
		return taken{}, false
	}
	return ls.pop(l), true
}

// makeDue moves every message of dest due later than now to now.
func (ls *lanes) makeDue(dest string, now time.Time) int {
	l := ls.byDest[dest]
	if l == nil {
		return 0
	}
	nowN := dueNanos(now)
	n := 0
	for _, e := range l.due {
		if e.due > nowN {
			e.due = nowN
			n++
		}
	}
	heap.Init(&l.due)
	heap.Fix(&ls.order, l.pos)
	return n
}

// dueHeap orders a lane's messages by due time, then ID.
type dueHeap []*dueEntry

func (h dueHeap) Len() int { return len(h) }
func (h dueHeap) Less(i, j int) bool {
	a, b := h[i], h[j]
	if a.due != b.due {
		return a.due < b.due
	}
	return a.id < b.id
}
func (h dueHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].pos, h[j].pos = i, j
}
func (h *dueHeap) Push(x any) {
	e := x.(*dueEntry)
	e.pos = len(*h)
	*h = append(*h, e)
}
func (h *dueHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return e
}

func (h dueHeap) top() *dueEntry { return h[0] }

// laneHeap orders lanes by their earliest due time, then ID.
type laneHeap []*lane

func (h laneHeap) Len() int { return len(h) }
func (h laneHeap) Less(i, j int) bool {
	a, b := h[i].due.top(), h[j].due.top()
	if a.due != b.due {
		return a.due < b.due
	}
	return a.id < b.id
}
func (h laneHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].pos, h[j].pos = i, j
}
func (h *laneHeap) Push(x any) {
	l := x.(*lane)
	l.pos = len(*h)
	*h = append(*h, l)
}
func (h *laneHeap) Pop() any {
	old := *h
	l := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return l
}
