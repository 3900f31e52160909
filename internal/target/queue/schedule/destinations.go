package schedule

import (
	"sort"
	"sync"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Decision is what the dispatcher does with a claimed message, as its
// destination's state allows.
type Decision uint8

const (
	// Attempt: deliver it; it counts against its destination's limit.
	Attempt Decision = iota + 1
	// Probe: deliver it as the one probe of a suspended destination.
	Probe
	// Postpone: its destination is suspended; do not deliver, count no
	// try, only keep its deadline and delay reports (see fate.Postpone).
	Postpone
	// Release: its destination has no room (a claim took more of it than
	// its limit allows); give the message back unchanged.
	Release
)

// Outcome is what an attempt says about its destination.
type Outcome uint8

const (
	// Neutral: nothing learned (a cancelled attempt, or only
	// recipient-level temporary failures such as a full mailbox).
	Neutral Outcome = iota
	// Answered: the destination delivered or refused for good: it works.
	Answered
	// Failed: nothing delivered and every recipient failed temporarily
	// for a reason of the destination (a refused connection, a timeout,
	// a deferral of the whole transaction).
	Failed
)

// DestinationRules configure Destinations.
type DestinationRules struct {
	// Limit is how many attempts a destination may have in flight on
	// this node.
	Limit int
	// DeadAfter is how many failed attempts in a row suspend a
	// destination (0: never).
	DeadAfter int
	// BackoffMin is the first suspension, doubled after each failed
	// probe up to BackoffMax.
	BackoffMin, BackoffMax time.Duration
}

// Destinations keeps, per destination, the attempts in flight on this
// node and whether it is suspended as dead, and decides with it what the
// dispatcher does with each claimed message. Its state is this node's: in
// a cluster each node counts and suspends on its own experience.
//
// The rules, each in one place here:
//   - at most Limit attempts of a destination are in flight; claims leave
//     out destinations at their limit, so their messages stay in the store
//     (holding no worker, counting no try) and others' mail goes first;
//   - after DeadAfter failed attempts in a row the destination is
//     suspended for BackoffMin: its messages that come due are postponed,
//     not attempted;
//   - when the suspension ends, one probe attempt is made; if it fails the
//     suspension is doubled (up to BackoffMax), if it works the
//     destination is healthy again and every message waiting for it is
//     released at once (Done's result tells the caller to).
type Destinations struct {
	rules DestinationRules
	now   func() time.Time

	mu       sync.Mutex
	inflight map[string]int
	state    map[string]*destState
	// freed receives a value when an attempt ends, so a dispatcher
	// waiting for room asks again.
	freed chan struct{}
}

type destState struct {
	failures int
	// suspended from since until until (zero: not suspended), for the
	// reason of its last failed attempt.
	since, until time.Time
	backoff      time.Duration
	reason       *store.SMTPStatus
	probing      bool
}

// NewDestinations returns an empty tracker reading time from now.
func NewDestinations(rules DestinationRules, now func() time.Time) *Destinations {
	if rules.Limit < 1 {
		rules.Limit = 1
	}
	return &Destinations{rules: rules, now: now, inflight: map[string]int{}, state: map[string]*destState{},
		freed: make(chan struct{}, 1)}
}

// Skip returns the destinations a claim must leave out now: those at
// their limit, and suspended ones whose probe is in flight.
func (d *Destinations) Skip() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for dest, n := range d.inflight {
		if n >= d.rules.Limit {
			out = append(out, dest)
		}
	}
	for dest, st := range d.state {
		if st.probing && d.inflight[dest] < d.rules.Limit {
			out = append(out, dest)
		}
	}
	return out
}

// Admit decides what to do with a claimed message of dest, and counts an
// attempt (or probe) in flight.
func (d *Destinations) Admit(dest string) Decision {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.state[dest]
	switch {
	case st != nil && st.probing:
		return Release
	case st != nil && !st.until.IsZero() && d.now().Before(st.until):
		return Postpone
	case st != nil && !st.until.IsZero():
		st.probing = true
		d.inflight[dest]++
		return Probe
	case d.inflight[dest] >= d.rules.Limit:
		return Release
	}
	d.inflight[dest]++
	return Attempt
}

// Probes returns up to max suspended destinations whose probe is due
// now, and marks their probes in flight: the dispatcher claims one message
// of each (ClaimNext), and the attempt calls Done; Unprobed if there was
// none.
func (d *Destinations) Probes(max int) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	var due []string
	for dest, st := range d.state {
		if !st.until.IsZero() && !st.probing && !now.Before(st.until) {
			due = append(due, dest)
		}
	}
	sort.Strings(due)
	if len(due) > max {
		due = due[:max]
	}
	for _, dest := range due {
		d.state[dest].probing = true
		d.inflight[dest]++
	}
	return due
}

