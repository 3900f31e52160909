// Package queue implements target.spool, a maddy delivery target that keeps
// each message on disk and delivers it to a nested target (usually
// target.remote), retrying per recipient until every recipient is delivered
// or has failed, and telling the sender what happened through DSNs.
//
// The package is the module glue; each concern has its own package:
//
//	store     on-disk storage and its durability contract
//	schedule  retry policy and the scheduler that dispatches due messages
//	attempt   one delivery attempt and how failures map to recipients
//	metrics   Prometheus metrics
//	admin     operator operations, views and the control socket
//	migrate   import of maddy target.queue directories
//	internal/dsn  the delivery status notification format
//
// In this package: enqueue.go accepts mail, deliver.go runs attempts and
// settles their outcome, report.go decides and sends DSNs, admin.go
// applies operator changes, freespace.go guards the disk, config.go reads
// the configuration.
//
// A message is accepted (Body or BodyNonAtomic returns nil) only once the
// store has made it durable; Commit then schedules it. See the store
// package for what survives a crash.
package queue

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/foxcpp/maddy/framework/config"
	"github.com/foxcpp/maddy/framework/log"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// ModName is the name target.spool registers under. maddy's own
// target.queue stays available next to it.
const ModName = "target.spool"

// DefaultAdminSocket is the control socket's file name in maddy's
// runtime directory, shared by every target.spool instance of a server.
const DefaultAdminSocket = "spool.sock"

// Queue is a target.spool instance.
type Queue struct {
	name     string
	location string
	Log      log.Logger

	cfg    settings
	target module.DeliveryTarget
	// bounce delivers DSNs; nil when no bounce {} block is configured.
	bounce module.DeliveryTarget

	store store.Store
	sched *schedule.Scheduler
	clock schedule.Clock
	rand  func() float64

	messages, recipients, held atomic.Int64

	// receiving holds the messages stored but not yet committed or
	// aborted (see receiving.go).
	receiving     receivingSet
	receivingDone chan struct{}
	// receivingCheckEvery overrides receivingCheckInterval (tests).
	receivingCheckEvery time.Duration
	// onReceivingRemoved, if set, is called after an uncommitted message
	// was removed (tests).
	onReceivingRemoved func(store.ID)

	// opMu serialises operator changes (see admin.go); opStateMu guards
	// waiters.
	opMu      sync.Mutex
	opStateMu sync.Mutex
	waiters   map[store.ID]chan struct{}

	// stopping is done once Close has begun: no attempt starts, and
	// waits for a retry of a failed save end.
	stopping       context.Context
	stopDispatch   context.CancelFunc
	attemptCtx     context.Context
	cancelAttempts context.CancelFunc
	runDone        chan struct{}
	loadDone       chan struct{}
	unregister     func()
	unregisterAdm  func()
	closeOnce      sync.Once

	// diskFree, if set, replaces statfs for the free-space check (tests).
	diskFree func(path string) (uint64, error)

	// onAttemptDone, if set, is called after each attempt has saved its
	// outcome; tests use it to wait without sleeping.
	onAttemptDone func(store.ID)
}

// New creates an unconfigured target.spool instance; maddy calls Init next.
// The one inline argument, if given, is the queue location.
func New(_, instName string, _, inlineArgs []string) (module.Module, error) {
	q := &Queue{
		name:  instName,
		Log:   log.Logger{Name: ModName},
		clock: schedule.SystemClock{},
		rand:  rand.Float64,
	}
	switch len(inlineArgs) {
	case 0:
	case 1:
		q.location = inlineArgs[0]
	default:
		return nil, fmt.Errorf("%s: at most one inline argument (the location) is accepted, got %d", ModName, len(inlineArgs))
	}
	return q, nil
}

func init() {
	module.Register(ModName, New)
}

func (q *Queue) Name() string         { return ModName }
func (q *Queue) InstanceName() string { return q.name }

// Init reads the configuration, opens the store and starts delivering.
func (q *Queue) Init(cfg *config.Map) error {
	if err := q.configure(cfg); err != nil {
		return err
	}
	if q.bounce == nil {
		q.Log.Printf("no bounce {} block: senders will not be told about failed deliveries (counted in maddy_spool_dsn_not_sent_total)")
	}
	st, err := store.OpenDir(q.location, store.DirOptions{
		OnQuarantine: q.onQuarantine,
		OnFailed:     q.onStoreFailed,
		Logf:         q.Log.Printf,
	})
	if err != nil {
		return fmt.Errorf("%s (%s:%d): location %s: %w", ModName, cfg.Block.File, cfg.Block.Line, q.location, err)
	}
	if err := q.start(st); err != nil {
		return err
	}
	if q.cfg.adminSocket != "" {
		unreg, err := admin.Register(q.cfg.adminSocket, q.label(), q, q.logAdmin)
		if err != nil {
			q.Close()
			return fmt.Errorf("%s (%s:%d): %w (set admin_socket to another path, or off)", ModName, cfg.Block.File, cfg.Block.Line, err)
		}
		q.unregisterAdm = unreg
	}
	return nil
}

