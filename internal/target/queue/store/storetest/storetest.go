// Package storetest is the conformance suite every store.Backend passes:
// the same tests of intake, claims, leases, fencing, operator requests,
// content, figures, and a crash and reopen, run against each backend.
//
// A backend's test calls Run with a function that makes a fresh Harness.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// T0 is the time every harness clock starts at.
var T0 = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)

// Clock is a clock that only moves when told; backends under test read it
// through their Now option.
type Clock struct {
	mu  sync.Mutex
	now time.Time
}

// NewClock returns a clock set to T0.
func NewClock() *Clock { return &Clock{now: T0} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// Harness opens the backend under test.
type Harness struct {
	// Open returns a handle on the store under test that takes leases as
	// node; every handle of one Harness works on the same store, and
	// reads time from Clock. The handles use the Lease and ReceiveLease
	// times below. Open waits until the handle is ready to claim
	// everything already stored.
	Open func(t *testing.T, node string) store.Backend
	// Crash ends every open handle the way a killed process would, as far
	// as the backend can tell the difference: leases are not released.
	// The next Open reopens the store from what is durable.
	Crash func(t *testing.T)
	Clock *Clock
	// Lease is how long a lease lasts unless renewed; ReceiveLease how
	// long a receiving lease (Create to Commit) lasts.
	Lease, ReceiveLease time.Duration
	// InMemoryUntilCommit is the largest content (header and body) the
	// backend's Create keeps in the node's memory until Commit instead of
	// storing it (0: Create always stores). Tests of a stored message
	// being received use larger content.
	InMemoryUntilCommit int64
}

// Run runs the suite; newHarness makes a fresh, empty store per test.
func Run(t *testing.T, newHarness func(t *testing.T) *Harness) {
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T, h *Harness)
	}{
		{"CreateCommitClaim", testCreateCommitClaim},
		{"AbortDeletes", testAbortDeletes},
		{"ClaimOrderAndLimit", testClaimOrderAndLimit},
		{"NextDue", testNextDue},
		{"SaveReleasesAtNextAttempt", testSaveReleasesAtNextAttempt},
		{"SaveIsDurable", testSaveIsDurable},
		{"HeldNeverClaimed", testHeldNeverClaimed},
		{"TakeoverFencesOldHolder", testTakeoverFencesOldHolder},
		{"LateSaveWithoutTakeover", testLateSaveWithoutTakeover},
		{"RenewKeepsLease", testRenewKeepsLease},
		{"RequestsAppliedAtSave", testRequestsAppliedAtSave},
		{"RequestAtCommit", testRequestAtCommit},
		{"RequestOnReleaseAndDelete", testRequestOnReleaseAndDelete},
		{"ReceivingLeaseExpires", testReceivingLeaseExpires},
		{"ReceivedInMemory", testReceivedInMemory},
		{"Stats", testStats},
		{"Content", testContent},
		{"GetAndWalkShowLeases", testGetAndWalkShowLeases},
		{"CrashGivesLeasesBack", testCrashGivesLeasesBack},
		{"IDsNeverReused", testIDsNeverReused},
		{"WakeOnCommit", testWakeOnCommit},
		{"Quarantine", testQuarantine},
		{"ConcurrentClaimsExclusive", testConcurrentClaimsExclusive},
		{"ClaimSkipsDestinations", testClaimSkipsDestinations},
		{"ClaimNextOfDestination", testClaimNextOfDestination},
		{"MakeDue", testMakeDue},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newHarness(t)) })
	}
}

var ctx = context.Background()

const testHeader = "Subject: test\r\nMessage-ID: <x@example.org>\r\n\r\n"

// newMessage returns a message for addrs arriving at the clock's time and
// due at once.
func newMessage(h *Harness, addrs ...string) *store.Message {
	now := h.Clock.Now()
	m := &store.Message{MsgID: "m", From: "s@example.org", Arrival: now, NextAttempt: now}
	for _, a := range addrs {
		m.Rcpts = append(m.Rcpts, store.Rcpt{Addr: a})
	}
	return m
}

// create stores m with a small body and returns its receiving lease.
func create(t *testing.T, b store.Backend, m *store.Message) *store.Lease {
	t.Helper()
	return createBody(t, b, m, "Hello.\r\n")
}

