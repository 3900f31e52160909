// Package metrics defines target.spool's Prometheus metrics. They live on
// the default registry, which maddy's openmetrics endpoint serves, and carry
// a "module" label with the target.spool instance name.
package metrics

import (
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Attempt results, per recipient.
const (
	ResultDelivered = "delivered"
	ResultTemporary = "temporary"
	ResultPermanent = "permanent"
)

var (
	// Attempts counts delivery attempts per recipient by result.
	Attempts = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "maddy_spool_attempts_total",
		Help: "Delivery attempts per recipient, by result (delivered, temporary, permanent).",
	}, []string{"module", "result"})

	// AttemptDuration observes how long one attempt (one transaction with
	// the nested target) takes.
	AttemptDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "maddy_spool_attempt_duration_seconds",
		Help:    "Duration of one delivery attempt to the nested target.",
		Buckets: []float64{0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300},
	}, []string{"module"})

	// DSNs counts delivery status notifications handed to the bounce
	// pipeline, by action (failed, delayed, delivered, relayed).
	DSNs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "maddy_spool_dsn_generated_total",
		Help: "Delivery status notifications generated, by action.",
	}, []string{"module", "action"})

	// DSNsNotSent counts reports that were owed but not sent, by reason
	// (no_bounce_pipeline, error, null_sender).
	DSNsNotSent = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "maddy_spool_dsn_not_sent_total",
		Help: "Delivery status notifications owed but not sent, by reason.",
	}, []string{"module", "reason"})

	// Quarantined counts entries moved aside as unreadable.
	Quarantined = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "maddy_spool_quarantined_total",
		Help: "Queue entries moved to quarantine because they could not be read.",
	}, []string{"module"})

	// Enqueued counts messages accepted into the queue.
	Enqueued = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "maddy_spool_enqueued_total",
		Help: "Messages durably accepted into the queue.",
	}, []string{"module"})

	// EnqueueFailures counts messages the queue refused, by reason
	// (ReasonStoreError, ReasonMinFreeSpace, ReasonNotCommitted).
	EnqueueFailures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "maddy_spool_enqueue_failures_total",
		Help: "Messages refused with a temporary error because the queue could not or would not store them, by reason.",
	}, []string{"module", "reason"})

	// AdminOperations counts operator commands that changed the queue, by
	// operation (hold, release, retry, delete, bounce, import).
	AdminOperations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "maddy_spool_admin_operations_total",
		Help: "Operator commands that changed the queue, by operation.",
	}, []string{"module", "op"})

	// StoreErrors counts calls of the delivery side that the store
	// failed, by what was asked (StoreClaim, StoreSave, StoreRenew): the
	// disk of the embedded store, or the database of a shared one.
	StoreErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "maddy_spool_store_errors_total",
		Help: "Store calls of the delivery side that failed (claiming due messages, saving outcomes, renewing leases), by call.",
	}, []string{"module", "op"})
)

// Calls counted by StoreErrors.
const (
	StoreClaim = "claim"
	StoreSave  = "save"
	StoreRenew = "renew"
)

// Reasons for EnqueueFailures.
const (
	ReasonStoreError   = "store_error"
	ReasonMinFreeSpace = "min_free_space"
	// ReasonNotCommitted: stored, but neither committed nor aborted by
	// the pipeline in time, so removed (the client was not told it was
	// accepted).
	ReasonNotCommitted = "not_committed"
)

// Reasons for DSNsNotSent.
const (
	ReasonNullSender       = "null_sender"
	ReasonNoBouncePipeline = "no_bounce_pipeline"
	ReasonReportError      = "error"
)

// Label values known in advance, so that every series exists from the
// start at zero: a rate() or increase() over a series that appears with
// its first event misses that event, and alerts would fire late.
var (
	results       = []string{ResultDelivered, ResultTemporary, ResultPermanent}
	dsnActions    = []string{"failed", "delayed", "delivered", "relayed"}
	notSentReason = []string{ReasonNullSender, ReasonNoBouncePipeline, ReasonReportError}
	enqueueReason = []string{ReasonStoreError, ReasonMinFreeSpace, ReasonNotCommitted}
	adminOps      = []string{"hold", "release", "retry", "delete", "bounce"}
	storeOps      = []string{StoreClaim, StoreSave, StoreRenew}
)

