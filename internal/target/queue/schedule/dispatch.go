// Package schedule decides when queued messages are attempted: the retry
// policy (policy.go), and the dispatcher that claims due messages from the
// store and runs them with a bounded number of workers.
package schedule

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Source is where the dispatcher finds work: a store.Backend.
type Source interface {
	Claim(ctx context.Context, max int, skip []string) ([]store.Claim, error)
	ClaimNext(ctx context.Context, destination string) (store.Claim, error)
	NextDue(ctx context.Context, skip []string) (time.Time, bool, error)
	Wake() <-chan struct{}
}

// SavesPerSlot bounds the attempts that have finished delivering and wait
// for their outcome to be saved, as a multiple of the delivery limit.
// Saves are group-committed: letting the next deliveries start while
// earlier outcomes wait for the disk makes batches larger, so one fsync
// covers many attempts. The bound keeps memory, and what a crash can
// repeat, proportional to the delivery limit.
const SavesPerSlot = 4

// ErrorBackoff is how long the dispatcher waits after the store failed to
// answer a claim (e.g. its database is down) before asking again.
const ErrorBackoff = time.Second

// Dispatcher claims due messages and runs fn for each, with the decision
// Destinations made for it (fn must call Destinations.Done for Attempt and
// Probe). At most Parallel of them deliver at once: fn calls delivered
// when its delivery is over and only its bookkeeping (reports, saving) is
// left, which frees the slot for the next message; at most
// SavesPerSlot*Parallel more may be in that state. Claims take as many
// messages as there are free slots, in one store call, leaving out the
// destinations that have no room.
type Dispatcher struct {
	Clock        Clock
	Source       Source
	Parallel     int
	Destinations *Destinations
	// OnError is told about a failed claim.
	OnError func(error)
}

type job struct {
	c store.Claim
	d Decision
}

// Run dispatches until ctx is done and every fn it started has returned.
func (d *Dispatcher) Run(ctx context.Context, fn func(c store.Claim, dec Decision, delivered func())) {
	deliveries := make(chan struct{}, d.Parallel)
	saves := make(chan struct{}, SavesPerSlot*d.Parallel)
	// A fixed set of workers, as many as claims can be in fn at once,
	// rather than a goroutine per message: their stacks, grown once by
	// decoding and delivering, are reused.
	work := make(chan job)
	var wg sync.WaitGroup
	for i := 0; i < d.Parallel+cap(saves); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				runOne(j, fn, deliveries, saves)
			}
		}()
	}
	defer wg.Wait()
	defer close(work)
	for {
		// Take a delivery slot first, then every other free one: due
		// messages stay in the store (where any node, and operators, can
		// still take them) until a slot is free for them.
		select {
		case deliveries <- struct{}{}:
		case <-ctx.Done():
			return
		}
		free := 1
	more:
		for free < d.Parallel {
			select {
			case deliveries <- struct{}{}:
				free++
			default:
				break more
			}
		}
		// A worker is always free for a job: fn runs at most Parallel
		// times holding a delivery slot plus cap(saves) times holding a
		// save.
		sent := 0
		for _, dest := range d.Destinations.Probes(free) {
			c, err := d.Source.ClaimNext(ctx, dest)
			switch {
			case errors.Is(err, store.ErrNotFound):
				d.Destinations.Unprobed(dest)
			case err != nil:
				d.Destinations.Done(dest, Probe, Neutral, nil)
				d.onError(err)
			default:
				work <- job{c, Probe}
				sent++
			}
		}
		var claims []store.Claim
		var err error
		if sent < free {
			claims, err = d.Source.Claim(ctx, free-sent, d.Destinations.Skip())
		}
		for _, c := range claims {
			work <- job{c, d.Destinations.Admit(c.Message.Destination)}
		}
		sent += len(claims)
		for range free - sent {
			<-deliveries
		}
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			d.onError(err)
			d.sleep(ctx, ErrorBackoff, nil)
		case sent < free:
			// The store had nothing more for the free slots: claiming
			// again at once would find nothing. Wait until it has.
			d.waitDue(ctx)
		}
	}
}

func (d *Dispatcher) onError(err error) {
	if d.OnError != nil {
		d.OnError(err)
	}
}

// waitDue waits until the store's next message (of a destination with
// room) is due or a suspended destination's probe is. A wake-up (the
// store says something may be due earlier, or an attempt ends and makes
// room) makes it ask the store again rather than claim: a claim is a
// write, and most wake-ups of a node sharing its store with others are
// for mail another node has claimed already; asking when the next
// message is due is a read.
func (d *Dispatcher) waitDue(ctx context.Context) {
	for ctx.Err() == nil {
		due, ok, err := d.Source.NextDue(ctx, d.Destinations.Skip())
		if err != nil {
			d.onError(err)
			due, ok = d.Clock.Now().Add(ErrorBackoff), true
		}
		if probe, pok := d.Destinations.NextProbe(); pok && (!ok || probe.Before(due)) {
			due, ok = probe, true
		}
		if ok && !due.After(d.Clock.Now()) {
			return
		}
		d.sleepUntil(ctx, due, ok, d.Source.Wake())
	}
}

func (d *Dispatcher) sleep(ctx context.Context, wait time.Duration, wake <-chan struct{}) {
	d.sleepUntil(ctx, d.Clock.Now().Add(wait), true, wake)
}

// sleepUntil waits until due (forever if !timed), a wake-up, or ctx. The
// time is read again once the timer is set, so a clock moved in between
// (tests) is not missed.
func (d *Dispatcher) sleepUntil(ctx context.Context, due time.Time, timed bool, wake <-chan struct{}) {
	var fire <-chan time.Time
	if timed {
		wait := due.Sub(d.Clock.Now())
		if wait <= 0 {
			return
		}
		t := d.Clock.NewTimer(wait)
		defer t.Stop()
		if !d.Clock.Now().Before(due) {
			return
		}
		fire = t.C()
	}
	select {
	case <-fire:
	case <-wake:
	case <-d.Destinations.Freed():
	case <-ctx.Done():
	}
}

// runOne calls fn for one job holding a delivery slot, which fn trades
// for a save slot by calling delivered, and releases the slot it holds at
// the end.
func runOne(j job, fn func(store.Claim, Decision, func()), deliveries, saves chan struct{}) {
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
	fn(j.c, j.d, delivered)
}