// createStored stores m as a message being received: with content too
// large for the backend to keep it in memory until Commit.
func createStored(t *testing.T, h *Harness, b store.Backend, m *store.Message) *store.Lease {
	t.Helper()
	if h.InMemoryUntilCommit == 0 {
		return create(t, b, m)
	}
	return createBody(t, b, m, strings.Repeat("x", int(h.InMemoryUntilCommit)))
}

func createBody(t *testing.T, b store.Backend, m *store.Message, body string) *store.Lease {
	t.Helper()
	l, err := b.Create(ctx, m, []byte(testHeader), strings.NewReader(body), int64(len(body)))
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if l == nil || l.ID != m.ID || m.ID == 0 || l.Owner != b.Node() {
		t.Fatalf("Create returned lease %+v for message %v", l, m.ID)
	}
	return l
}

// queue creates and commits a message.
func queue(t *testing.T, b store.Backend, m *store.Message) store.ID {
	t.Helper()
	l := create(t, b, m)
	if r, err := b.Commit(ctx, l); err != nil || r != 0 {
		t.Fatalf("Commit = %v, %v", r, err)
	}
	return m.ID
}

func claim(t *testing.T, b store.Backend, max int) []store.Claim {
	t.Helper()
	cs, err := b.Claim(ctx, max, nil)
	if err != nil {
		t.Fatalf("Claim: %v", err)
	}
	for _, c := range cs {
		if c.Lease == nil || c.Message == nil || c.Lease.ID != c.Message.ID || c.Lease.Owner != b.Node() {
			t.Fatalf("Claim returned %+v", c)
		}
	}
	return cs
}

func claimedIDs(cs []store.Claim) []store.ID {
	ids := make([]store.ID, len(cs))
	for i, c := range cs {
		ids[i] = c.Message.ID
	}
	return ids
}

// claimOne claims and expects exactly the message id.
func claimOne(t *testing.T, b store.Backend, id store.ID) store.Claim {
	t.Helper()
	cs := claim(t, b, 10)
	if len(cs) != 1 || cs[0].Message.ID != id {
		t.Fatalf("Claim = %v, want [%v]", claimedIDs(cs), id)
	}
	return cs[0]
}

func claimNone(t *testing.T, b store.Backend, why string) {
	t.Helper()
	if cs := claim(t, b, 10); len(cs) != 0 {
		t.Fatalf("Claim = %v, want none (%s)", claimedIDs(cs), why)
	}
}

func save(t *testing.T, b store.Backend, l *store.Lease, m *store.Message) {
	t.Helper()
	if r, err := b.Save(ctx, l, m); err != nil || r != 0 {
		t.Fatalf("Save = %v, %v", r, err)
	}
}

func get(t *testing.T, b store.Backend, id store.ID) *store.Message {
	t.Helper()
	m, err := b.Get(ctx, id)
	if err != nil {
		t.Fatalf("Get(%v): %v", id, err)
	}
	return m
}

func testCreateCommitClaim(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	m := newMessage(h, "r1@x.test", "r2@x.test")
	m.MailOpts.EnvelopeID = "env-1"
	l := create(t, a, m)
	claimNone(t, b, "still being received")
	claimNone(t, a, "still being received")
	if r, err := a.Commit(ctx, l); err != nil || r != 0 {
		t.Fatalf("Commit = %v, %v", r, err)
	}
	c := claimOne(t, b, m.ID)
	if c.Lease.Token <= l.Token {
		t.Fatalf("claim token %d not above the receiving lease's %d", c.Lease.Token, l.Token)
	}
	if !c.Lease.Expiry.Equal(h.Clock.Now().Add(h.Lease)) {
		t.Fatalf("lease expires at %v, want now + %v", c.Lease.Expiry, h.Lease)
	}
	got := c.Message
	if len(got.Rcpts) != 2 || got.Rcpts[1].Addr != "r2@x.test" || got.MailOpts.EnvelopeID != "env-1" || !got.Arrival.Equal(m.Arrival) {
		t.Fatalf("claimed metadata %+v", got)
	}
	claimNone(t, a, "leased by b")
	if _, err := a.Commit(ctx, l); !errors.Is(err, store.ErrLeaseLost) {
		t.Fatalf("a second Commit = %v, want ErrLeaseLost", err)
	}
}

func testAbortDeletes(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	m := newMessage(h, "r@x.test")
	l := createBody(t, a, m, strings.Repeat("large ", 100<<10))
	if err := a.Delete(ctx, l); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Get(ctx, m.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after Delete = %v", err)
	}
	if _, err := a.ClaimID(ctx, m.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("ClaimID after Delete = %v", err)
	}
	if err := a.Request(ctx, m.ID, store.RequestHold); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Request after Delete = %v", err)
	}
	if err := a.Delete(ctx, l); !errors.Is(err, store.ErrLeaseLost) && !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second Delete = %v", err)
	}
	claimNone(t, a, "deleted")
}