// Unprobed ends a probe that found no message to send: nothing waits for
// the destination any more, so it is no longer suspended.
func (d *Destinations) Unprobed(dest string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.endLocked(dest)
	delete(d.state, dest)
}

// NextProbe returns when the earliest suspension ends.
func (d *Destinations) NextProbe() (time.Time, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var next time.Time
	ok := false
	for _, st := range d.state {
		if !st.until.IsZero() && !st.probing && (!ok || st.until.Before(next)) {
			next, ok = st.until, true
		}
	}
	return next, ok
}

// Freed receives a value when an attempt ends.
func (d *Destinations) Freed() <-chan struct{} { return d.freed }

// Change is what the end of an attempt changed in its destination's state.
type Change uint8

const (
	// Unchanged: the destination stays as it was (suspended or not).
	Unchanged Change = iota
	// Suspended: the destination has just been suspended as dead.
	Suspended
	// Recovered: the destination has just come back from a suspension;
	// every message waiting for it should be made due now.
	Recovered
)

// Done records the end of an attempt (or probe) of dest admitted with
// decision, with what it says about the destination; reason is its
// failure, for the operators. It returns how the destination's state
// changed.
func (d *Destinations) Done(dest string, decision Decision, o Outcome, reason *store.SMTPStatus) (change Change) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if decision != Attempt && decision != Probe {
		return Unchanged
	}
	d.endLocked(dest)
	st := d.state[dest]
	switch o {
	case Answered:
		if st != nil && !st.until.IsZero() {
			change = Recovered
		}
		delete(d.state, dest)
	case Failed:
		if st == nil {
			st = &destState{}
			d.state[dest] = st
		}
		switch {
		case decision == Probe:
			st.probing = false
			st.backoff = min(2*st.backoff, d.rules.BackoffMax)
			st.until, st.reason = d.now().Add(st.backoff), reason
		case !st.until.IsZero():
			// An attempt that started before the suspension: nothing new.
		default:
			st.failures++
			if d.rules.DeadAfter > 0 && st.failures >= d.rules.DeadAfter {
				now := d.now()
				st.backoff = d.rules.BackoffMin
				st.since, st.until, st.reason = now, now.Add(st.backoff), reason
				change = Suspended
			}
		}
	default:
		if st != nil && decision == Probe {
			// A probe that told nothing is tried again at once.
			st.probing = false
		}
	}
	return change
}

// endLocked counts one attempt of dest less in flight; d.mu is held.
func (d *Destinations) endLocked(dest string) {
	if d.inflight[dest] <= 1 {
		delete(d.inflight, dest)
	} else {
		d.inflight[dest]--
	}
	if st := d.state[dest]; st != nil && st.probing && d.inflight[dest] == 0 {
		st.probing = false
	}
	select {
	case d.freed <- struct{}{}:
	default:
	}
}

// IsSuspended reports whether dest is suspended as dead.
func (d *Destinations) IsSuspended(dest string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.state[dest]
	return st != nil && !st.until.IsZero()
}

// Reason returns why dest is suspended (nil if it is not).
func (d *Destinations) Reason(dest string) *store.SMTPStatus {
	d.mu.Lock()
	defer d.mu.Unlock()
	if st := d.state[dest]; st != nil && !st.until.IsZero() {
		return st.reason
	}
	return nil
}

// Lift ends the suspension of dest (an operator asked to retry it); true
// if it was suspended.
func (d *Destinations) Lift(dest string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.state[dest]
	if st == nil || st.until.IsZero() {
		return false
	}
	if st.probing {
		// Its probe decides; meanwhile it stays as it is.
		return true
	}
	delete(d.state, dest)
	return true
}

// Suspension describes a suspended destination.
type Suspension struct {
	Destination string
	Since       time.Time
	// NextProbe is when the next probe is sent (zero while one is in
	// flight).
	NextProbe time.Time
	Reason    *store.SMTPStatus
}

// Suspended lists the suspended destinations, by destination.
func (d *Destinations) Suspended() []Suspension {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Suspension
	for dest, st := range d.state {
		if st.until.IsZero() {
			continue
		}
		s := Suspension{Destination: dest, Since: st.since, NextProbe: st.until, Reason: st.reason}
		if st.probing {
			s.NextProbe = time.Time{}
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Destination < out[j].Destination })
	return out
}

// InFlight returns the attempts in flight per destination.
func (d *Destinations) InFlight() map[string]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]int, len(d.inflight))
	for k, v := range d.inflight {
		out[k] = v
	}
	return out
}
