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

// Kind names one of the two queue modules under test.
type Kind string

const (
	// Maddy is maddy 0.8.1's built-in target.queue, the anchor.
	Maddy Kind = "maddy"
	// Spool is target.spool.
	Spool Kind = "spool"
)

// Kinds lists both modules in the order they are measured in each round.
var Kinds = []Kind{Maddy, Spool}

// ModName is the name the module registers under in maddy.
func (k Kind) ModName() string {
	if k == Spool {
		return spool.ModName
	}
	return "target.queue"
}

// QueueOptions are the directives set identically on both modules.
type QueueOptions struct {
	// MaxParallelism is max_parallelism (deliveries at once); default 16.
	MaxParallelism int
}

// Queue is one instance of a queue module, with the null target behind it.
type Queue struct {
	Kind   Kind
	Dir    string
	Target module.DeliveryTarget
	Null   *NullTarget
	// InitTook is how long the module's Init took.
	InitTook time.Duration

	mod module.Module
}

var instanceSeq atomic.Int64

// OpenQueue builds the module through maddy's registry with a config block
// built in code:
//
//	target.queue|target.spool bench_N {
//	    location DIR
//	    hostname bench.example
//	    max_parallelism P
//	    target bench.null bench_N
//	}
func OpenQueue(kind Kind, dir string, opts QueueOptions) (*Queue, error) {
	if opts.MaxParallelism == 0 {
		opts.MaxParallelism = 16
	}
	factory := module.Get(kind.ModName())
	if factory == nil {
		return nil, fmt.Errorf("bench: module %s is not registered", kind.ModName())
	}
	inst := "bench_" + strconv.FormatInt(instanceSeq.Add(1), 10)
	null := NewNullTarget(inst)
	mod, err := factory(kind.ModName(), inst, nil, nil)
	if err != nil {
		null.Release()
		return nil, err
	}
	node := config.Node{
		Name: kind.ModName(),
		Args: []string{inst},
		File: "spool-bench",
		Line: 1,
		Children: []config.Node{
			{Name: "location", Args: []string{dir}, File: "spool-bench", Line: 2},
			{Name: "hostname", Args: []string{"bench.example"}, File: "spool-bench", Line: 3},
			{Name: "max_parallelism", Args: []string{strconv.Itoa(opts.MaxParallelism)}, File: "spool-bench", Line: 4},
			{Name: "target", Args: []string{NullModName, inst}, File: "spool-bench", Line: 5},
		},
	}
	start := time.Now()
	if err := mod.Init(config.NewMap(map[string]interface{}{}, node)); err != nil {
		null.Release()
		return nil, fmt.Errorf("bench: %s Init: %w", kind.ModName(), err)
	}
	took := time.Since(start)
	target, ok := mod.(module.DeliveryTarget)
	if !ok {
		null.Release()
		return nil, fmt.Errorf("bench: %s is not a delivery target", kind.ModName())
	}
	return &Queue{Kind: kind, Dir: dir, Target: target, Null: null, InitTook: took, mod: mod}, nil
}

// WaitLoaded blocks until every stored message is scheduled. maddy's Init
// loads the queue before returning, so for it this returns at once.
func (q *Queue) WaitLoaded() {
	if s, ok := q.mod.(*spool.Queue); ok {
		s.WaitLoaded()
	}
}

// Close closes the module and forgets its null target.
func (q *Queue) Close() error {
	defer q.Null.Release()
	if c, ok := q.mod.(io.Closer); ok {
		return c.Close()
	}
	return nil
}