func testClaimOrderAndLimit(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	var ids []store.ID
	for _, due := range []time.Duration{5, 1, 3, 1, 4} {
		m := newMessage(h, "r@x.test")
		m.NextAttempt = T0.Add(due * time.Minute)
		ids = append(ids, queue(t, a, m))
	}
	h.Clock.Advance(10 * time.Minute)
	got := claimedIDs(claim(t, a, 3))
	want := []store.ID{ids[1], ids[3], ids[2]} // due 1, 1 (by ID), 3
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Claim(3) = %v, want %v", got, want)
	}
	got = claimedIDs(claim(t, a, 3))
	if want := []store.ID{ids[4], ids[0]}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("next Claim(3) = %v, want %v", got, want)
	}
}

func testNextDue(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	if _, ok, err := a.NextDue(ctx, nil); err != nil || ok {
		t.Fatalf("NextDue on an empty store = %v, %v", ok, err)
	}
	m := newMessage(h, "r@x.test")
	m.NextAttempt = T0.Add(time.Hour)
	queue(t, a, m)
	held := newMessage(h, "r@x.test")
	held.Held = true
	queue(t, a, held)
	due, ok, err := a.NextDue(ctx, nil)
	if err != nil || !ok || !due.Equal(m.NextAttempt) {
		t.Fatalf("NextDue = %v, %v, %v; want %v", due, ok, err, m.NextAttempt)
	}
	claimNone(t, a, "not due yet")
	h.Clock.Advance(time.Hour)
	c := claimOne(t, a, m.ID)
	// While leased, the message is due again when its lease expires.
	if due, ok, err := a.NextDue(ctx, nil); err != nil || ok && due.Before(c.Lease.Expiry) {
		t.Fatalf("NextDue with the only message leased = %v, %v, %v", due, ok, err)
	}
}

func testSaveReleasesAtNextAttempt(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	id := queue(t, a, newMessage(h, "r1@x.test", "r2@x.test"))
	c := claimOne(t, a, id)
	m := c.Message
	m.Rcpts[0].State, m.Rcpts[0].Tries = store.RcptDelivered, 1
	m.Rcpts[1].Tries = 1
	m.Rcpts[1].LastError = &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 4, 1}, Message: "later", Temporary: true}
	m.Attempts = 1
	m.NextAttempt = h.Clock.Now().Add(5 * time.Minute)
	save(t, a, c.Lease, m)
	claimNone(t, b, "not due until 5m")
	h.Clock.Advance(5 * time.Minute)
	c2 := claimOne(t, b, id)
	got := c2.Message
	if got.Rcpts[0].State != store.RcptDelivered || got.Rcpts[1].LastError == nil || got.Rcpts[1].LastError.Message != "later" || got.Attempts != 1 {
		t.Fatalf("state after Save: %+v", got)
	}
	if _, err := a.Save(ctx, c.Lease, m); !errors.Is(err, store.ErrLeaseLost) {
		t.Fatalf("Save with an ended lease = %v, want ErrLeaseLost", err)
	}
}

func testSaveIsDurable(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	id := queue(t, a, newMessage(h, "r@x.test"))
	c := claimOne(t, a, id)
	c.Message.Rcpts[0].Tries = 3
	c.Message.NextAttempt = h.Clock.Now().Add(time.Minute)
	save(t, a, c.Lease, c.Message)
	h.Crash(t)
	a = h.Open(t, "a")
	if got := get(t, a, id); got.Rcpts[0].Tries != 3 || !got.NextAttempt.Equal(c.Message.NextAttempt) {
		t.Fatalf("after a crash: %+v", got)
	}
}

func testHeldNeverClaimed(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	id := queue(t, a, newMessage(h, "r@x.test"))
	c := claimOne(t, a, id)
	c.Message.Held = true
	save(t, a, c.Lease, c.Message)
	h.Clock.Advance(365 * 24 * time.Hour)
	claimNone(t, a, "held")
	c, err := a.ClaimID(ctx, id)
	if err != nil || !c.Message.Held {
		t.Fatalf("ClaimID of a held message = %+v, %v", c, err)
	}
	c.Message.Held = false
	save(t, a, c.Lease, c.Message)
	claimOne(t, a, id)
}

