package queue

import (
	"context"
	"sync"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// An attempt holds its message's lease from the claim until its outcome is
// saved. The lease is renewed while the attempt runs, so no other node
// takes the message over while this one still works on it (an SMTP
// transaction can take longer than a lease). If a renewal finds the lease
// lost (this node was cut off from a shared store for longer than a lease,
// and another node claimed the message), the attempt is cancelled: the
// other node delivers the message, and this node's save would be refused
// anyway.

// flightSet holds the leases of the attempts in flight on this node.
type flightSet struct {
	mu      sync.Mutex
	flights map[store.ID]flight
}

type flight struct {
	lease  *store.Lease
	cancel context.CancelFunc
}

func (s *flightSet) add(l *store.Lease, cancel context.CancelFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.flights == nil {
		s.flights = map[store.ID]flight{}
	}
	s.flights[l.ID] = flight{lease: l, cancel: cancel}
}

func (s *flightSet) remove(id store.ID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.flights, id)
}

func (s *flightSet) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.flights)
}

// leases returns copies of the leases in flight; Renew updates the copies,
// never a lease an attempt is writing with.
func (s *flightSet) leases() []*store.Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*store.Lease, 0, len(s.flights))
	for _, f := range s.flights {
		l := *f.lease
		out = append(out, &l)
	}
	return out
}

// cancelLost cancels the attempts whose leases were lost.
func (s *flightSet) cancelLost(lost []*store.Lease) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range lost {
		if f, ok := s.flights[l.ID]; ok && f.lease.Token == l.Token {
			f.cancel()
		}
	}
}

// renewLeases renews the leases in flight every third of a lease (in real
// time) until the queue stops.
func (q *Queue) renewLeases() {
	every := q.cfg.store.lease / 3
	if every <= 0 {
		every = time.Minute
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-q.stopping.Done():
			// Attempts may still be finishing; they save within a lease.
			return
		}
		leases := q.flights.leases()
		if len(leases) == 0 {
			continue
		}
		ctx, cancel := context.WithTimeout(q.stopping, every)
		lost, err := q.store.Renew(ctx, leases)
		cancel()
		if err != nil {
			metrics.StoreErrors.WithLabelValues(q.label(), metrics.StoreRenew).Inc()
			q.Log.Error("cannot renew the leases of attempts in flight, will retry", err, "leases", len(leases))
			continue
		}
		for _, l := range lost {
			q.Log.Msg("lease lost while attempting (another node took the message over); cancelling the attempt",
				"queue_id", l.ID.String())
		}
		q.flights.cancelLost(lost)
	}
}
