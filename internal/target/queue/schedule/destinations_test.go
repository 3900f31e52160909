package schedule

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

var refused = &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 4, 1}, Message: "connection refused", Temporary: true}

func TestDestinationLimit(t *testing.T) {
	clock := NewFakeClock(t0)
	d := NewDestinations(DestinationRules{Limit: 2}, clock.Now)
	for i, want := range []Decision{Attempt, Attempt, Release} {
		if got := d.Admit("a.test"); got != want {
			t.Fatalf("admit %d: %v, want %v", i, got, want)
		}
	}
	if got := d.Admit("b.test"); got != Attempt {
		t.Fatalf("another destination: %v", got)
	}
	if skip := d.Skip(); !slices.Equal(skip, []string{"a.test"}) {
		t.Fatalf("Skip = %v", skip)
	}
	d.Done("a.test", Attempt, Answered, nil)
	select {
	case <-d.Freed():
	default:
		t.Fatal("no signal when an attempt ended")
	}
	if skip := d.Skip(); len(skip) != 0 {
		t.Fatalf("Skip after an attempt ended = %v", skip)
	}
	if got := d.Admit("a.test"); got != Attempt {
		t.Fatalf("admit with room again: %v", got)
	}
	if n := d.InFlight()["a.test"]; n != 2 {
		t.Fatalf("%d in flight", n)
	}
}

func TestDestinationSuspension(t *testing.T) {
	rules := DestinationRules{Limit: 5, DeadAfter: 3, BackoffMin: 10 * time.Second, BackoffMax: 30 * time.Second}
	for _, tc := range []struct {
		name          string
		outcomes      []Outcome
		wantSuspended bool
	}{
		{"three failures in a row", []Outcome{Failed, Failed, Failed}, true},
		{"an answer resets the count", []Outcome{Failed, Failed, Answered, Failed, Failed}, false},
		{"neutral outcomes do not count", []Outcome{Failed, Neutral, Failed, Neutral}, false},
		{"neutral outcomes do not reset", []Outcome{Failed, Neutral, Failed, Failed}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := NewFakeClock(t0)
			d := NewDestinations(rules, clock.Now)
			for _, o := range tc.outcomes {
				if dec := d.Admit("a.test"); dec != Attempt {
					t.Fatalf("admitted as %v", dec)
				}
				d.Done("a.test", Attempt, o, refused)
			}
			sus := d.Suspended()
			if got := len(sus) == 1; got != tc.wantSuspended {
				t.Fatalf("suspended: %+v", sus)
			}
			if tc.wantSuspended && (!sus[0].NextProbe.Equal(t0.Add(10*time.Second)) || sus[0].Reason != refused) {
				t.Fatalf("suspension %+v", sus[0])
			}
		})
	}
}

func TestDestinationProbes(t *testing.T) {
	rules := DestinationRules{Limit: 5, DeadAfter: 1, BackoffMin: 10 * time.Second, BackoffMax: 30 * time.Second}
	clock := NewFakeClock(t0)
	d := NewDestinations(rules, clock.Now)
	d.Admit("a.test")
	d.Admit("a.test") // in flight when the destination is suspended
	if got := d.Done("a.test", Attempt, Failed, refused); got != Suspended {
		t.Fatalf("the failure that reaches dead_destination_after: %v, want Suspended", got)
	}
	if got := d.Admit("a.test"); got != Postpone {
		t.Fatalf("a message of a suspended destination: %v, want Postpone", got)
	}
	if !d.IsSuspended("a.test") || d.IsSuspended("b.test") {
		t.Fatal("IsSuspended does not say a.test alone is suspended")
	}
	// The attempt that started before the suspension fails too: nothing
	// new, the suspension stays as it is.
	if got := d.Done("a.test", Attempt, Failed, refused); got != Unchanged {
		t.Fatalf("an attempt that started before the suspension: %v, want Unchanged", got)
	}
	if next, _ := d.NextProbe(); !next.Equal(t0.Add(10 * time.Second)) {
		t.Fatalf("NextProbe %v", next)
	}
	if p := d.Probes(10); len(p) != 0 {
		t.Fatalf("probes before the suspension ends: %v", p)
	}
	// Failed probes double the suspension, up to the maximum.
	for i, wantBackoff := range []time.Duration{20 * time.Second, 30 * time.Second, 30 * time.Second} {
		next, _ := d.NextProbe()
		clock.Advance(next.Sub(clock.Now()))
		if p := d.Probes(10); !slices.Equal(p, []string{"a.test"}) {
			t.Fatalf("round %d: probes %v", i, p)
		}
		if got := d.Admit("a.test"); got != Release {
			t.Fatalf("round %d: a second message while the probe is in flight: %v, want Release", i, got)
		}
		if skip := d.Skip(); !slices.Equal(skip, []string{"a.test"}) {
			t.Fatalf("round %d: Skip while probing = %v", i, skip)
		}
		if d.Done("a.test", Probe, Failed, refused) != Unchanged {
			t.Fatal("a failed probe recovered the destination")
		}
		if next, _ := d.NextProbe(); !next.Equal(clock.Now().Add(wantBackoff)) {
			t.Fatalf("round %d: next probe in %v, want %v", i, next.Sub(clock.Now()), wantBackoff)
		}
	}
	next, _ := d.NextProbe()
	clock.Advance(next.Sub(clock.Now()))
	d.Probes(10)
	if d.Done("a.test", Probe, Answered, nil) != Recovered {
		t.Fatal("a successful probe did not recover the destination")
	}
	if sus := d.Suspended(); len(sus) != 0 || d.IsSuspended("a.test") {
		t.Fatalf("still suspended: %+v", sus)
	}
	if got := d.Admit("a.test"); got != Attempt {
		t.Fatalf("after recovery: %v", got)
	}
}

func TestDestinationLiftAndUnprobed(t *testing.T) {
	rules := DestinationRules{Limit: 5, DeadAfter: 1, BackoffMin: time.Minute, BackoffMax: time.Hour}
	for _, tc := range []struct {
		name string
		end  func(d *Destinations, clock *FakeClock)
	}{
		{"lifted by an operator", func(d *Destinations, _ *FakeClock) {
			if !d.Lift("a.test") {
				panic("not suspended")
			}
		}},
		{"nothing left to probe", func(d *Destinations, clock *FakeClock) {
			clock.Advance(time.Minute)
			for _, dest := range d.Probes(10) {
				d.Unprobed(dest)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := NewFakeClock(t0)
			d := NewDestinations(rules, clock.Now)
			d.Admit("a.test")
			d.Done("a.test", Attempt, Failed, refused)
			tc.end(d, clock)
			if sus := d.Suspended(); len(sus) != 0 {
				t.Fatalf("still suspended: %+v", sus)
			}
			if got := d.Admit("a.test"); got != Attempt {
				t.Fatalf("admitted as %v", got)
			}
			if n := fmt.Sprint(d.InFlight()); n != "map[a.test:1]" {
				t.Fatalf("in flight %s", n)
			}
		})
	}
}
