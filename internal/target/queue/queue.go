// Package queue implements target.spool, a maddy delivery target that keeps
// each message on disk and delivers it to a nested target (usually
// target.remote), retrying per recipient until every recipient is delivered
// or has failed, and telling the sender what happened through DSNs.
//
// The package is the module glue; each concern has its own package:
//
//	store           the store boundary: what is kept of a message, and
//	                Backend, the interface a storage backend implements
//	                (leases, fencing, operator requests)
//	store/embedded  the default backend: bbolt and files, one process
//	store/postgres  the shared backend: PostgreSQL, several maddy nodes
//	fate            the per-recipient rules (Apply decides a recipient's
//	                fate after an attempt; which reports are owed)
//	schedule        retry policy, and the dispatcher that claims due
//	                messages from the store for a bounded set of workers
//	attempt         one delivery attempt and how failures map to recipients
//	metrics         Prometheus metrics
//	admin           operator operations, views and the control socket
//	migrate         import of maddy target.queue directories
//	internal/dsn    the delivery status notification format
//
// In this package: enqueue.go accepts mail, receiving.go times out
// messages never committed, deliver.go runs an attempt and settles its
// outcome, lease.go renews the leases of attempts in flight, report.go
// sends DSNs, admin.go applies operator changes, freespace.go guards the
// disk, config.go reads the configuration.
//
// A message is accepted (Body or BodyNonAtomic returns nil) only once the
// store has made it durable; Commit then queues it. See the store package
// for who works on a message when, and each backend for what survives a
// crash.
package queue

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/foxcpp/maddy/framework/config"
	"github.com/foxcpp/maddy/framework/log"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/target/queue/metrics"
	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
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
	// fallback takes recipients past fallback_after; nil if not set.
	fallback module.DeliveryTarget

	store store.Backend
	clock schedule.Clock
	rand  func() float64

	// flights holds the leases of the attempts in flight on this node.
	flights flightSet
	// dests keeps this node's attempts in flight and suspensions per
	// destination.
	dests *schedule.Destinations
	// receiving holds the messages stored and not yet committed or
	// aborted (see receiving.go).
	receiving receivingSet

	// stopping is done once Close has begun: no attempt starts, and
	// waits for a retry of a failed save end.
	stopping       context.Context
	stopDispatch   context.CancelFunc
	attemptCtx     context.Context
	cancelAttempts context.CancelFunc
	runDone        chan struct{}
	receivingDone  chan struct{}
	renewDone      chan struct{}
	unregister     func()
	unregisterAdm  func()
	closeOnce      sync.Once

	// diskFree, if set, replaces statfs for the free-space check (tests).
	diskFree func(path string) (uint64, error)
	// onAttemptDone, if set, is called after each attempt has saved its
	// outcome; tests use it to wait without sleeping.
	onAttemptDone func(store.ID)
	// receivingCheckEvery overrides receivingCheckInterval (tests).
	receivingCheckEvery time.Duration
	// onReceivingRemoved, if set, is called after an uncommitted message
	// was removed (tests).
	onReceivingRemoved func(store.ID)
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
	st, err := q.openStore()
	if err != nil {
		return fmt.Errorf("%s (%s:%d): %w", ModName, cfg.Block.File, cfg.Block.Line, err)
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

// openStore opens the configured backend.
func (q *Queue) openStore() (store.Backend, error) {
	if q.cfg.store.kind == storePostgres {
		return openPostgres(q)
	}
	st, err := embedded.Open(q.location, q.embeddedOptions())
	if err != nil {
		return nil, fmt.Errorf("location %s: %w", q.location, err)
	}
	return st, nil
}

// embeddedOptions are the options of the embedded store at q.location.
func (q *Queue) embeddedOptions() embedded.Options {
	return embedded.Options{
		DirOptions: embedded.DirOptions{
			OnQuarantine: func(id store.ID, _ *embedded.SchedEntry, reason error) { q.onQuarantine(id, reason) },
			OnFailed:     q.onStoreFailed,
			Logf:         q.Log.Printf,
		},
		Node:  q.cfg.store.node,
		Lease: q.cfg.store.lease,
		Now:   q.clock.Now,
	}
}

// start runs the queue on st: it accepts new mail at once, and claims due
// messages from st as they come due (the embedded store loads its
// schedule in the background, so a large queue does not delay the start).
func (q *Queue) start(st store.Backend) error {
	q.store = st
	q.stopping, q.stopDispatch = context.WithCancel(context.Background())
	q.attemptCtx, q.cancelAttempts = context.WithCancel(context.Background())
	q.runDone = make(chan struct{})
	q.receivingDone = make(chan struct{})
	q.renewDone = make(chan struct{})
	metrics.InitSeries(q.label())
	q.unregister = metrics.Register(q.label(), q)

	go func() {
		defer close(q.receivingDone)
		every := q.receivingCheckEvery
		if every <= 0 {
			every = receivingCheckInterval
		}
		q.expireReceiving(every)
	}()
	go func() {
		defer close(q.renewDone)
		q.renewLeases()
	}()
	q.dests = schedule.NewDestinations(schedule.DestinationRules{
		Limit:      min(q.cfg.perDestination, q.cfg.maxParallelism),
		DeadAfter:  q.cfg.deadAfter,
		BackoffMin: q.cfg.backoffMin,
		BackoffMax: q.cfg.backoffMax,
	}, q.clock.Now)
	go func() {
		defer close(q.runDone)
		d := &schedule.Dispatcher{
			Clock:        q.clock,
			Source:       st,
			Parallel:     q.cfg.maxParallelism,
			Destinations: q.dests,
			OnError: func(err error) {
				metrics.StoreErrors.WithLabelValues(q.label(), metrics.StoreClaim).Inc()
				q.Log.Error("cannot claim due messages from the store, will retry", err)
			},
		}
		d.Run(q.stopping, func(c store.Claim, dec schedule.Decision, delivered func()) {
			q.attempt(c, dec, delivered)
			if q.onAttemptDone != nil {
				q.onAttemptDone(c.Message.ID)
			}
		})
	}()
	return nil
}

// WaitLoaded blocks until the store has loaded what it must read at start
// (the embedded store's schedule); it returns at once for other stores.
func (q *Queue) WaitLoaded() {
	if l, ok := q.store.(interface{ WaitLoaded() }); ok {
		l.WaitLoaded()
	}
}

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
		select {
		case <-q.runDone:
		case <-time.After(q.cfg.shutdownTimeout):
			q.Log.Printf("attempts still running after %v, cancelling them", q.cfg.shutdownTimeout)
			q.cancelAttempts()
			<-q.runDone
		}
		q.cancelAttempts()
		<-q.receivingDone
		<-q.renewDone
		// Sessions still between Body and Commit cannot be told their
		// message was accepted: a Commit after this fails (receiving.go).
		for _, e := range q.receiving.takeStoredBefore(time.Unix(1<<62, 0)) {
			q.removeUncommitted(context.Background(), e.lease)
		}
		q.unregister()
		err = q.store.Close()
	})
	return err
}