// start runs the queue on st: it accepts new mail at once and loads the
// schedule of the stored messages in the background, so a large queue does
// not delay the server's start.
func (q *Queue) start(st store.Store) error {
	q.store = st
	q.sched = schedule.New(q.clock)
	q.waiters = map[store.ID]chan struct{}{}
	q.stopping, q.stopDispatch = context.WithCancel(context.Background())
	q.attemptCtx, q.cancelAttempts = context.WithCancel(context.Background())
	q.runDone = make(chan struct{})
	q.loadDone = make(chan struct{})
	metrics.InitSeries(q.label())
	q.unregister = metrics.Register(q.label(), q)

	// Taken before any new mail can arrive: the load covers exactly the
	// messages stored before this start. Those stored later belong to
	// their sessions until Commit schedules them (see admin.go), so none
	// is counted or scheduled twice, or before it is committed.
	loadUpTo := st.LastID()
	go func() {
		defer close(q.loadDone)
		q.loadSchedule(loadUpTo)
	}()
	q.receivingDone = make(chan struct{})
	go func() {
		defer close(q.receivingDone)
		every := q.receivingCheckEvery
		if every <= 0 {
			every = receivingCheckInterval
		}
		q.expireReceiving(every)
	}()
	go func() {
		defer close(q.runDone)
		q.sched.Run(q.stopping, q.cfg.maxParallelism, func(id store.ID, delivered func()) {
			q.attempt(id, delivered)
			if q.onAttemptDone != nil {
				q.onAttemptDone(id)
			}
		})
	}()
	return nil
}

// errLoaded ends the start-up scan at the last message it covers.
var errLoaded = errors.New("loaded")

// loadSchedule counts and schedules the stored messages with IDs up to
// last.
func (q *Queue) loadSchedule(last store.ID) {
	start := time.Now()
	n := 0
	err := q.store.Schedule(func(e store.SchedEntry) error {
		if e.ID > last {
			return errLoaded // Schedule goes in ID order
		}
		n++
		q.messages.Add(1)
		q.recipients.Add(int64(e.Pending))
		if e.Held {
			q.held.Add(1)
			return nil
		}
		q.sched.Add(e.ID, e.NextAttempt)
		return nil
	})
	if err != nil && !errors.Is(err, errLoaded) {
		q.Log.Error("loading the queue failed; entries not yet loaded will be picked up on restart", err, "loaded", n)
		return
	}
	q.Log.Debugf("scheduled %d queued messages in %v", n, time.Since(start))
}

// WaitLoaded blocks until the stored messages have been scheduled.
func (q *Queue) WaitLoaded() { <-q.loadDone }

// Close stops starting attempts, lets attempts in flight finish for up to
// shutdown_timeout (then cancels them: their recipients keep the state they
// had and are retried after restart), and closes the store.
func (q *Queue) Close() error {
	var err error
	q.closeOnce.Do(func() {
		if q.unregisterAdm != nil {
			q.unregisterAdm()
		}
		q.stopDispatch()
		<-q.loadDone
		select {
		case <-q.runDone:
		case <-time.After(q.cfg.shutdownTimeout):
			q.Log.Printf("attempts still running after %v, cancelling them", q.cfg.shutdownTimeout)
			q.cancelAttempts()
			<-q.runDone
		}
		q.cancelAttempts()
		<-q.receivingDone
		// Sessions still between Body and Commit cannot be told their
		// message was accepted: a Commit after this fails (receiving.go).
		for _, id := range q.receiving.takeStoredBefore(time.Unix(1<<62, 0)) {
			q.removeUncommitted(context.Background(), id)
		}
		q.unregister()
		err = q.store.Close()
	})
	return err
}

// Gauges implements metrics.Source.
func (q *Queue) Gauges() metrics.Gauges {
	g := metrics.Gauges{
		Messages:    q.messages.Load(),
		Recipients:  q.recipients.Load(),
		Held:        q.held.Load(),
		Now:         q.clock.Now(),
		MinFree:     q.cfg.minFreeSpace,
		StoreFailed: q.store.Failed() != nil,
	}
	if free, err := q.freeSpace(); err == nil {
		g.FreeBytes, g.HaveFree = free, true
	}
	if oldest, ok, err := q.store.Oldest(); err == nil && ok {
		g.Oldest = oldest
	}
	return g
}

// onQuarantine counts and logs an entry the store moved aside; the one
// place where a quarantined message leaves the queue's gauges.
func (q *Queue) onQuarantine(id store.ID, sched *store.SchedEntry, reason error) {
	metrics.Quarantined.WithLabelValues(q.label()).Inc()
	q.Log.Error("queue entry moved to quarantine", reason, "queue_id", id.String())
	if sched != nil {
		q.messages.Add(-1)
		q.recipients.Add(-int64(sched.Pending))
		if sched.Held {
			q.held.Add(-1)
		}
	}
}

// onStoreFailed stops delivery once the store has stopped after a write
// whose durability is unknown (a failed fsync): going on from such a state
// could lose or repeat mail. New mail is refused by Body from now on, and
// only a restart, which reads what really is on disk, recovers.
func (q *Queue) onStoreFailed(err error) {
	q.Log.Error("queue storage failed: refusing new mail and stopping delivery until maddy is restarted", err)
	q.stopDispatch()
}

// label is the instance's "module" label in metrics. Inline definitions
// have no instance name, so their location tells them apart.
func (q *Queue) label() string {
	if q.name != "" {
		return q.name
	}
	return "inline:" + q.location
}