func testTakeoverFencesOldHolder(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	id := queue(t, a, newMessage(h, "r@x.test"))
	ca := claimOne(t, a, id)
	claimNone(t, b, "leased by a")
	h.Clock.Advance(h.Lease + time.Second)
	cb := claimOne(t, b, id)
	if cb.Lease.Token <= ca.Lease.Token {
		t.Fatalf("takeover token %d not above %d", cb.Lease.Token, ca.Lease.Token)
	}
	late := *ca.Message
	late.Rcpts = append([]store.Rcpt(nil), late.Rcpts...)
	late.Rcpts[0].State = store.RcptDelivered
	if _, err := a.Save(ctx, ca.Lease, &late); !errors.Is(err, store.ErrLeaseLost) {
		t.Fatalf("late Save = %v, want ErrLeaseLost", err)
	}
	if _, err := a.Release(ctx, ca.Lease); !errors.Is(err, store.ErrLeaseLost) {
		t.Fatalf("late Release = %v, want ErrLeaseLost", err)
	}
	if err := a.Delete(ctx, ca.Lease); !errors.Is(err, store.ErrLeaseLost) {
		t.Fatalf("late Delete = %v, want ErrLeaseLost", err)
	}
	lost, err := a.Renew(ctx, []*store.Lease{ca.Lease})
	if err != nil || len(lost) != 1 {
		t.Fatalf("late Renew = %v, %v; want the lease lost", lost, err)
	}
	if got := get(t, b, id); got.Rcpts[0].State != store.RcptPending {
		t.Fatal("the late save was written")
	}
	cb.Message.Rcpts[0].Tries = 1
	cb.Message.NextAttempt = h.Clock.Now().Add(time.Minute)
	save(t, b, cb.Lease, cb.Message)
	if got := get(t, a, id); got.Rcpts[0].Tries != 1 || got.Lease != nil {
		t.Fatalf("after the new holder's Save: %+v, lease %+v", got, got.Lease)
	}
}

func testLateSaveWithoutTakeover(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	id := queue(t, a, newMessage(h, "r@x.test"))
	c := claimOne(t, a, id)
	h.Clock.Advance(3 * h.Lease)
	c.Message.Rcpts[0].State = store.RcptDelivered
	save(t, a, c.Lease, c.Message)
	if got := get(t, a, id); got.Rcpts[0].State != store.RcptDelivered {
		t.Fatal("a save after the lease expired, with nobody having claimed the message since, was not written")
	}
}

func testRenewKeepsLease(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	id := queue(t, a, newMessage(h, "r@x.test"))
	c := claimOne(t, a, id)
	for i := 0; i < 3; i++ {
		h.Clock.Advance(h.Lease * 2 / 3)
		lost, err := a.Renew(ctx, []*store.Lease{c.Lease})
		if err != nil || len(lost) != 0 {
			t.Fatalf("Renew = %v, %v", lost, err)
		}
		if !c.Lease.Expiry.Equal(h.Clock.Now().Add(h.Lease)) {
			t.Fatalf("renewed lease expires at %v, want now + %v", c.Lease.Expiry, h.Lease)
		}
		claimNone(t, b, "the lease was renewed")
	}
	save(t, a, c.Lease, c.Message)
}

func testRequestsAppliedAtSave(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	id := queue(t, a, newMessage(h, "r@x.test"))
	if err := b.Request(ctx, id, store.RequestHold); !errors.Is(err, store.ErrNotLeased) {
		t.Fatalf("Request on a message nobody holds = %v, want ErrNotLeased", err)
	}
	c := claimOne(t, a, id)
	if _, err := b.ClaimID(ctx, id); !errors.Is(err, store.ErrLeased) {
		t.Fatalf("ClaimID of a leased message = %v, want ErrLeased", err)
	}
	for _, r := range []store.Request{store.RequestHold, store.RequestDelete} {
		if err := b.Request(ctx, id, r); err != nil {
			t.Fatalf("Request(%v): %v", r, err)
		}
	}
	if got := get(t, b, id); got.Lease == nil || got.Lease.Request != store.RequestDelete {
		t.Fatalf("recorded request: %+v", got.Lease)
	}
	c.Message.Rcpts[0].Tries = 1
	r, err := a.Save(ctx, c.Lease, c.Message)
	if err != nil || r != store.RequestDelete {
		t.Fatalf("Save with requests recorded = %v, %v; want the latest, delete", r, err)
	}
	// The lease is kept for the request, and the state was written.
	claimNone(t, b, "kept for the request")
	if got := get(t, b, id); got.Rcpts[0].Tries != 1 || got.Lease == nil || got.Lease.Owner != "a" || got.Lease.Request != 0 {
		t.Fatalf("after Save returned the request: %+v, lease %+v", got, got.Lease)
	}
	if err := a.Delete(ctx, c.Lease); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Get(ctx, id); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after the request was applied = %v", err)
	}
}

