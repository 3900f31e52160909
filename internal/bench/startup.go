package bench

import (
	"context"
	"fmt"
	"runtime"
	"runtime/debug"
	"time"
)

// StartupResult is what StartupProbe measures in a fresh process.
type StartupResult struct {
	Kind Kind
	N    int
	// Accepted is the time from the start of Init until the first new
	// message was accepted (its Commit returned).
	Accepted time.Duration
	// Scheduled is the time from the start of Init until every stored
	// message was scheduled.
	Scheduled time.Duration
	// Before and After are the process's memory before Init and once
	// everything is scheduled (after a garbage collection that returns
	// freed memory to the OS).
	Before, After MemStatus
}

// RSSPerMessage is the growth of resident memory per queued message.
func (r StartupResult) RSSPerMessage() float64 {
	if r.N == 0 {
		return 0
	}
	return float64(r.After.RSS-r.Before.RSS) / float64(r.N)
}

// AnonPerMessage is the growth of anonymous resident memory (heap) per
// queued message.
func (r StartupResult) AnonPerMessage() float64 {
	if r.N == 0 {
		return 0
	}
	return float64(r.After.RSSAnon-r.Before.RSSAnon) / float64(r.N)
}

// StartupProbe opens kind's queue on dir, which holds n generated
// messages, enqueues one new message at once and waits until the stored
// ones are scheduled. Run it in a fresh process so memory figures are the
// module's own.
func StartupProbe(kind Kind, dir string, n int) (StartupResult, error) {
	res := StartupResult{Kind: kind, N: n}
	runtime.GC()
	debug.FreeOSMemory()
	var err error
	if res.Before, err = ReadMemStatus("self"); err != nil {
		return res, err
	}
	start := time.Now()
	q, err := OpenQueue(kind, dir, QueueOptions{})
	if err != nil {
		return res, err
	}
	defer q.Close()
	if err := Enqueue(context.Background(), q.Target, "startup-probe", MsgSpec{BodySize: 4096, Rcpts: 1}, Body(4096)); err != nil {
		return res, fmt.Errorf("first enqueue: %w", err)
	}
	res.Accepted = time.Since(start)
	q.WaitLoaded()
	res.Scheduled = time.Since(start)
	// maddy's Init returned only after loading, so its scheduling ended
	// before the first enqueue.
	if q.InitTook < res.Scheduled && kind == Maddy {
		res.Scheduled = q.InitTook
	}
	q.Null.WaitDelivered(1, 30*time.Second)
	runtime.GC()
	debug.FreeOSMemory()
	if res.After, err = ReadMemStatus("self"); err != nil {
		return res, err
	}
	return res, nil
}
