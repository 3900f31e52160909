package queue

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// TestStressEnqueueDeliverAdmin runs senders, deliveries and operator
// commands at once (under -race in CI) and then checks the books: every
// recipient of every accepted message was delivered, bounced with a
// report, or deleted by an operator, and the gauges agree with the store.
func TestStressEnqueueDeliverAdmin(t *testing.T) {
	const (
		senders    = 4
		perSender  = 25
		operators  = 3
		operations = 40
	)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	h := newHarness(t, func(h *harness) {
		h.cfg.maxParallelism = 8
		// Retries are made due by the operators' retry commands; the clock
		// never moves.
		h.cfg.policy.Delays = []time.Duration{time.Hour}
		h.cfg.policy.MaxTries = 1000
		h.cfg.policy.MaxAge = 1000 * time.Hour
	})
	// Every third attempt of a recipient fails temporarily.
	var attemptsMu sync.Mutex
	attempts := map[string]int{}
	h.target.Rcpt = func(attempt int, rcpt string) error {
		attemptsMu.Lock()
		defer attemptsMu.Unlock()
		attempts[rcpt]++
		if attempts[rcpt]%3 == 1 {
			return temp451
		}
		return nil
	}
	// Drain the attempt notifications; this test counts from the store.
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-h.done:
			case <-stop:
				return
			}
		}
	}()
	defer close(stop)

	var submitted atomic.Int64
	// addrsOf maps each accepted message to its recipients, taken from the
	// delivery between Body and Commit, so the books can tell which
	// recipients an operator's delete removed.
	var booksMu sync.Mutex
	addrsOf := map[store.ID][]string{}
	deletedIDs := map[store.ID]bool{}
	submit := func(to []string) error {
		ctx := context.Background()
		d, err := h.q.Start(ctx, testMeta(), "s@example.org")
		if err != nil {
			return err
		}
		for _, a := range to {
			if err := d.AddRcpt(ctx, a, smtp.RcptOptions{}); err != nil {
				return err
			}
		}
		if err := d.Body(ctx, testHeader(), testBuffer()); err != nil {
			return err
		}
		booksMu.Lock()
		for _, p := range d.(*delivery).parts {
			addrsOf[p.msg.ID] = to
		}
		booksMu.Unlock()
		return d.Commit(ctx)
	}
	sendersDone := make(chan struct{})
	var wg sync.WaitGroup
	for s := 0; s < senders; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			for i := 0; i < perSender; i++ {
				to := []string{fmt.Sprintf("r%d-%d-a@x.test", s, i), fmt.Sprintf("r%d-%d-b@y.test", s, i)}
				if err := submit(to); err != nil {
					t.Errorf("submit: %v", err)
					return
				}
				submitted.Add(1)
			}
		}(s)
	}
	var opsDone sync.WaitGroup
	for o := 0; o < operators; o++ {
		opsDone.Add(1)
		go func(o int) {
			defer opsDone.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(o)))
			// At least `operations` commands, and on until the senders are
			// done, each on a message submitted so far.
			for i := 0; ; i++ {
				if i >= operations {
					select {
					case <-sendersDone:
						return
					default:
					}
				}
				op := admin.Ops[rng.IntN(len(admin.Ops))]
				id := store.ID(1 + rng.IntN(int(submitted.Load())+1))
				f := admin.Filter{IDs: []store.ID{id}}
				if op != admin.OpDelete && op != admin.OpBounce && rng.IntN(5) == 0 {
					f = admin.Filter{To: "@y.test"} // bulk, over many messages at once
				}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				res, err := h.q.Apply(ctx, op, f)
				cancel()
				if err != nil {
					t.Errorf("%s: %v", op, err)
				}
				if op == admin.OpDelete {
					booksMu.Lock()
					for _, it := range res.Items {
						if it.Outcome == admin.Changed || it.Outcome == admin.Deferred {
							deletedIDs[id] = true
						}
					}
					booksMu.Unlock()
				}
			}
		}(o)
	}
	wg.Wait()
	close(sendersDone)
	opsDone.Wait()

	// Settle: release everything held, then retry until the queue is
	// empty (each retry makes deferred messages due at once).
	deadline := time.Now().Add(60 * time.Second)
	for {
		h.apply(admin.OpRelease, admin.Filter{})
		h.apply(admin.OpRetry, admin.Filter{})
		if err := h.target.WaitIdle(t.Context()); err != nil {
			t.Fatal(err)
		}
		if len(h.queued()) == 0 && h.q.flights.len() == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d messages still queued", len(h.queued()))
		}
		time.Sleep(10 * time.Millisecond) // let dispatched retries start
	}

	// Books: every recipient delivered at least once, or reported as
	// failed (bounce), or neither only if its message was deleted.
	failed := map[string]bool{}
	for _, rep := range h.reports() {
		for _, line := range splitLines(reportText(rep)) {
			var addr string
			if _, err := fmt.Sscanf(line, "Final-Recipient: rfc822; %s", &addr); err == nil {
				failed[addr] = true
			}
		}
	}
	deleted := map[string]bool{} // recipients of messages an operator deleted
	for id := range deletedIDs {
		for _, a := range addrsOf[id] {
			deleted[a] = true
		}
	}
	lost, removed := 0, 0
	for s := 0; s < senders; s++ {
		for i := 0; i < perSender; i++ {
			for _, suffix := range []string{"a@x.test", "b@y.test"} {
				addr := fmt.Sprintf("r%d-%d-%s", s, i, suffix)
				switch {
				case h.target.CountDelivered(addr) > 0 || failed[addr]:
				case deleted[addr]:
					removed++
				default:
					lost++
					t.Errorf("%s: neither delivered, bounced nor deleted", addr)
				}
			}
		}
	}
	h.assertGauges(0, 0)
	if g := h.figures(); g.Held != 0 {
		t.Fatalf("held gauge %d with an empty queue", g.Held)
	}
	t.Logf("%d deliveries, %d reports, %d recipients removed by operators, %d lost", len(h.target.Deliveries()), len(h.reports()), removed, lost)
}

func splitLines(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' {
			out = append(out, trimCR(s[start:i]))
			start = i + 1
		}
	}
	return append(out, trimCR(s[start:]))
}

func trimCR(s string) string {
	if len(s) > 0 && s[len(s)-1] == '\r' {
		return s[:len(s)-1]
	}
	return s
}