func testRequestAtCommit(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	m := newMessage(h, "r@x.test")
	l := createStored(t, h, a, m)
	if err := b.Request(ctx, m.ID, store.RequestHold); err != nil {
		t.Fatalf("Request on a message being received: %v", err)
	}
	r, err := a.Commit(ctx, l)
	if err != nil || r != store.RequestHold {
		t.Fatalf("Commit = %v, %v; want the hold request", r, err)
	}
	m.Held = true
	save(t, a, l, m)
	claimNone(t, b, "held")
	if st, err := b.Stats(ctx); err != nil || st.Messages != 1 || st.Held != 1 {
		t.Fatalf("Stats = %+v, %v", st, err)
	}
}

func testRequestOnReleaseAndDelete(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	id := queue(t, a, newMessage(h, "r@x.test"))
	c := claimOne(t, a, id)
	if err := b.Request(ctx, id, store.RequestBounce); err != nil {
		t.Fatal(err)
	}
	r, err := a.Release(ctx, c.Lease)
	if err != nil || r != store.RequestBounce {
		t.Fatalf("Release = %v, %v; want the bounce request", r, err)
	}
	r, err = a.Release(ctx, c.Lease)
	if err != nil || r != 0 {
		t.Fatalf("second Release = %v, %v", r, err)
	}
	claimOne(t, b, id)
}

func testReceivingLeaseExpires(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	m := newMessage(h, "r@x.test")
	l := createStored(t, h, a, m)
	h.Clock.Advance(h.ReceiveLease - time.Second)
	claimNone(t, b, "receiving lease still valid")
	h.Clock.Advance(2 * time.Second)
	claimOne(t, b, m.ID)
	if _, err := a.Commit(ctx, l); !errors.Is(err, store.ErrLeaseLost) {
		t.Fatalf("Commit after the receiving lease was taken over = %v", err)
	}
}

// testReceivedInMemory checks a message Create keeps in memory: nothing
// else sees it until Commit, Renew keeps its lease, Delete leaves nothing
// behind, and a crash loses it (its client was not answered) without its
// ID being given again.
func testReceivedInMemory(t *testing.T, h *Harness) {
	if h.InMemoryUntilCommit == 0 {
		t.Skip("the backend stores every message at Create")
	}
	a, b := h.Open(t, "a"), h.Open(t, "b")
	m := newMessage(h, "r@x.test")
	l := create(t, a, m)
	if _, err := b.Get(ctx, m.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get on another node of a message received in memory = %v, want ErrNotFound", err)
	}
	if err := b.Request(ctx, m.ID, store.RequestHold); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Request = %v, want ErrNotFound", err)
	}
	n := 0
	if err := a.Walk(ctx, func(*store.Message) error { n++; return nil }); err != nil || n != 0 {
		t.Fatalf("Walk saw %d messages, %v", n, err)
	}
	h.Clock.Advance(h.ReceiveLease / 2)
	if lost, err := a.Renew(ctx, []*store.Lease{l}); err != nil || len(lost) != 0 {
		t.Fatalf("Renew = %v, %v", lost, err)
	}
	h.Clock.Advance(h.ReceiveLease)
	if r, err := a.Commit(ctx, l); err != nil || r != 0 {
		t.Fatalf("Commit = %v, %v", r, err)
	}
	c := claimOne(t, b, m.ID)
	if c.Lease.Token <= l.Token {
		t.Fatalf("claim token %d not above the receiving lease's %d", c.Lease.Token, l.Token)
	}

	aborted := newMessage(h, "aborted@x.test")
	if err := a.Delete(ctx, create(t, a, aborted)); err != nil {
		t.Fatal(err)
	}
	lost := newMessage(h, "lost@x.test")
	create(t, a, lost)
	h.Crash(t)
	a = h.Open(t, "a")
	for _, id := range []store.ID{aborted.ID, lost.ID} {
		if _, err := a.Get(ctx, id); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("Get(%v) after the crash = %v, want ErrNotFound", id, err)
		}
	}
	next := newMessage(h, "next@x.test")
	create(t, a, next)
	if next.ID == lost.ID || next.ID == aborted.ID || next.ID == m.ID {
		t.Fatalf("ID %v given again", next.ID)
	}
}