// InitSeries creates every labelled series of an instance at zero.
func InitSeries(module string) {
	for _, r := range results {
		Attempts.WithLabelValues(module, r)
	}
	for _, a := range dsnActions {
		DSNs.WithLabelValues(module, a)
	}
	for _, r := range notSentReason {
		DSNsNotSent.WithLabelValues(module, r)
	}
	for _, r := range enqueueReason {
		EnqueueFailures.WithLabelValues(module, r)
	}
	for _, op := range adminOps {
		AdminOperations.WithLabelValues(module, op)
	}
	for _, op := range storeOps {
		StoreErrors.WithLabelValues(module, op)
	}
	AttemptDuration.WithLabelValues(module)
	Quarantined.WithLabelValues(module)
	Enqueued.WithLabelValues(module)
}

// Gauges are a queue's current figures, read at scrape time.
type Gauges struct {
	// Queue has the figures of the whole queue. A node of a shared queue
	// leaves it nil unless it is the one node reporting them, so that a
	// sum over nodes counts each message once.
	Queue *QueueFigures
	// InFlight is the number of attempts in flight on this node.
	InFlight int64
	Now      time.Time
	// FreeBytes is the space available under the queue location; HaveFree
	// is false when it could not be read (or the store is not local).
	FreeBytes uint64
	HaveFree  bool
	// MinFree is the configured refusal margin (0: disabled).
	MinFree uint64
	// StoreFailed is set once the store stopped after a failed write
	// whose durability is unknown; only a restart clears it.
	StoreFailed bool
	// Suspended lists the destinations suspended as dead on this node.
	Suspended []string
	// DestinationInFlight is the attempts in flight on this node per
	// destination.
	DestinationInFlight map[string]int
}

// Label cardinality bounds: a queue can have any number of destinations,
// and a metric series per destination would grow without bound. Only
// suspended destinations (at most MaxSuspendedSeries, the rest summed
// in the count) and the MaxInFlightSeries busiest destinations (the rest
// under destination="other") get a series.
const (
	MaxSuspendedSeries = 50
	MaxInFlightSeries  = 10
	OtherDestinations  = "other"
)

// QueueFigures are the figures of a whole queue.
type QueueFigures struct {
	Messages   int64
	Recipients int64
	Held       int64
	// Oldest is the arrival of the oldest queued message (zero if none).
	Oldest time.Time
}

// Source reports a queue's gauges.
type Source interface {
	Gauges() Gauges
}

var (
	messagesDesc = prometheus.NewDesc("maddy_spool_messages_queued",
		"Messages in the queue (including held).", []string{"module"}, nil)
	recipientsDesc = prometheus.NewDesc("maddy_spool_recipients_queued",
		"Recipients still pending delivery.", []string{"module"}, nil)
	heldDesc = prometheus.NewDesc("maddy_spool_messages_held",
		"Messages held by an operator.", []string{"module"}, nil)
	oldestDesc = prometheus.NewDesc("maddy_spool_oldest_message_age_seconds",
		"Age of the oldest queued message (0 when the queue is empty).", []string{"module"}, nil)
	inFlightDesc = prometheus.NewDesc("maddy_spool_attempts_in_flight",
		"Delivery attempts running on this node.", []string{"module"}, nil)
	freeDesc = prometheus.NewDesc("maddy_spool_disk_free_bytes",
		"Bytes available to the server on the filesystem holding the queue.", []string{"module"}, nil)
	minFreeDesc = prometheus.NewDesc("maddy_spool_min_free_space_bytes",
		"Free space below which new mail is refused with 452 (min_free_space; 0 when disabled).", []string{"module"}, nil)
	suspendedCountDesc = prometheus.NewDesc("maddy_spool_destinations_suspended",
		"Destinations this node has suspended as dead (none of their mail is attempted until a probe succeeds).", []string{"module"}, nil)
	suspendedDesc = prometheus.NewDesc("maddy_spool_destination_suspended",
		"1 for each destination this node has suspended as dead (at most 50 series; see maddy_spool_destinations_suspended for all).", []string{"module", "destination"}, nil)
	destInFlightDesc = prometheus.NewDesc("maddy_spool_destination_attempts_in_flight",
		"Delivery attempts running on this node for the 10 busiest destinations; the others are summed under destination=\"other\".", []string{"module", "destination"}, nil)
	storeFailedDesc = prometheus.NewDesc("maddy_spool_store_failed",
		"1 once the queue's store stopped after a failed write (new mail refused, delivery stopped until a restart); else 0.", []string{"module"}, nil)
)

