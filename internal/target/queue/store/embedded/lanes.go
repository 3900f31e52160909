package embedded

import (
	"container/heap"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// lanes holds the claimable messages by destination: each destination's
// messages in a heap of due times (a lane), and the lanes in a heap of
// their earliest due time. A claim that leaves out busy destinations then
// skips each of them once, however many of its messages are due, instead
// of stepping over every one of those messages.
type lanes struct {
	byDest map[string]*lane
	order  laneHeap
	where  map[store.ID]*lane
}

func newLanes() lanes {
	return lanes{byDest: map[string]*lane{}, where: map[store.ID]*lane{}}
}

// lane is one destination's claimable messages.
type lane struct {
	dest string
	due  dueHeap
	pos  int // in lanes.order
}

func (ls *lanes) len() int { return len(ls.where) }

// push makes id of dest claimable at due, or moves it there.
func (ls *lanes) push(id store.ID, dest string, due time.Time) {
	if l := ls.where[id]; l != nil && l.dest != dest {
		ls.remove(id)
	}
	l := ls.byDest[dest]
	isNew := l == nil
	if isNew {
		l = &lane{dest: dest, due: dueHeap{index: map[store.ID]*dueEntry{}}}
		ls.byDest[dest] = l
	}
	l.due.push(id, due)
	ls.where[id] = l
	if isNew {
		heap.Push(&ls.order, l) // only once it has an entry to order by
	} else {
		heap.Fix(&ls.order, l.pos)
	}
}

// remove makes id not claimable and returns the time it was due at
// (zero if it was not in the lanes).
func (ls *lanes) remove(id store.ID) time.Time {
	l := ls.where[id]
	if l == nil {
		return time.Time{}
	}
	due := l.due.index[id].due
	delete(ls.where, id)
	l.due.remove(id)
	ls.settle(l)
	return due
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
	for len(out) < max && ls.order.Len() > 0 {
		l := ls.order[0]
		if l.due.top().due.After(now) {
			break
		}
		if skip[l.dest] {
			skipped = append(skipped, heap.Pop(&ls.order).(*lane))
			continue
		}
		due := l.due.top().due
		id := l.due.pop()
		delete(ls.where, id)
		out = append(out, taken{id, due})
		ls.settle(l)
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
			return l.due.top().due, true
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
	due := l.due.top().due
	id := l.due.pop()
	delete(ls.where, id)
	ls.settle(l)
	return taken{id, due}, true
}

// makeDue moves every message of dest due later than now to now.
func (ls *lanes) makeDue(dest string, now time.Time) int {
	l := ls.byDest[dest]
	if l == nil {
		return 0
	}
	n := 0
	for _, e := range l.due.entries {
		if e.due.After(now) {
			e.due = now
			n++
		}
	}
	heap.Init(&l.due)
	heap.Fix(&ls.order, l.pos)
	return n
}

// laneHeap orders lanes by their earliest due time, then destination.
type laneHeap []*lane

func (h laneHeap) Len() int { return len(h) }
func (h laneHeap) Less(i, j int) bool {
	a, b := h[i].due.top(), h[j].due.top()
	if !a.due.Equal(b.due) {
		return a.due.Before(b.due)
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