func testStats(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	if st, err := a.Stats(ctx); err != nil || st != (store.Stats{}) {
		t.Fatalf("Stats of an empty store = %+v, %v", st, err)
	}
	older := newMessage(h, "r1@x.test", "r2@x.test", "r3@x.test")
	h.Clock.Advance(time.Minute)
	newer := newMessage(h, "r1@x.test")
	idNewer := queue(t, a, newer)
	older.Arrival = T0 // imported mail: older than its ID says
	idOlder := queue(t, a, older)
	createStored(t, h, a, newMessage(h, "receiving@x.test"))
	want := store.Stats{Messages: 2, Recipients: 4, Oldest: T0}
	if st, _ := a.Stats(ctx); st.Messages != want.Messages || st.Recipients != want.Recipients || st.Held != 0 || !st.Oldest.Equal(T0) {
		t.Fatalf("Stats = %+v, want %+v", st, want)
	}
	c, err := a.ClaimID(ctx, idNewer)
	if err != nil {
		t.Fatal(err)
	}
	c.Message.Rcpts[0].State = store.RcptDelivered
	c.Message.Held = true
	save(t, a, c.Lease, c.Message)
	if st, _ := a.Stats(ctx); st.Messages != 2 || st.Recipients != 3 || st.Held != 1 {
		t.Fatalf("Stats after a save = %+v", st)
	}
	c, err = a.ClaimID(ctx, idOlder)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Delete(ctx, c.Lease); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.Stats(ctx); st.Messages != 1 || st.Recipients != 0 || st.Held != 1 || !st.Oldest.Equal(newer.Arrival) {
		t.Fatalf("Stats after a delete = %+v", st)
	}
}

func testContent(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	for _, size := range []int{0, 10, 70 << 10, 700 << 10} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			body := make([]byte, size)
			for i := range body {
				body[i] = byte('a' + i%26)
			}
			m := newMessage(h, "r@x.test")
			l := createBody(t, a, m, string(body))
			if _, err := a.Commit(ctx, l); err != nil {
				t.Fatal(err)
			}
			got := get(t, a, m.ID)
			if got.HeaderLen != int64(len(testHeader)) || got.BodyLen != int64(size) {
				t.Fatalf("stored lengths %d/%d", got.HeaderLen, got.BodyLen)
			}
			c, err := a.Content(ctx, got)
			if err != nil {
				t.Fatal(err)
			}
			if string(c.Header) != testHeader || c.Body.Len() != size {
				t.Fatalf("content header %q, body length %d", c.Header, c.Body.Len())
			}
			for i := 0; i < 2; i++ { // a target may read it once per next hop
				r, err := c.Body.Open()
				if err != nil {
					t.Fatal(err)
				}
				b, err := io.ReadAll(r)
				r.Close()
				if err != nil || !bytes.Equal(b, body) {
					t.Fatalf("read %d: %d bytes, %v", i, len(b), err)
				}
			}
		})
	}
}

func testGetAndWalkShowLeases(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	idFree := queue(t, a, newMessage(h, "free@x.test"))
	idLeased := queue(t, a, newMessage(h, "leased@x.test"))
	receiving := newMessage(h, "receiving@x.test")
	createStored(t, h, a, receiving)
	c, err := b.ClaimID(ctx, idLeased)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[store.ID]*store.LeaseInfo{}
	err = a.Walk(ctx, func(m *store.Message) error {
		seen[m.ID] = m.Lease
		return nil
	})
	if err != nil || len(seen) != 3 {
		t.Fatalf("Walk saw %d messages, %v", len(seen), err)
	}
	if seen[idFree] != nil {
		t.Errorf("free message has lease %+v", seen[idFree])
	}
	if l := seen[idLeased]; l == nil || l.Owner != "b" || !l.Expiry.Equal(c.Lease.Expiry) || l.Receiving {
		t.Errorf("leased message: %+v, want owner b until %v", l, c.Lease.Expiry)
	}
	if l := seen[receiving.ID]; l == nil || !l.Receiving || l.Owner != "a" {
		t.Errorf("message being received: %+v", l)
	}
	if m := get(t, a, idLeased); m.Lease == nil || m.Lease.Owner != "b" {
		t.Errorf("Get of a leased message: lease %+v", m.Lease)
	}
}

