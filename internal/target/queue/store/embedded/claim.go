package embedded

import (
	"context"
	"errors"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// The lease rules of store.Backend, in memory. Every message is at any
// moment in exactly one place: the due heap (claimable at its due time),
// a lease (a holder works on it, or the session that stores it), or
// neither (held, until an operator claims it with ClaimID). The figures
// change only where a message moves between committed and not, or a
// lease's holder writes a new state.

// lease is one message's current lease. An expired lease stays until the
// message is claimed again, so a write under it is still fenced by its
// token (see store.Backend).
type lease struct {
	owner     string
	token     uint64
	expiry    time.Time
	receiving bool
	request   store.Request
	// writing is set while the holder's write is under way: the lease
	// cannot be taken over in the middle of it.
	writing bool
	// sched is the message's state as counted in the figures.
	sched SchedEntry
	// inHeap is set once an expired lease's message was put back in the
	// due heap.
	inHeap bool
	// due is when the message was due when this lease took it out of the
	// lanes: a Release puts it back at that time (which MakeDue may have
	// made earlier than the stored next attempt).
	due time.Time
}

func (l *lease) public(id store.ID) *store.Lease {
	return &store.Lease{ID: id, Owner: l.owner, Token: l.token, Expiry: l.expiry}
}

// newLease leases id to owner for d; c.mu is held.
func (c *core) newLease(id store.ID, owner string, d time.Duration) *lease {
	c.token++
	l := &lease{owner: owner, token: c.token, expiry: c.now().Add(d)}
	c.leases[id] = l
	l.due = c.lanes.remove(id)
	return l
}

// valid reports whether l still keeps others off its message at now.
func (l *lease) valid(now time.Time) bool { return l.writing || now.Before(l.expiry) }

func (c *core) leaseInfo(id store.ID) *store.LeaseInfo {
	l := c.leases[id]
	if l == nil {
		return nil
	}
	return &store.LeaseInfo{Owner: l.owner, Expiry: l.expiry, Token: l.token, Receiving: l.receiving, Request: l.request}
}

// requeueExpired puts the messages of expired leases of other nodes than
// node back in the due heap; c.mu is held. A node does not take over its
// own leases: it renews them while it works, and ends them itself.
func (c *core) requeueExpired(now time.Time, node string) {
	for id, l := range c.leases {
		if !l.inHeap && l.owner != node && !l.valid(now) && !l.sched.Held {
			l.inHeap = true
			c.lanes.push(id, l.sched.Destination, l.expiry)
		}
	}
}

// Claim implements store.Backend.
func (s *Store) Claim(ctx context.Context, max int, skip []string) ([]store.Claim, error) {
	if err := s.dir.Failed(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	now := s.now()
	s.requeueExpired(now, s.node)
	took := s.lanes.take(now, max, skipSet(skip))
	ids := make([]store.ID, len(took))
	leases := make([]*store.Lease, len(took))
	for i, t := range took {
		ids[i], leases[i] = t.id, s.leaseTaken(t)
	}
	s.mu.Unlock()
	return s.readClaims(ids, leases)
}

// ClaimNext implements store.Backend.
func (s *Store) ClaimNext(ctx context.Context, destination string) (store.Claim, error) {
	if err := s.dir.Failed(); err != nil {
		return store.Claim{}, err
	}
	s.mu.Lock()
	s.requeueExpired(s.now(), s.node)
	t, ok := s.lanes.first(destination)
	var l *store.Lease
	if ok {
		l = s.leaseTaken(t)
	}
	s.mu.Unlock()
	if !ok {
		return store.Claim{}, store.ErrNotFound
	}
	cs, err := s.readClaims([]store.ID{t.id}, []*store.Lease{l})
	if err != nil {
		return store.Claim{}, err
	}
	if len(cs) == 0 {
		return store.Claim{}, store.ErrNotFound
	}
	return cs[0], nil
}

// MakeDue implements store.Backend.
func (s *Store) MakeDue(ctx context.Context, destination string) (int, error) {
	s.mu.Lock()
	n := s.lanes.makeDue(destination, s.now())
	s.mu.Unlock()
	if n > 0 {
		s.kick()
	}
	return n, nil
}

func skipSet(skip []string) map[string]bool {
	if len(skip) == 0 {
		return nil
	}
	m := make(map[string]bool, len(skip))
	for _, d := range skip {
		m[d] = true
	}
	return m
}

// leaseTaken leases t, just taken out of the lanes, to this node; c.mu is
// held.
func (s *Store) leaseTaken(t taken) *store.Lease {
	old := s.leases[t.id]
	l := s.newLease(t.id, s.node, s.lease)
	l.due = t.due
	if old != nil {
		s.takeOver(l, old)
	}
	return l.public(t.id)
}

// readClaims reads the metadata of messages just leased; those gone meanwhile
// (quarantined as they were read, or deleted) are not claimed.
func (s *Store) readClaims(taken []store.ID, leases []*store.Lease) ([]store.Claim, error) {
	claims := make([]store.Claim, 0, len(taken))
	for i, id := range taken {
		m, err := s.dir.Get(id)
		if err != nil {
			s.dropLease(id, leases[i].Token)
			if errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrCorrupt) {
				continue
			}
			return claims, err
		}
		s.mu.Lock()
		if l := s.leases[id]; l != nil && l.token == leases[i].Token {
			l.sched = schedOf(m)
		}
		s.mu.Unlock()
		claims = append(claims, store.Claim{Lease: leases[i], Message: m})
	}
	return claims, nil
}

// takeOver moves what an expired lease carried to the new lease l: the
// figures stay as the old holder left them, a message whose receiving
// lease expired counts as committed as it is (at least once), and an
// operator request recorded for the old holder waits for the new one.
// c.mu is held.
func (c *core) takeOver(l, old *lease) {
	l.sched, l.request = old.sched, old.request
	if old.receiving {
		c.count(old.sched, 1)
	}
}

// dropLease forgets a lease taken on a message that turned out to be gone.
func (c *core) dropLease(id store.ID, token uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if l := c.leases[id]; l != nil && l.token == token {
		delete(c.leases, id)
	}
}

// ClaimID implements store.Backend. It waits until the stored schedule
// is loaded, so the figures stay exact.
func (s *Store) ClaimID(ctx context.Context, id store.ID) (store.Claim, error) {
	select {
	case <-s.loaded:
	case <-ctx.Done():
		return store.Claim{}, ctx.Err()
	}
	s.mu.Lock()
	now := s.now()
	old := s.leases[id]
	if old != nil && old.valid(now) {
		s.mu.Unlock()
		return store.Claim{}, store.ErrLeased
	}
	l := s.newLease(id, s.node, s.lease)
	if old != nil {
		s.takeOver(l, old)
	}
	pub := l.public(id)
	s.mu.Unlock()

	m, err := s.dir.Get(id)
	if err != nil {
		s.dropLease(id, pub.Token)
		if errors.Is(err, store.ErrCorrupt) {
			err = store.ErrNotFound
		}
		return store.Claim{}, err
	}
	s.mu.Lock()
	if cur := s.leases[id]; cur != nil && cur.token == pub.Token {
		cur.sched = schedOf(m)
	}
	s.mu.Unlock()
	return store.Claim{Lease: pub, Message: m}, nil
}

// holding returns the lease that l names if it is still the message's
// (see store.Backend on expired leases), marked as writing; c.mu is held.
func (c *core) holding(l *store.Lease) (*lease, error) {
	cur := c.leases[l.ID]
	if cur == nil || cur.token != l.Token || cur.writing {
		return nil, store.ErrLeaseLost
	}
	return cur, nil
}

// end finishes a holder's write: with the request recorded meanwhile the
// lease is kept (and the request returned, once); otherwise the lease ends
// and the message, unless held, waits in the lanes for sched's due time,
// or (released unchanged) for the time it was due when it was taken. The
// figures move from the lease's old state to sched. c.mu is held.
func (c *core) end(id store.ID, l *lease, sched SchedEntry, released bool) store.Request {
	l.writing = false
	if l.receiving {
		l.receiving = false
		c.count(sched, 1)
	} else {
		c.count(l.sched, -1)
		c.count(sched, 1)
	}
	l.sched = sched
	if r := l.request; r != 0 {
		l.request = 0
		return r
	}
	delete(c.leases, id)
	if !sched.Held {
		due := sched.NextAttempt
		if released && !l.due.IsZero() && l.due.Before(due) {
			due = l.due
		}
		c.lanes.push(id, sched.Destination, due)
		c.kick()
	}
	return 0
}

// Save implements store.Backend.
func (s *Store) Save(ctx context.Context, l *store.Lease, m *store.Message) (store.Request, error) {
	if m.ID != l.ID {
		return 0, errors.New("store: Save of another message than the lease's")
	}
	s.mu.Lock()
	cur, err := s.holding(l)
	if err != nil {
		s.mu.Unlock()
		return 0, err
	}
	cur.writing = true
	s.mu.Unlock()

	// Durable before the lease ends: nobody can claim the message in
	// between and read the old state.
	err = s.dir.Update(ctx, m)

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.leases[l.ID] != cur {
		return 0, store.ErrLeaseLost // quarantined meanwhile
	}
	if err != nil {
		cur.writing = false
		if errors.Is(err, store.ErrNotFound) {
			delete(s.leases, l.ID)
			return 0, store.ErrLeaseLost
		}
		return 0, err
	}
	return s.end(l.ID, cur, schedOf(m), false), nil
}

// Commit implements store.Backend.
func (s *Store) Commit(ctx context.Context, l *store.Lease) (store.Request, error) {
	return s.Release(ctx, l)
}

// Release implements store.Backend.
func (s *Store) Release(ctx context.Context, l *store.Lease) (store.Request, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, err := s.holding(l)
	if err != nil {
		return 0, err
	}
	return s.end(l.ID, cur, cur.sched, true), nil
}

// Delete implements store.Backend.
func (s *Store) Delete(ctx context.Context, l *store.Lease) error {
	s.mu.Lock()
	cur, err := s.holding(l)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	cur.writing = true
	s.mu.Unlock()

	err = s.dir.Delete(ctx, l.ID)

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.leases[l.ID] != cur {
		return store.ErrLeaseLost
	}
	cur.writing = false
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	delete(s.leases, l.ID)
	if !cur.receiving {
		s.count(cur.sched, -1)
	}
	return nil
}

// Renew implements store.Backend.
func (s *Store) Renew(ctx context.Context, leases []*store.Lease) ([]*store.Lease, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var lost []*store.Lease
	expiry := s.now().Add(s.lease)
	for _, l := range leases {
		cur := s.leases[l.ID]
		if cur == nil || cur.token != l.Token {
			lost = append(lost, l)
			continue
		}
		if cur.inHeap {
			s.lanes.remove(l.ID)
			cur.inHeap = false
		}
		cur.expiry, l.Expiry = expiry, expiry
	}
	return lost, nil
}

// Request implements store.Backend.
func (s *Store) Request(ctx context.Context, id store.ID, r store.Request) error {
	s.mu.Lock()
	cur := s.leases[id]
	if cur != nil && cur.valid(s.now()) {
		cur.request = r
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()
	if _, err := s.dir.Get(id); err != nil {
		if errors.Is(err, store.ErrCorrupt) {
			err = store.ErrNotFound
		}
		return err
	}
	return store.ErrNotLeased
}

// NextDue implements store.Backend: the earliest due time in the lanes not
// skipped, or the earliest expiry of another node's lease that would put
// its message back there.
func (s *Store) NextDue(ctx context.Context, skip []string) (time.Time, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	skipped := skipSet(skip)
	due, ok := s.lanes.next(skipped)
	for _, l := range s.leases {
		if !l.inHeap && l.owner != s.node && !l.writing && !l.sched.Held && !skipped[l.sched.Destination] && (!ok || l.expiry.Before(due)) {
			due, ok = l.expiry, true
		}
	}
	return due, ok, nil
}