// gaugeCollector reports the gauges of every registered queue. One
// collector for all instances keeps registration global and lets a test
// create and close many queues with the same name.
type gaugeCollector struct {
	mu      sync.Mutex
	sources map[string]Source
}

var gauges = &gaugeCollector{sources: map[string]Source{}}

func (c *gaugeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- messagesDesc
	ch <- recipientsDesc
	ch <- heldDesc
	ch <- oldestDesc
	ch <- inFlightDesc
	ch <- freeDesc
	ch <- minFreeDesc
	ch <- storeFailedDesc
	ch <- suspendedCountDesc
	ch <- suspendedDesc
	ch <- destInFlightDesc
}

func (c *gaugeCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	srcs := make(map[string]Source, len(c.sources))
	for k, v := range c.sources {
		srcs[k] = v
	}
	c.mu.Unlock()
	for name, src := range srcs {
		g := src.Gauges()
		if q := g.Queue; q != nil {
			age := 0.0
			if !q.Oldest.IsZero() {
				age = g.Now.Sub(q.Oldest).Seconds()
			}
			ch <- prometheus.MustNewConstMetric(messagesDesc, prometheus.GaugeValue, float64(q.Messages), name)
			ch <- prometheus.MustNewConstMetric(recipientsDesc, prometheus.GaugeValue, float64(q.Recipients), name)
			ch <- prometheus.MustNewConstMetric(heldDesc, prometheus.GaugeValue, float64(q.Held), name)
			ch <- prometheus.MustNewConstMetric(oldestDesc, prometheus.GaugeValue, age, name)
		}
		ch <- prometheus.MustNewConstMetric(inFlightDesc, prometheus.GaugeValue, float64(g.InFlight), name)
		if g.HaveFree {
			ch <- prometheus.MustNewConstMetric(freeDesc, prometheus.GaugeValue, float64(g.FreeBytes), name)
		}
		ch <- prometheus.MustNewConstMetric(minFreeDesc, prometheus.GaugeValue, float64(g.MinFree), name)
		failed := 0.0
		if g.StoreFailed {
			failed = 1
		}
		ch <- prometheus.MustNewConstMetric(storeFailedDesc, prometheus.GaugeValue, failed, name)
		ch <- prometheus.MustNewConstMetric(suspendedCountDesc, prometheus.GaugeValue, float64(len(g.Suspended)), name)
		for i, dest := range g.Suspended {
			if i == MaxSuspendedSeries {
				break
			}
			ch <- prometheus.MustNewConstMetric(suspendedDesc, prometheus.GaugeValue, 1, name, dest)
		}
		for dest, n := range TopInFlight(g.DestinationInFlight) {
			ch <- prometheus.MustNewConstMetric(destInFlightDesc, prometheus.GaugeValue, float64(n), name, dest)
		}
	}
}

// Register makes src's gauges visible under the instance name; the
// returned function removes them (only if src is still the one registered).
func Register(name string, src Source) (unregister func()) {
	gauges.mu.Lock()
	gauges.sources[name] = src
	gauges.mu.Unlock()
	return func() {
		gauges.mu.Lock()
		if gauges.sources[name] == src {
			delete(gauges.sources, name)
		}
		gauges.mu.Unlock()
	}
}

func init() {
	prometheus.MustRegister(Attempts, AttemptDuration, DSNs, DSNsNotSent, Quarantined, Enqueued, EnqueueFailures, AdminOperations, StoreErrors, gauges)
}

// TopInFlight keeps the MaxInFlightSeries destinations with the most
// attempts in flight (ties by name) and sums the rest under
// OtherDestinations, which is always present.
func TopInFlight(inflight map[string]int) map[string]int {
	dests := make([]string, 0, len(inflight))
	for d := range inflight {
		dests = append(dests, d)
	}
	sort.Slice(dests, func(i, j int) bool {
		a, b := inflight[dests[i]], inflight[dests[j]]
		if a != b {
			return a > b
		}
		return dests[i] < dests[j]
	})
	out := map[string]int{OtherDestinations: 0}
	for i, d := range dests {
		if i < MaxInFlightSeries && d != OtherDestinations {
			out[d] += inflight[d]
		} else {
			out[OtherDestinations] += inflight[d]
		}
	}
	return out
}