// statsTimeout bounds how long a scrape waits for the store's figures.
const statsTimeout = 5 * time.Second

// Gauges implements metrics.Source.
func (q *Queue) Gauges() metrics.Gauges {
	g := metrics.Gauges{
		Now:                 q.clock.Now(),
		MinFree:             q.cfg.minFreeSpace,
		StoreFailed:         q.store.Failed() != nil,
		InFlight:            int64(q.flights.len()),
		DestinationInFlight: map[string]int{},
	}
	for dest, n := range q.dests.InFlight() {
		g.DestinationInFlight[destinationName(dest)] = n
	}
	for _, s := range q.dests.Suspended() {
		g.Suspended = append(g.Suspended, destinationName(s.Destination))
	}
	if q.cfg.store.kind == storeEmbedded {
		if free, err := q.freeSpace(); err == nil {
			g.FreeBytes, g.HaveFree = free, true
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), statsTimeout)
	defer cancel()
	if r, ok := q.store.(clusterReporter); !ok || r.ReportsCluster(ctx) {
		if st, err := q.store.Stats(ctx); err == nil {
			g.Queue = &metrics.QueueFigures{Messages: st.Messages, Recipients: st.Recipients, Held: st.Held, Oldest: st.Oldest}
		}
	}
	return g
}

// clusterReporter is a shared backend that names one node to export the
// whole queue's figures, so that a sum over nodes counts each message
// once.
type clusterReporter interface {
	ReportsCluster(ctx context.Context) bool
}

// onQuarantine counts and logs an entry the store moved aside.
func (q *Queue) onQuarantine(id store.ID, reason error) {
	metrics.Quarantined.WithLabelValues(q.label()).Inc()
	q.Log.Error("queue entry moved to quarantine", reason, "queue_id", id.String())
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
