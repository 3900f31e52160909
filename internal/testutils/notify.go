package testutils

import (
	"context"
	"sync"
)

// notifier is a broadcast primitive that works with context cancellation,
// which sync.Cond does not. The owner's mutex must be held while calling
// its methods.
type notifier struct {
	ch chan struct{}
}

// wait returns a channel that is closed on the next broadcast.
func (n *notifier) wait() <-chan struct{} {
	if n.ch == nil {
		n.ch = make(chan struct{})
	}
	return n.ch
}

// broadcast wakes every goroutine blocked on a channel from wait.
func (n *notifier) broadcast() {
	if n.ch != nil {
		close(n.ch)
		n.ch = nil
	}
}

// waitUntil blocks until cond (evaluated with mu held) returns true or ctx
// is done. State changes must call n.broadcast with mu held.
func waitUntil(ctx context.Context, mu *sync.Mutex, n *notifier, cond func() bool) error {
	for {
		mu.Lock()
		if cond() {
			mu.Unlock()
			return nil
		}
		ch := n.wait()
		mu.Unlock()

		select {
		case <-ch:
		case <-ctx.Done():
			// Re-check once so a change that raced with cancellation is
			// not reported as a timeout.
			mu.Lock()
			ok := cond()
			mu.Unlock()
			if ok {
				return nil
			}
			return ctx.Err()
		}
	}
}
