package queue

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// A message stored by Body belongs to its session until the session
// commits or aborts it. maddy 0.8.1's SMTP endpoint calls neither when
// another target of a pipeline fails the message after Spool stored it:
// the client is told the message failed and sends it again, so the stored
// copy must not be delivered. The rule: an entry neither committed nor
// aborted within receiveTimeout, or still uncommitted when the queue shuts
// down, is removed, and a Commit that comes later fails with 451, so the
// client is never told such a message was accepted.
//
// receiveTimeout is RFC 5321's 10 minutes for the client's wait for the
// reply to the end of DATA (section 4.5.3.2.6), plus a margin: Commit
// comes before that reply, so by then the client has given up.
//
// A crash leaves such an entry in the store, and it is delivered (after a
// restart, or once its receiving lease expires for a node that does not
// come back): after a crash between storing a message and answering its
// client, delivery is at least once, as in any MTA. A backend that keeps
// small messages in memory until Commit (store/postgres) loses such an
// entry instead; its client, not answered, sends it again.
const receiveTimeout = 15 * time.Minute

// receivingCheckInterval is how often (in real time) entries are checked
// for receiveTimeout.
const receivingCheckInterval = time.Minute

// receivingSet holds the messages stored by Body and not yet committed or
// aborted, with their receiving leases and the time they were stored.
// Whoever takes an entry out of it decides that message's fate: Commit
// queues it, Abort and expiry remove it.
type receivingSet struct {
	mu      sync.Mutex
	entries map[store.ID]receivingEntry
}

type receivingEntry struct {
	lease *store.Lease
	at    time.Time
	// remove is set for a message to remove at the next check (its
	// commit or removal failed), rather than one still being received.
	remove bool
}

func (s *receivingSet) add(l *store.Lease, at time.Time) {
	s.put(receivingEntry{lease: l, at: at})
}

// removeLater hands l to the next check, to be removed.
func (s *receivingSet) removeLater(l *store.Lease) {
	s.put(receivingEntry{lease: l, remove: true})
}

func (s *receivingSet) put(e receivingEntry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.entries == nil {
		s.entries = make(map[store.ID]receivingEntry)
	}
	s.entries[e.lease.ID] = e
}

// take removes id and reports whether it was there.
func (s *receivingSet) take(id store.ID) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.entries[id]
	delete(s.entries, id)
	return ok
}

// takeStoredBefore removes and returns the entries stored before t, and
// those to remove.
func (s *receivingSet) takeStoredBefore(t time.Time) []receivingEntry {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []receivingEntry
	for id, e := range s.entries {
		if e.remove || e.at.Before(t) {
			out = append(out, e)
			delete(s.entries, id)
		}
	}
	return out
}

// expireReceiving removes, every checkEvery until the queue stops,
// entries older than receiveTimeout on the queue's clock.
func (q *Queue) expireReceiving(checkEvery time.Duration) {
	tick := time.NewTicker(checkEvery)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-q.stopping.Done():
			return
		}
		cutoff := q.clock.Now().Add(-receiveTimeout)
		for _, e := range q.receiving.takeStoredBefore(cutoff) {
			if !e.remove {
				q.Log.Msg("removing a stored message that was neither committed nor aborted in time; its client was not told it was accepted",
					"queue_id", e.lease.ID.String(), "timeout", receiveTimeout.String())
				metrics.EnqueueFailures.WithLabelValues(q.label(), metrics.ReasonNotCommitted).Inc()
			}
			q.removeUncommitted(context.Background(), e.lease)
		}
	}
}

// removeUncommitted deletes a message taken out of q.receiving. If the
// store cannot be written, the message goes back into q.receiving, so the
// next check tries again (until the queue stops).
func (q *Queue) removeUncommitted(ctx context.Context, l *store.Lease) error {
	err := q.store.Delete(ctx, l)
	switch {
	case err == nil || errors.Is(err, store.ErrLeaseLost) || errors.Is(err, store.ErrNotFound):
		err = nil // removed, or committed after all
	case q.stopping.Err() == nil:
		q.Log.Error("cannot remove an uncommitted message yet, will retry", err, "queue_id", l.ID.String())
		q.receiving.removeLater(l)
	default:
		// Left in the store, it would be delivered once its receiving
		// lease expires although its client was not told it was
		// accepted; say so loudly.
		q.Log.Error("cannot remove an uncommitted message; it will be delivered", err, "queue_id", l.ID.String())
	}
	if q.onReceivingRemoved != nil {
		q.onReceivingRemoved(l.ID)
	}
	return err
}
