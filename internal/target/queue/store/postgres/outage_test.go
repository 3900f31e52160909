package postgres

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/storetest"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// TestOutage stops the server under open handles: every call fails with
// an error within its context, none hangs or panics, and once the server
// is back the same handles work again, notifications included.
func TestOutage(t *testing.T) {
	pgtest.Require(t)
	c, err := pgtest.New(pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() }) // after the handles' Close, registered below
	dsn, err := c.CreateDatabase("spool")
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{dsn: dsn, clock: storetest.NewClock()}
	t.Cleanup(func() {
		for _, s := range h.open {
			s.Close()
		}
	})
	listening := make(chan string, 10)
	open := func(node string) *Store {
		opts := h.options(t, node)
		opts.PollInterval = time.Hour // only a notification wakes
		opts.onListen = func() { listening <- node }
		s := h.openWith(t, opts)
		<-listening
		return s
	}
	a, b := open("a"), open("b")
	id := queueMsg(t, a, newMsg(h, "r@x.test"))
	cs, err := a.Claim(ctx, 1, nil)
	if err != nil || len(cs) != 1 {
		t.Fatal(cs, err)
	}
	held := cs[0]

	if err := c.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	const limit = 10 * time.Second
	calls := map[string]func(ctx context.Context) error{
		// A small message is received in memory: Create may succeed,
		// Commit (before the client is answered) fails.
		"Create and Commit": func(ctx context.Context) error {
			l, err := a.Create(ctx, newMsg(h, "r@x.test"), []byte(hdr), strings.NewReader("x"), 1)
			if err == nil {
				_, err = a.Commit(ctx, l)
			}
			return err
		},
		"Claim":   func(ctx context.Context) error { _, err := a.Claim(ctx, 5, nil); return err },
		"ClaimID": func(ctx context.Context) error { _, err := b.ClaimID(ctx, id); return err },
		"Save":    func(ctx context.Context) error { _, err := a.Save(ctx, held.Lease, held.Message); return err },
		"Renew":   func(ctx context.Context) error { _, err := a.Renew(ctx, []*store.Lease{held.Lease}); return err },
		"Request": func(ctx context.Context) error { return b.Request(ctx, id, store.RequestHold) },
		"Get":     func(ctx context.Context) error { _, err := b.Get(ctx, id); return err },
		"Walk":    func(ctx context.Context) error { return b.Walk(ctx, func(*store.Message) error { return nil }) },
		"Stats":   func(ctx context.Context) error { _, err := b.Stats(ctx); return err },
		"NextDue": func(ctx context.Context) error { _, _, err := b.NextDue(ctx, nil); return err },
		"Content": func(ctx context.Context) error { _, err := b.Content(ctx, held.Message); return err },
		"Quarantine": func(ctx context.Context) error {
			b.Quarantine(ctx, id, errors.New("test"))
			return errors.New("no error to return")
		},
	}
	for name, call := range calls {
		ctx, cancel := context.WithTimeout(context.Background(), limit)
		start := time.Now()
		err := call(ctx)
		cancel()
		t.Logf("%s with the server down: %v after %v", name, err, time.Since(start).Round(time.Millisecond))
		if err == nil {
			t.Errorf("%s succeeded with the server down", name)
		}
		if time.Since(start) >= limit {
			t.Errorf("%s took until its context ended", name)
		}
	}

	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	// The same handles work again: the held lease is still a's.
	if r, err := a.Save(ctx, held.Lease, held.Message); err != nil || r != 0 {
		t.Fatalf("Save after the restart = %v, %v", r, err)
	}
	cs, err = b.Claim(ctx, 5, nil)
	if err != nil || len(cs) != 1 || cs[0].Message.ID != id {
		t.Fatalf("Claim after the restart = %v, %v", cs, err)
	}
	if a.Failed() != nil || b.Failed() != nil {
		t.Fatal("Failed() after an outage")
	}
	// Both listeners reconnect by themselves, and notifications flow.
	for got := map[string]bool{}; !got["a"] || !got["b"]; {
		select {
		case n := <-listening:
			got[n] = true
		case <-time.After(30 * time.Second):
			t.Fatalf("listeners reconnected: %v", got)
		}
	}
	drain(b.Wake())
	start := time.Now()
	queueMsg(t, a, newMsg(h, "r@x.test"))
	select {
	case <-b.Wake():
		t.Logf("b woke %v after a commit, after the restart", time.Since(start))
	case <-time.After(time.Second):
		t.Fatal("no wake-up within 1s after the restart")
	}
}
