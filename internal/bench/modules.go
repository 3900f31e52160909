// Package bench measures target.spool against maddy's own target.queue:
// both are built through maddy's module registry with identical
// configuration and an identical in-memory nested target (bench.null), and
// driven through module.DeliveryTarget exactly as maddy's SMTP endpoint
// drives them. It also holds the disk probes, the generators that write a
// queue straight into each module's on-disk format, and the end-to-end
// driver that runs the real maddy binary. cmd/spool-bench runs it all.
package bench

import (
	"fmt"
	"io"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/foxcpp/maddy/framework/config"
	"github.com/foxcpp/maddy/framework/module"

	// target.queue and the rest of maddy's modules.
	_ "github.com/foxcpp/maddy"

	spool "github.com/maddy-spool/spool/internal/target/queue"
)

// Kind names one of the queue configurations under test.
type Kind string

const (
	// Maddy is maddy 0.8.1's built-in target.queue, the anchor.
	Maddy Kind = "maddy"
	// Spool is target.spool on its default, embedded store.
	Spool Kind = "spool"
	// SpoolPG is target.spool on the shared PostgreSQL store
	// (store postgres { dsn ...; node ... }).
	SpoolPG Kind = "spool-pg"
)

// Kinds lists the configurations in the order they are measured in each
// round.
var Kinds = []Kind{Maddy, Spool, SpoolPG}

// ModName is the name the module registers under in maddy.
func (k Kind) ModName() string {
	if k == Spool || k == SpoolPG {
		return spool.ModName
	}
	return "target.queue"
}

// InDatabase reports whether the kind keeps its queue in PostgreSQL: its
// location is then a DSN, not a directory.
func (k Kind) InDatabase() bool { return k == SpoolPG }

// QueueOptions are the directives set identically on every module, and
// the PostgreSQL store's own.
type QueueOptions struct {
	// MaxParallelism is max_parallelism (deliveries at once); default 16.
	MaxParallelism int
	// Node is the store's node name (SpoolPG only; default "bench").
	Node string
	// Lease is the store's lease (SpoolPG only; default: the module's).
	Lease time.Duration
	// Null, if set, is the nested target instead of a new one: several
	// queues (nodes sharing one database) can deliver to one null target,
	// which then counts for all of them. The caller releases it.
	Null *NullTarget
	// TrackIDs makes a new null target count deliveries per Message-ID,
	// so that duplicates can be told (NullTarget.Duplicates).
	TrackIDs bool
}

// Queue is one instance of a queue module, with the null target behind it.
type Queue struct {
	Kind Kind
	// Dir is the queue's directory, or for SpoolPG its DSN.
	Dir    string
	Target module.DeliveryTarget
	Null   *NullTarget
	// InitTook is how long the module's Init took.
	InitTook time.Duration

	mod     module.Module
	ownNull bool
}

var instanceSeq atomic.Int64

// OpenQueue builds the module through maddy's registry with a config block
// built in code:
//
//	target.queue|target.spool bench_N {
//	    location DIR                       # maddy, spool
//	    hostname bench.example
//	    max_parallelism P
//	    target bench.null bench_N
//	    store postgres {                   # spool-pg
//	        dsn DSN
//	        node NODE
//	        lease LEASE                    # if opts.Lease is set
//	    }
//	}
//
// loc is the queue's directory, or for SpoolPG the DSN of its database.
func OpenQueue(kind Kind, loc string, opts QueueOptions) (*Queue, error) {
	if opts.MaxParallelism == 0 {
		opts.MaxParallelism = 16
	}
	if opts.Node == "" {
		opts.Node = "bench"
	}
	factory := module.Get(kind.ModName())
	if factory == nil {
		return nil, fmt.Errorf("bench: module %s is not registered", kind.ModName())
	}
	inst := "bench_" + strconv.FormatInt(instanceSeq.Add(1), 10)
	null, ownNull := opts.Null, false
	if null == nil {
		null, ownNull = NewNullTarget(inst), true
		if opts.TrackIDs {
			null.TrackIDs()
		}
	}
	release := func() {
		if ownNull {
			null.Release()
		}
	}
	mod, err := factory(kind.ModName(), inst, nil, nil)
	if err != nil {
		release()
		return nil, err
	}
	line := 1
	dir := func(name string, args ...string) config.Node {
		line++
		return config.Node{Name: name, Args: args, File: "spool-bench", Line: line}
	}
	var children []config.Node
	if !kind.InDatabase() {
		children = append(children, dir("location", loc))
	}
	children = append(children,
		dir("hostname", "bench.example"),
		dir("max_parallelism", strconv.Itoa(opts.MaxParallelism)),
		dir("target", NullModName, null.key))
	if kind.InDatabase() {
		st := dir("store", "postgres")
		st.Children = []config.Node{dir("dsn", loc), dir("node", opts.Node)}
		if opts.Lease > 0 {
			st.Children = append(st.Children, dir("lease", opts.Lease.String()))
		}
		children = append(children, st)
	}
	node := config.Node{Name: kind.ModName(), Args: []string{inst}, File: "spool-bench", Line: 1, Children: children}
	start := time.Now()
	if err := mod.Init(config.NewMap(map[string]interface{}{}, node)); err != nil {
		release()
		return nil, fmt.Errorf("bench: %s Init: %w", kind.ModName(), err)
	}
	took := time.Since(start)
	target, ok := mod.(module.DeliveryTarget)
	if !ok {
		release()
		return nil, fmt.Errorf("bench: %s is not a delivery target", kind.ModName())
	}
	return &Queue{Kind: kind, Dir: loc, Target: target, Null: null, InitTook: took, mod: mod, ownNull: ownNull}, nil
}

// WaitLoaded blocks until every stored message is scheduled. maddy's Init
// loads the queue before returning, so for it this returns at once.
func (q *Queue) WaitLoaded() {
	if s, ok := q.mod.(*spool.Queue); ok {
		s.WaitLoaded()
	}
}

// Close closes the module and forgets its null target (unless it was
// given in QueueOptions.Null).
func (q *Queue) Close() error {
	if q.ownNull {
		defer q.Null.Release()
	}
	if c, ok := q.mod.(io.Closer); ok {
		return c.Close()
	}
	return nil
}