func testCrashGivesLeasesBack(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	id := queue(t, a, newMessage(h, "claimed@x.test"))
	c := claimOne(t, a, id)
	receiving := newMessage(h, "receiving@x.test")
	createStored(t, h, a, receiving)
	h.Crash(t)
	// The node that held the leases is back: what it held is claimable at
	// once, the message it was receiving included (at least once).
	a = h.Open(t, "a")
	cs := claim(t, a, 10)
	if got := claimedIDs(cs); fmt.Sprint(got) != fmt.Sprint([]store.ID{id, receiving.ID}) {
		t.Fatalf("Claim after the restart = %v, want [%v %v]", got, id, receiving.ID)
	}
	if cs[0].Lease.Token <= c.Lease.Token {
		t.Fatalf("token after the restart %d, not above %d", cs[0].Lease.Token, c.Lease.Token)
	}
	if st, _ := a.Stats(ctx); st.Messages != 2 {
		t.Fatalf("Stats after the restart = %+v", st)
	}
}

func testIDsNeverReused(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	var last store.ID
	for i := 0; i < 3; i++ {
		m := newMessage(h, "r@x.test")
		l := create(t, a, m)
		if m.ID <= last {
			t.Fatalf("ID %v after %v", m.ID, last)
		}
		last = m.ID
		if err := a.Delete(ctx, l); err != nil {
			t.Fatal(err)
		}
	}
	h.Crash(t)
	a = h.Open(t, "a")
	m := newMessage(h, "r@x.test")
	create(t, a, m)
	if m.ID <= last {
		t.Fatalf("ID %v after a restart, the deleted %v was higher", m.ID, last)
	}
}

func testWakeOnCommit(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	for drained := false; !drained; {
		select {
		case <-b.Wake():
		default:
			drained = true
		}
	}
	queue(t, a, newMessage(h, "r@x.test"))
	select {
	case <-b.Wake():
	case <-time.After(10 * time.Second):
		t.Fatal("no wake-up on another node after a commit")
	}
}

func testQuarantine(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	id := queue(t, a, newMessage(h, "r@x.test"))
	keep := queue(t, a, newMessage(h, "r@x.test"))
	a.Quarantine(ctx, id, errors.New("test damage"))
	if _, err := a.Get(ctx, id); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get of a quarantined message = %v", err)
	}
	if st, _ := a.Stats(ctx); st.Messages != 1 || st.Recipients != 1 {
		t.Fatalf("Stats after quarantine = %+v", st)
	}
	claimOne(t, a, keep)
}

