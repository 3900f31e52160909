package embedded

import (
	"fmt"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// TestLanes checks the claim order across destinations, skips, moves
// between destinations and due times, and due times past what
// nanoseconds since 1970 can hold.
func TestLanes(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC)
	far := time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC)
	ancient := time.Date(1500, 1, 1, 0, 0, 0, 0, time.UTC)
	ls := newLanes()
	ls.push(1, "a", t0.Add(2*time.Second))
	ls.push(2, "b", t0.Add(time.Second))
	ls.push(3, "a", far)
	ls.push(4, "b", ancient)
	ls.push(5, "c", t0)
	ls.push(5, "a", t0.Add(3*time.Second)) // moved to another destination
	ls.push(2, "b", t0.Add(4*time.Second)) // moved later
	if ls.len() != 5 {
		t.Fatalf("len %d, want 5", ls.len())
	}
	ids := func(ts []taken) string { return fmt.Sprint(ts) }
	if due, ok := ls.next(map[string]bool{"b": true}); !ok || !due.Equal(t0.Add(2*time.Second)) {
		t.Fatalf("next without b = %v, %v", due, ok)
	}
	got := ls.take(t0.Add(time.Hour), 10, map[string]bool{"a": true})
	if want := []store.ID{4, 2}; len(got) != 2 || got[0].id != want[0] || got[1].id != want[1] {
		t.Fatalf("take without a = %v, want IDs %v", ids(got), want)
	}
	if !got[1].due.Equal(t0.Add(4 * time.Second)) {
		t.Fatalf("due of 2 = %v", got[1].due)
	}
	if n := ls.makeDue("a", t0); n != 3 {
		t.Fatalf("makeDue moved %d, want 3", n)
	}
	got = ls.take(t0, 10, nil)
	if len(got) != 3 || got[0].id != 1 || got[1].id != 3 || got[2].id != 5 {
		t.Fatalf("take after makeDue = %v, want 1, 3, 5 (all due now, by ID)", ids(got))
	}
	ls.push(6, "a", far)
	ls.push(7, "a", t0)
	if due := ls.remove(6); !due.After(t0.AddDate(200, 0, 0)) {
		t.Fatalf("remove of a far due time returned %v", due)
	}
	if first, ok := ls.first("a"); !ok || first.id != 7 {
		t.Fatalf("first of a = %v, %v", first, ok)
	}
	if ls.len() != 0 || len(ls.byDest) != 0 || ls.order.Len() != 0 {
		t.Fatalf("left: %d entries, %d lanes", ls.len(), len(ls.byDest))
	}
}