func testConcurrentClaimsExclusive(t *testing.T, h *Harness) {
	const messages = 200
	a, b := h.Open(t, "a"), h.Open(t, "b")
	for i := 0; i < messages; i++ {
		queue(t, a, newMessage(h, fmt.Sprintf("r%d@x.test", i)))
	}
	var mu sync.Mutex
	claimed := map[store.ID]string{}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		node := []store.Backend{a, b}[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				cs, err := node.Claim(ctx, 7, nil)
				if err != nil {
					errs <- err
					return
				}
				if len(cs) == 0 {
					return
				}
				for _, c := range cs {
					mu.Lock()
					if prev, dup := claimed[c.Message.ID]; dup {
						mu.Unlock()
						errs <- fmt.Errorf("%v claimed by %s and %s", c.Message.ID, prev, node.Node())
						return
					}
					claimed[c.Message.ID] = node.Node()
					mu.Unlock()
					c.Message.Rcpts[0].State = store.RcptDelivered
					if err := node.Delete(ctx, c.Lease); err != nil {
						errs <- err
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if len(claimed) != messages {
		t.Fatalf("%d of %d messages claimed", len(claimed), messages)
	}
}

// queueTo queues a message of destination dest, due after wait.
func queueTo(t *testing.T, h *Harness, b store.Backend, dest string, wait time.Duration) store.ID {
	t.Helper()
	m := newMessage(h, "r@"+dest)
	m.Destination = dest
	m.NextAttempt = h.Clock.Now().Add(wait)
	return queue(t, b, m)
}

func testClaimSkipsDestinations(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	a1 := queueTo(t, h, a, "a.test", 0)
	b1 := queueTo(t, h, a, "b.test", time.Second)
	a2 := queueTo(t, h, a, "a.test", 2*time.Second)
	c1 := queueTo(t, h, a, "c.test", 3*time.Second)
	h.Clock.Advance(time.Minute)
	if due, ok, err := a.NextDue(ctx, []string{"a.test"}); err != nil || !ok || !due.Equal(T0.Add(time.Second)) {
		t.Fatalf("NextDue skipping a.test = %v, %v, %v; want b.test's", due, ok, err)
	}
	got := claimedIDs(claim2(t, a, 10, "a.test", "c.test"))
	if fmt.Sprint(got) != fmt.Sprint([]store.ID{b1}) {
		t.Fatalf("Claim skipping a.test and c.test = %v, want [%v]", got, b1)
	}
	got = claimedIDs(claim2(t, a, 10, "c.test"))
	if fmt.Sprint(got) != fmt.Sprint([]store.ID{a1, a2}) {
		t.Fatalf("Claim skipping c.test = %v, want [%v %v]", got, a1, a2)
	}
	// The destination is stored: after a restart it is still skipped.
	h.Crash(t)
	a = h.Open(t, "a")
	if got := claimedIDs(claim2(t, a, 10, "b.test", "c.test")); len(got) != 2 || got[0] != a1 {
		t.Fatalf("after a restart, Claim skipping b.test and c.test = %v, want a.test's two", got)
	}
	if got := claimedIDs(claim2(t, a, 10)); fmt.Sprint(got) != fmt.Sprint([]store.ID{b1, c1}) {
		t.Fatalf("after a restart, the rest = %v, want [%v %v]", got, b1, c1)
	}
	if m := get(t, a, c1); m.Destination != "c.test" {
		t.Fatalf("stored destination %q", m.Destination)
	}
}

func claim2(t *testing.T, b store.Backend, max int, skip ...string) []store.Claim {
	t.Helper()
	cs, err := b.Claim(ctx, max, skip)
	if err != nil {
		t.Fatalf("Claim: %v", err)
	}
	return cs
}

func testClaimNextOfDestination(t *testing.T, h *Harness) {
	a, b := h.Open(t, "a"), h.Open(t, "b")
	later := queueTo(t, h, a, "a.test", 2*time.Hour)
	sooner := queueTo(t, h, a, "a.test", time.Hour)
	queueTo(t, h, a, "b.test", 0)
	held := newMessage(h, "r@a.test")
	held.Destination, held.Held = "a.test", true
	queue(t, a, held)
	c, err := b.ClaimNext(ctx, "a.test")
	if err != nil || c.Message.ID != sooner || c.Lease.Owner != "b" {
		t.Fatalf("ClaimNext = %+v, %v; want %v, not due for an hour", c.Message, err, sooner)
	}
	if c2, err := a.ClaimNext(ctx, "a.test"); err != nil || c2.Message.ID != later {
		t.Fatalf("second ClaimNext = %v, %v; want %v", c2.Message, err, later)
	}
	if _, err := a.ClaimNext(ctx, "a.test"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("ClaimNext with only leased and held messages left = %v, want ErrNotFound", err)
	}
	if _, err := a.ClaimNext(ctx, "nowhere.test"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("ClaimNext of an unknown destination = %v", err)
	}
	save(t, b, c.Lease, c.Message)
}

func testMakeDue(t *testing.T, h *Harness) {
	a := h.Open(t, "a")
	x := queueTo(t, h, a, "a.test", time.Hour)
	y := queueTo(t, h, a, "a.test", 2*time.Hour)
	leased := queueTo(t, h, a, "a.test", 0)
	other := queueTo(t, h, a, "b.test", time.Hour)
	held := newMessage(h, "r@a.test")
	held.Destination, held.Held = "a.test", true
	queue(t, a, held)
	c, err := a.ClaimID(ctx, leased)
	if err != nil {
		t.Fatal(err)
	}
	n, err := a.MakeDue(ctx, "a.test")
	if err != nil || n != 2 {
		t.Fatalf("MakeDue = %d, %v; want 2 (not the held or the leased one)", n, err)
	}
	got := claimedIDs(claim2(t, a, 10))
	if fmt.Sprint(got) != fmt.Sprint([]store.ID{x, y}) && fmt.Sprint(got) != fmt.Sprint([]store.ID{y, x}) {
		t.Fatalf("Claim after MakeDue = %v, want %v and %v (not %v of b.test)", got, x, y, other)
	}
	save(t, a, c.Lease, c.Message)
}
