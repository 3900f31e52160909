// Command spool-bench measures target.spool, on its embedded store and on
// its PostgreSQL store, against maddy 0.8.1's target.queue in one run,
// alternating them (maddy, spool, spool-pg, maddy, ...), and prints a
// table of the figures and their ratios. See docs/performance.md.
//
//	spool-bench -quick                  # about 2 minutes
//	spool-bench                         # the full run
//	spool-bench -sections enqueue,disk  # some sections only
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/foxcpp/maddy/framework/log"

	"github.com/maddy-spool/spool/internal/bench"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

type options struct {
	dir       string
	rounds    int
	duration  time.Duration
	senders   []int
	sizes     []int
	rcpts     []int
	backlog   int
	backBody  int
	scale     int
	dispatchN int
	timeout   time.Duration
	sections  map[string]bool
	kinds     []bench.Kind
	probeTime time.Duration
	e2eN      int
	e2eConns  int
	e2eQueued []int
	keep      bool
	maddyBin  string
	// dispatchPar is max_parallelism in the dispatch section.
	dispatchPar int
	// nodes is the number of nodes sharing one database in the
	// multi-node figures of spool-pg.
	nodes int
	// pgSettings are extra postgresql.conf lines.
	pgSettings []string
	// takeoverLease is the lease of the takeover section, and
	// takeoverN the messages sent in it.
	takeoverLease time.Duration
	takeoverN     int
	// pgStatements lists the costliest statements of each section.
	pgStatements bool
	// destN is the messages of each destinations load, destSlowDelay
	// the slow domain's time per RCPT, destOutage how long the dead
	// domain refuses, and destBaseline how long the other mail trickles
	// before the outage.
	destN         int
	destSlowDelay time.Duration
	destOutage    time.Duration
	destBaseline  time.Duration
}

var allSections = []string{"disk", "enqueue", "backlog", "startup", "scale", "dispatch", "e2e", "takeover", "destinations"}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "child-startup" {
		os.Exit(childStartup(os.Args[2:]))
	}
	os.Exit(run())
}

func run() int {
	// maddy's packages register flags of their own on the default set;
	// none of them apply here.
	flag.CommandLine = flag.NewFlagSet(os.Args[0], flag.ExitOnError)
	var (
		o          options
		quick      bool
		sendersF   = flag.String("senders", "1,16,64", "concurrent senders for the enqueue matrix")
		sizesF     = flag.String("sizes", "4096,1048576", "body sizes (bytes) for the enqueue matrix")
		rcptsF     = flag.String("rcpts", "1,10", "recipients per message for the enqueue matrix")
		sectionsF  = flag.String("sections", strings.Join(allSections, ","), "sections to run: "+strings.Join(allSections, ","))
		onlyF      = flag.String("only", "maddy,spool,spool-pg", "configurations to measure")
		pgSetF     = flag.String("pg-settings", "", "extra postgresql.conf lines for the spool-pg cluster, separated by ';' (e.g. \"synchronous_commit = off\"); default: PostgreSQL's defaults, fsync on")
		queuedF    = flag.String("e2e-queued", "0,10000,100000", "end-to-end: messages already queued, per variant")
		cpuprofile = flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
		debugLog   = flag.Bool("log", false, "show the modules' log output (discarded by default)")
	)
	flag.StringVar(&o.dir, "dir", "", "directory for the queues (default: a new one under $TMPDIR); every queue gets a fresh subdirectory on this disk")
	flag.IntVar(&o.rounds, "rounds", 2, "rounds per figure (each round measures maddy, then spool)")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "length of each timed enqueue load")
	flag.IntVar(&o.backlog, "backlog", 100000, "messages already queued for the backlog, startup and end-to-end sections")
	flag.IntVar(&o.backBody, "backlog-body", 1024, "body size (bytes) of generated queued messages")
	flag.IntVar(&o.scale, "scale", 1000000, "messages queued for the Spool-only scale section")
	flag.IntVar(&o.dispatchN, "dispatch", 100000, "messages due at once for the dispatch section")
	flag.IntVar(&o.dispatchPar, "dispatch-parallelism", 16, "max_parallelism in the dispatch section")
	flag.IntVar(&o.nodes, "nodes", 3, "spool-pg: nodes sharing one database in the multi-node figures (dispatch, end-to-end, takeover)")
	flag.DurationVar(&o.takeoverLease, "takeover-lease", 10*time.Second, "spool-pg: the store's lease in the takeover section (10s is the shortest accepted)")
	flag.IntVar(&o.takeoverN, "takeover-messages", 200, "spool-pg: messages sent in each takeover measurement")
	flag.BoolVar(&o.pgStatements, "pg-statements", false, "spool-pg: load pg_stat_statements and print each section's costliest statements (a diagnosis: it costs the server a little)")
	flag.DurationVar(&o.timeout, "timeout", 3*time.Minute, "bound on each wait (drain, dispatch); a figure that hits it is marked")
	flag.DurationVar(&o.probeTime, "probe-duration", 3*time.Second, "length of each disk probe")
	flag.IntVar(&o.e2eN, "e2e-messages", 3000, "end-to-end: messages per measurement")
	flag.IntVar(&o.e2eConns, "e2e-clients", 16, "end-to-end: concurrent SMTP clients")
	flag.StringVar(&o.maddyBin, "maddy-bin", "", "end-to-end: maddy binary to run (default: go build ./cmd/maddy of this source tree)")
	flag.IntVar(&o.destN, "dest-messages", 2000, "destinations: messages of each load (slow destination, dead destination)")
	flag.DurationVar(&o.destSlowDelay, "dest-slow-delay", 5*time.Second, "destinations: the slow domain's time to answer each RCPT")
	flag.DurationVar(&o.destOutage, "dest-outage", 2*time.Minute, "destinations: how long the dead domain refuses")
	flag.DurationVar(&o.destBaseline, "dest-baseline", 10*time.Second, "destinations: how long the other mail trickles before the outage (its baseline latency)")
	flag.BoolVar(&o.keep, "keep", false, "keep the queue directories")
	flag.BoolVar(&quick, "quick", false, "small sizes and counts, about 2 minutes")
	flag.Parse()

	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if quick {
		quickDefault := func(name string, apply func()) {
			if !set[name] {
				apply()
			}
		}
		quickDefault("duration", func() { o.duration = 300 * time.Millisecond })
		quickDefault("backlog", func() { o.backlog = 5000 })
		quickDefault("scale", func() { o.scale = 50000 })
		quickDefault("dispatch", func() { o.dispatchN = 5000 })
		quickDefault("probe-duration", func() { o.probeTime = 500 * time.Millisecond })
		quickDefault("e2e-messages", func() { o.e2eN = 300 })
		quickDefault("e2e-queued", func() { *queuedF = "0,5000" })
		quickDefault("timeout", func() { o.timeout = 30 * time.Second })
		quickDefault("dest-messages", func() { o.destN = 300 })
		quickDefault("dest-outage", func() { o.destOutage = 30 * time.Second })
		quickDefault("dest-baseline", func() { o.destBaseline = 3 * time.Second })
	}
	var err error
	if o.senders, err = intList(*sendersF); err == nil {
		if o.sizes, err = intList(*sizesF); err == nil {
			if o.rcpts, err = intList(*rcptsF); err == nil {
				o.e2eQueued, err = intList(*queuedF)
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "spool-bench:", err)
		return 2
	}
	o.sections = map[string]bool{}
	for _, s := range strings.Split(*sectionsF, ",") {
		o.sections[strings.TrimSpace(s)] = true
	}
	for _, k := range strings.Split(*onlyF, ",") {
		kind := bench.Kind(strings.TrimSpace(k))
		if !contains(bench.Kinds, kind) {
			fmt.Fprintf(os.Stderr, "spool-bench: unknown configuration %q in -only (want %v)\n", kind, bench.Kinds)
			return 2
		}
		o.kinds = append(o.kinds, kind)
	}
	for _, line := range strings.Split(*pgSetF, ";") {
		if line = strings.TrimSpace(line); line != "" {
			o.pgSettings = append(o.pgSettings, line)
		}
	}
	if o.pgStatements {
		o.pgSettings = append(o.pgSettings, bench.StatementsSetting)
	}
	if contains(o.kinds, bench.SpoolPG) {
		if _, err := pgtest.BinDir(); err != nil {
			if set["only"] {
				fmt.Fprintln(os.Stderr, "spool-bench: spool-pg:", err)
				return 1
			}
			fmt.Fprintf(os.Stderr, "spool-bench: not measuring spool-pg: %v\n", err)
			o.kinds = slices.DeleteFunc(o.kinds, func(k bench.Kind) bool { return k == bench.SpoolPG })
		}
	}
	if !*debugLog {
		log.DefaultLogger.Out = log.NopOutput{}
	}
	if o.dir == "" {
		if o.dir, err = os.MkdirTemp("", "spool-bench-"); err != nil {
			fmt.Fprintln(os.Stderr, "spool-bench:", err)
			return 1
		}
	} else if err := os.MkdirAll(o.dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "spool-bench:", err)
		return 1
	}
	if !o.keep {
		defer os.RemoveAll(o.dir)
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "spool-bench:", err)
			return 1
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}

	fmt.Printf("spool-bench %s\ndirectory %s, rounds %d, load %v per enqueue figure\n", strings.Join(os.Args[1:], " "), o.dir, o.rounds, o.duration)
	started := time.Now()
	b := &runner{o: o, table: &bench.Table{}}
	if contains(o.kinds, bench.SpoolPG) {
		if b.pg, err = bench.StartPG(o.pgSettings); err != nil {
			fmt.Fprintln(os.Stderr, "spool-bench: starting PostgreSQL:", err)
			return 1
		}
		defer b.pg.Close()
		desc, err := b.pg.Describe()
		if err != nil {
			fmt.Fprintln(os.Stderr, "spool-bench: PostgreSQL:", err)
			return 1
		}
		fmt.Println("spool-pg:", desc)
		if o.pgStatements {
			if err := b.pg.EnableStatements(); err != nil {
				fmt.Fprintln(os.Stderr, "spool-bench: pg_stat_statements:", err)
				return 1
			}
		}
	}
	err = b.all()
	fmt.Println()
	b.table.Print(os.Stdout)
	b.printTargets()
	if b.statements.Len() > 0 {
		fmt.Print("\nPostgreSQL statements by execution time, per section (pg_stat_statements; commits' WAL flushes not included):\n", b.statements.String())
	}
	fmt.Printf("\ntotal time %v\n", time.Since(started).Round(time.Second))
	if err != nil {
		fmt.Fprintln(os.Stderr, "spool-bench:", err)
		return 1
	}
	return 0
}

func intList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		v, err := strconv.Atoi(f)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("bad number %q in list %q", f, s)
		}
		out = append(out, v)
	}
	return out, nil
}

type runner struct {
	o     options
	table *bench.Table
	seq   int
	// pg is the PostgreSQL cluster of spool-pg (nil when not measured).
	pg *bench.PGServer
	// enqueueTop is each kind's best 4 KiB, 1 rcpt enqueue rate at the
	// highest sender count, compared with the disk probes.
	enqueueTop map[bench.Kind]float64
	probes     []probe
	// genFig is the generator's rate, per kind, for the backlog.
	genFig *bench.Figure
	// targets are the figures the issue sets targets for, checked at
	// the end.
	targets []target
	// statements collects each section's costliest statements
	// (-pg-statements).
	statements strings.Builder
}

type probe struct {
	name string
	rate float64
}

// target is one of the targets: a check of figures from this run.
type target struct {
	name  string
	check func() (got string, met bool, ok bool)
}

// freshDir returns a new empty directory under the run's directory.
func (r *runner) freshDir(label string) string {
	r.seq++
	return filepath.Join(r.o.dir, fmt.Sprintf("%03d-%s", r.seq, label))
}

// newLoc returns a fresh place for a queue of kind: a new directory, or
// for spool-pg a new database (its DSN).
func (r *runner) newLoc(kind bench.Kind, label string) (string, error) {
	if kind.InDatabase() {
		return r.pg.NewDatabase(string(kind) + "-" + label)
	}
	return r.freshDir(string(kind) + "-" + label), nil
}

// dropLoc removes what newLoc made, unless -keep.
func (r *runner) dropLoc(kind bench.Kind, loc string) {
	if r.o.keep {
		return
	}
	if kind.InDatabase() {
		if err := r.pg.DropDatabase(loc); err != nil {
			r.progress("dropping a database: %v", err)
		}
		return
	}
	os.RemoveAll(loc)
}

func (r *runner) progress(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "[%s] "+format+"\n", append([]interface{}{time.Now().Format("15:04:05")}, args...)...)
}

func (r *runner) all() error {
	r.enqueueTop = map[bench.Kind]float64{}
	steps := []struct {
		name string
		fn   func() error
	}{
		{"disk", r.disk},
		{"enqueue", r.enqueue},
		{"backlog", r.backlog},
		{"startup", r.startup},
		{"scale", r.scaleSpool},
		{"dispatch", r.dispatch},
		{"e2e", r.e2e},
		{"takeover", r.takeover},
		{"destinations", r.destinations},
	}
	var errs []error
	for _, s := range steps {
		if !r.o.sections[s.name] {
			continue
		}
		if r.o.pgStatements && r.pg != nil {
			if err := r.pg.ResetStatements(); err != nil {
				errs = append(errs, err)
			}
		}
		if err := s.fn(); err != nil {
			r.progress("section %s failed: %v", s.name, err)
			errs = append(errs, fmt.Errorf("%s: %w", s.name, err))
		}
		if r.o.pgStatements && r.pg != nil {
			top, err := r.pg.TopStatements(12)
			if err != nil {
				errs = append(errs, err)
			}
			fmt.Fprintf(&r.statements, "\n== %s\n%s", s.name, top)
		}
	}
	if len(r.probes) > 0 && len(r.enqueueTop) > 0 {
		r.table.Section("durable enqueue (4 KiB, 1 rcpt, most senders) as a multiple of the disk's own rates")
		for _, p := range r.probes {
			f := r.table.Figure("enqueue / "+p.name, "x")
			for _, k := range r.o.kinds {
				if v, ok := r.enqueueTop[k]; ok && k != bench.Maddy {
					f.Add(k, v/p.rate)
				}
			}
		}
	}
	return errors.Join(errs...)
}

// printTargets prints the targets with this run's figures.
func (r *runner) printTargets() {
	if len(r.targets) == 0 {
		return
	}
	fmt.Println("\ntargets (medians of this run):")
	for _, t := range r.targets {
		got, met, ok := t.check()
		verdict := "met"
		switch {
		case !ok:
			verdict = "not measured"
		case !met:
			verdict = "MISSED"
		}
		fmt.Printf("  %-12s %s: %s\n", "["+verdict+"]", t.name, got)
	}
}

func (r *runner) disk() error {
	r.table.Section("disk probes (same directory, no queue involved)")
	type p struct {
		name string
		fn   func() (float64, error)
	}
	ps := []p{
		{"append+fsync, 1 stream", func() (float64, error) { return bench.ProbeAppendFsync(r.o.dir, r.o.probeTime) }},
		{"create+fsync+rename+dir-fsync, 1 stream", func() (float64, error) { return bench.ProbeCreateRename(r.o.dir, 1, r.o.probeTime) }},
		{"create+fsync+rename+dir-fsync, 16 parallel", func() (float64, error) { return bench.ProbeCreateRename(r.o.dir, 16, r.o.probeTime) }},
	}
	for _, pr := range ps {
		r.progress("disk probe: %s", pr.name)
		v, err := pr.fn()
		if err != nil {
			return err
		}
		f := r.table.Figure(pr.name, "ops/s")
		f.Shared = true
		f.Add(bench.Maddy, v)
		r.probes = append(r.probes, probe{pr.name, v})
	}
	return nil
}

// loadResult is one timed load on a fresh queue.
type loadResult struct {
	bench.LoadResult
	q       *bench.Queue
	drained bool
	// db is what the database server did meanwhile (spool-pg only):
	// from before Init until after Close.
	db bench.PGSample
	// cpu is this process's CPU time, and wall the time, from before
	// Init until after Close.
	cpu, wall time.Duration
}

// pgSample reads the database server's counters for kind (nothing for
// kinds without one).
func (r *runner) pgSample(kind bench.Kind) (bench.PGSample, error) {
	if !kind.InDatabase() {
		return bench.PGSample{}, nil
	}
	return r.pg.Sample()
}

// pgSettle lets the connections of a closed queue end, so that their
// backends report their statistics before the next sample.
func (r *runner) pgSettle(kind bench.Kind) {
	if kind.InDatabase() {
		time.Sleep(300 * time.Millisecond)
	}
}

// loadOnce opens a queue of kind on loc, runs one timed load, waits until
// everything accepted is delivered, and closes the queue.
func (r *runner) loadOnce(kind bench.Kind, loc string, senders int, spec bench.MsgSpec, wait bool) (loadResult, error) {
	var res loadResult
	db0, err := r.pgSample(kind)
	if err != nil {
		return res, err
	}
	cpu0, start := bench.SelfCPU(), time.Now()
	q, err := bench.OpenQueue(kind, loc, bench.QueueOptions{})
	if err != nil {
		return res, err
	}
	res.q = q
	if wait {
		q.WaitLoaded()
	}
	res.LoadResult = bench.RunLoad(context.Background(), q.Target, senders, r.o.duration, 0, spec)
	res.drained = q.Null.WaitDelivered(res.Accepted, r.o.timeout)
	if err := q.Close(); err != nil {
		return res, err
	}
	res.cpu, res.wall = bench.SelfCPU()-cpu0, time.Since(start)
	if kind.InDatabase() {
		r.pgSettle(kind)
		db1, err := r.pgSample(kind)
		if err != nil {
			return res, err
		}
		res.db = db1.Sub(db0)
	}
	if res.Errors > 0 {
		return res, fmt.Errorf("%s: %d enqueue errors, first: %v", kind, res.Errors, res.FirstErr)
	}
	return res, nil
}

func (r *runner) enqueue() error {
	r.table.Section("queue-only durable enqueue (in process, Start/AddRcpt/Body/Commit, fresh queue each)")
	type cfg struct {
		senders int
		spec    bench.MsgSpec
	}
	var cfgs []cfg
	for _, size := range r.o.sizes {
		for _, rc := range r.o.rcpts {
			for _, s := range r.o.senders {
				cfgs = append(cfgs, cfg{s, bench.MsgSpec{BodySize: size, Rcpts: rc}})
			}
		}
	}
	maxSenders := 0
	for _, s := range r.o.senders {
		maxSenders = max(maxSenders, s)
	}
	var latFigs, cpuFigs []*bench.Figure
	for _, c := range cfgs {
		f := r.table.Figure(fmt.Sprintf("enqueue %s, %d senders", c.spec, c.senders), "msg/s")
		var p50, p99, ownCPU, dbCPU, busy, walPer *bench.Figure
		basic := c.spec.BodySize == 4096 && c.spec.Rcpts == 1
		if basic {
			p50 = &bench.Figure{Name: fmt.Sprintf("enqueue→delivery p50, %s, %d senders", c.spec, c.senders), Unit: "ms"}
			p99 = &bench.Figure{Name: fmt.Sprintf("enqueue→delivery p99, %s, %d senders", c.spec, c.senders), Unit: "ms"}
			latFigs = append(latFigs, p50, p99)
			ownCPU = &bench.Figure{Name: fmt.Sprintf("bench process CPU per message, %d senders", c.senders), Unit: "ms"}
			dbCPU = &bench.Figure{Name: fmt.Sprintf("database CPU per message, %d senders", c.senders), Unit: "ms"}
			busy = &bench.Figure{Name: fmt.Sprintf("CPU busy, bench process + database, %d senders", c.senders), Unit: "cores"}
			walPer = &bench.Figure{Name: fmt.Sprintf("messages per WAL flush, %d senders", c.senders)}
			cpuFigs = append(cpuFigs, ownCPU, dbCPU, busy, walPer)
			if c.senders == maxSenders && contains(r.o.kinds, bench.SpoolPG) {
				r.enqueueTargets(f)
			}
		}
		for round := 0; round < r.o.rounds; round++ {
			for _, kind := range r.o.kinds {
				r.progress("enqueue %s, %d senders, %s round %d", c.spec, c.senders, kind, round+1)
				loc, err := r.newLoc(kind, "enqueue")
				if err != nil {
					return err
				}
				res, err := r.loadOnce(kind, loc, c.senders, c.spec, false)
				if kind.InDatabase() {
					r.dropLoc(kind, loc)
				}
				if err != nil {
					return err
				}
				if !res.drained {
					f.AddNote("%s did not deliver everything within %v", kind, r.o.timeout)
				}
				f.Add(kind, res.Rate())
				if c.senders == maxSenders && basic {
					r.enqueueTop[kind] = max(r.enqueueTop[kind], res.Rate())
				}
				if p50 != nil {
					lat := res.q.Null.Latencies()
					p50.Add(kind, bench.Ms(bench.Percentile(lat, 50)))
					p99.Add(kind, bench.Ms(bench.Percentile(lat, 99)))
				}
				if ownCPU != nil && res.Accepted > 0 {
					ownCPU.Add(kind, bench.Ms(res.cpu)/float64(res.Accepted))
					busy.Add(kind, (res.cpu+res.db.CPU).Seconds()/res.wall.Seconds())
					if kind.InDatabase() {
						dbCPU.Add(kind, bench.Ms(res.db.CPU)/float64(res.Accepted))
						if res.db.WALSyncs > 0 {
							walPer.Add(kind, float64(res.Accepted)/float64(res.db.WALSyncs))
						}
					}
				}
			}
		}
	}
	if len(latFigs) > 0 {
		r.table.Section("enqueue→delivery latency (Start called → null target's Commit), from the 4 KiB, 1 rcpt loads above")
		for _, f := range latFigs {
			row := r.table.Figure(f.Name, f.Unit)
			row.Samples = f.Samples
		}
	}
	if len(cpuFigs) > 0 {
		r.table.Section("CPU and WAL flushes over the 4 KiB, 1 rcpt loads above, from Init to Close (enqueue and delivery; spool-pg: the database server's processes, pg_stat_wal.wal_sync)")
		for _, f := range cpuFigs {
			if f.Samples == nil {
				continue
			}
			row := r.table.Figure(f.Name, f.Unit)
			row.Samples = f.Samples
		}
	}
	return nil
}

// enqueueTargets registers the targets of the enqueue figure f (4 KiB,
// 1 rcpt, most senders).
func (r *runner) enqueueTargets(f *bench.Figure) {
	r.targets = append(r.targets, target{
		name: f.Name + ": spool-pg ≥ 5× maddy and ≥ 0.5× spool",
		check: func() (string, bool, bool) {
			m, mok := f.Value(bench.Maddy)
			s, sok := f.Value(bench.Spool)
			p, pok := f.Value(bench.SpoolPG)
			if !mok || !sok || !pok || m == 0 || s == 0 {
				return "", false, false
			}
			return fmt.Sprintf("%.2f× maddy, %.2f× spool", p/m, p/s), p/m >= 5 && p/s >= 0.5, true
		},
	})
}

// backlogLocs holds one generated not-yet-due backlog per kind, reused
// by the backlog and startup sections.
var backlogLocs = map[bench.Kind]string{}

func (r *runner) backlogLoc(kind bench.Kind) (string, error) {
	if d, ok := backlogLocs[kind]; ok {
		return d, nil
	}
	loc, err := r.newLoc(kind, fmt.Sprintf("backlog-%d", r.o.backlog))
	if err != nil {
		return "", err
	}
	r.progress("generating %d queued messages for %s", r.o.backlog, kind)
	took, err := bench.Generate(kind, loc, bench.Backlog{N: r.o.backlog, BodySize: r.o.backBody})
	if err != nil {
		return "", err
	}
	r.progress("generated in %v", took.Round(time.Millisecond))
	if r.genFig == nil {
		r.genFig = r.table.Figure(fmt.Sprintf("generator: %d queued written (maddy: files; spool: store.Create; spool-pg: Create+Commit; 256 concurrent)", r.o.backlog), "msg/s")
	}
	r.genFig.Add(kind, float64(r.o.backlog)/took.Seconds())
	backlogLocs[kind] = loc
	return loc, nil
}

func (r *runner) backlog() error {
	r.table.Section(fmt.Sprintf("enqueue with %d messages already queued (not due; 4 KiB, 1 rcpt, 16 senders)", r.o.backlog))
	f := r.table.Figure(fmt.Sprintf("enqueue with %d queued", r.o.backlog), "msg/s")
	spec := bench.MsgSpec{BodySize: 4096, Rcpts: 1}
	for round := 0; round < r.o.rounds; round++ {
		for _, kind := range r.o.kinds {
			loc, err := r.backlogLoc(kind)
			if err != nil {
				return err
			}
			r.progress("backlog enqueue, %s round %d", kind, round+1)
			res, err := r.loadOnce(kind, loc, 16, spec, true)
			if err != nil {
				return err
			}
			if !res.drained {
				f.AddNote("%s did not deliver everything within %v", kind, r.o.timeout)
			}
			f.Add(kind, res.Rate())
		}
	}
	return nil
}

func (r *runner) startup() error {
	r.table.Section(fmt.Sprintf("start-up with %d queued (%s bodies), each in a fresh process", r.o.backlog, bench.SizeString(r.o.backBody)))
	figs := newStartupFigures(r.table, r.o.backlog)
	for round := 0; round < r.o.rounds; round++ {
		for _, kind := range r.o.kinds {
			loc, err := r.backlogLoc(kind)
			if err != nil {
				return err
			}
			r.progress("start-up, %s round %d", kind, round+1)
			if err := figs.measure(kind, loc, r.o.backlog, r.evictor(kind, loc)); err != nil {
				return err
			}
		}
	}
	if contains(r.o.kinds, bench.SpoolPG) {
		figs.accept[0].AddNote("spool-pg reads nothing at start: its schedule is the database's index; cold = PostgreSQL restarted with its files evicted")
	}
	return nil
}

// evictor returns how to make kind's queue at loc cold: evict its files
// from the page cache, or for spool-pg restart PostgreSQL and evict all of
// its files.
func (r *runner) evictor(kind bench.Kind, loc string) func() error {
	if kind.InDatabase() {
		return func() error { return r.pg.Restart(true) }
	}
	return func() error { return bench.EvictCache(loc) }
}

// startupFigures are the rows of one start-up measurement: warm (the
// queue's files as the generator left them in the page cache) and cold
// (those files evicted from the page cache first).
type startupFigures struct {
	accept, sched, rss, anon [2]*bench.Figure
}

func newStartupFigures(t *bench.Table, n int) *startupFigures {
	f := &startupFigures{}
	// "cold": the queue's files were evicted from the page cache first.
	for i, cache := range []string{"warm", "cold"} {
		f.accept[i] = t.Figure(fmt.Sprintf("start → new mail accepted, %d queued, %s", n, cache), "ms")
		f.sched[i] = t.Figure(fmt.Sprintf("start → all scheduled, %d queued, %s", n, cache), "ms")
		f.rss[i] = t.Figure(fmt.Sprintf("RSS growth per queued msg, %d queued, %s", n, cache), "bytes")
		f.anon[i] = t.Figure(fmt.Sprintf("anon RSS growth per queued msg, %d queued, %s", n, cache), "bytes")
	}
	return f
}

func (f *startupFigures) measure(kind bench.Kind, loc string, n int, evict func() error) error {
	for i := range 2 {
		if i == 1 {
			if err := evict(); err != nil {
				return err
			}
		}
		res, err := runChildStartup(kind, loc, n)
		if err != nil {
			return err
		}
		f.accept[i].Add(kind, bench.Ms(res.Accepted))
		f.sched[i].Add(kind, bench.Ms(res.Scheduled))
		f.rss[i].Add(kind, res.RSSPerMessage())
		f.anon[i].Add(kind, res.AnonPerMessage())
	}
	return nil
}

func (r *runner) scaleSpool() error {
	if !contains(r.o.kinds, bench.Spool) || r.o.scale == 0 {
		return nil
	}
	r.table.Section(fmt.Sprintf("scale: %d queued, Spool's embedded store only (maddy's linear start-up and timer scan make it impractical here)", r.o.scale))
	dir := r.freshDir(fmt.Sprintf("spool-scale-%d", r.o.scale))
	r.progress("generating %d queued messages for spool", r.o.scale)
	took, err := bench.Generate(bench.Spool, dir, bench.Backlog{N: r.o.scale, BodySize: r.o.backBody})
	if err != nil {
		return err
	}
	gen := r.table.Figure(fmt.Sprintf("generator: store.Create of %d (256 concurrent)", r.o.scale), "msg/s")
	gen.Add(bench.Spool, float64(r.o.scale)/took.Seconds())
	figs := newStartupFigures(r.table, r.o.scale)
	for round := 0; round < r.o.rounds; round++ {
		r.progress("scale start-up, spool round %d", round+1)
		if err := figs.measure(bench.Spool, dir, r.o.scale, func() error { return bench.EvictCache(dir) }); err != nil {
			return err
		}
	}
	return nil
}

// dispatchFigures are the rows of one dispatch measurement.
type dispatchFigures struct {
	rate, total, par, busy, dbCPU, walPer, dups *bench.Figure
}

func newDispatchFigures(t *bench.Table, suffix string, limit int, pg bool) *dispatchFigures {
	f := &dispatchFigures{
		rate:  t.Figure("attempts/s, first to last delivery"+suffix, "msg/s"),
		total: t.Figure("start → all delivered"+suffix, "ms"),
		par:   t.Figure(fmt.Sprintf("most deliveries at once (limit %d)%s", limit, suffix), ""),
		busy:  t.Figure("CPU busy, bench process + database"+suffix, "cores"),
	}
	if pg {
		f.dbCPU = t.Figure("database CPU per attempt"+suffix, "ms")
		f.walPer = t.Figure("attempts per WAL flush"+suffix, "")
		f.dups = t.Figure("duplicate deliveries"+suffix, "")
	}
	return f
}

func (r *runner) dispatch() error {
	pg := contains(r.o.kinds, bench.SpoolPG)
	r.table.Section(fmt.Sprintf("dispatch of %d messages due at once (generated, max_parallelism %d)", r.o.dispatchN, r.o.dispatchPar))
	one := newDispatchFigures(r.table, "", r.o.dispatchPar, pg)
	var multi *dispatchFigures
	var ratio *bench.Figure
	if pg && r.o.nodes > 1 {
		r.table.Section(fmt.Sprintf("dispatch of %d messages due at once, spool-pg on %d nodes (queue instances in this process, one database, max_parallelism %d each)",
			r.o.dispatchN, r.o.nodes, r.o.dispatchPar))
		multi = newDispatchFigures(r.table, fmt.Sprintf(", %d nodes", r.o.nodes), r.o.nodes*r.o.dispatchPar, true)
		ratio = r.table.Figure(fmt.Sprintf("attempts/s, %d nodes / 1 node", r.o.nodes), "x")
		r.targets = append(r.targets, target{
			name: fmt.Sprintf("dispatch of %d due, spool-pg summed over %d nodes ≥ 3000 attempts/s", r.o.dispatchN, r.o.nodes),
			check: func() (string, bool, bool) {
				v, ok := multi.rate.Value(bench.SpoolPG)
				return fmt.Sprintf("%.0f/s", v), v >= 3000, ok
			},
		})
	}
	for round := 0; round < r.o.rounds; round++ {
		for _, kind := range r.o.kinds {
			if err := r.dispatchOnce(kind, 1, one); err != nil {
				return err
			}
			if kind.InDatabase() && multi != nil {
				if err := r.dispatchOnce(kind, r.o.nodes, multi); err != nil {
					return err
				}
			}
		}
	}
	if ratio != nil {
		a, aok := one.rate.Value(bench.SpoolPG)
		b, bok := multi.rate.Value(bench.SpoolPG)
		if aok && bok && a > 0 {
			ratio.Add(bench.SpoolPG, b/a)
		}
	}
	return nil
}

// dispatchOnce generates the due messages and measures one dispatch of
// them by the given number of nodes (queue instances sharing a database,
// delivering to one null target).
func (r *runner) dispatchOnce(kind bench.Kind, nodes int, f *dispatchFigures) error {
	loc, err := r.newLoc(kind, "due")
	if err != nil {
		return err
	}
	defer r.dropLoc(kind, loc)
	r.progress("generating %d due messages for %s", r.o.dispatchN, kind)
	if _, err := bench.Generate(kind, loc, bench.Backlog{N: r.o.dispatchN, BodySize: r.o.backBody, Due: true}); err != nil {
		return err
	}
	r.progress("dispatch, %s on %d node(s)", kind, nodes)
	null := bench.NewNullTarget(fmt.Sprintf("dispatch_%d", r.seq))
	defer null.Release()
	if kind.InDatabase() {
		null.TrackIDs()
	}
	db0, err := r.pgSample(kind)
	if err != nil {
		return err
	}
	cpu0 := bench.SelfCPU()
	start := time.Now()
	var qs []*bench.Queue
	closeAll := func() error {
		var errs []error
		for _, q := range qs {
			errs = append(errs, q.Close())
		}
		qs = nil
		return errors.Join(errs...)
	}
	defer closeAll()
	for i := range nodes {
		q, err := bench.OpenQueue(kind, loc, bench.QueueOptions{MaxParallelism: r.o.dispatchPar, Node: fmt.Sprintf("n%d", i+1), Null: null})
		if err != nil {
			return err
		}
		qs = append(qs, q)
	}
	done := null.WaitDelivered(int64(r.o.dispatchN), r.o.timeout)
	elapsed := time.Since(start)
	delivered := null.Delivered()
	first, last := null.Span()
	cpu := bench.SelfCPU() - cpu0
	if err := closeAll(); err != nil {
		return err
	}
	r.pgSettle(kind)
	db1, err := r.pgSample(kind)
	if err != nil {
		return err
	}
	db := db1.Sub(db0)
	if !done {
		f.rate.AddNote("%s: only %d of %d delivered within %v; rate over those", kind, delivered, r.o.dispatchN, r.o.timeout)
	}
	if delivered > 1 {
		f.rate.Add(kind, float64(delivered-1)/last.Sub(first).Seconds())
	}
	f.total.Add(kind, bench.Ms(elapsed))
	f.par.Add(kind, float64(null.MaxInFlight()))
	if null.MaxInFlight() > int64(nodes*r.o.dispatchPar) {
		f.par.AddNote("%s EXCEEDED max_parallelism", kind)
	}
	// The database's CPU counts from before Init to after Close, the
	// bench process's over the dispatch; both are nearly all dispatch.
	f.busy.Add(kind, (cpu+db.CPU).Seconds()/elapsed.Seconds())
	if kind.InDatabase() && delivered > 0 {
		f.dbCPU.Add(kind, bench.Ms(db.CPU)/float64(delivered))
		if db.WALSyncs > 0 {
			f.walPer.Add(kind, float64(delivered)/float64(db.WALSyncs))
		}
		f.dups.Add(kind, float64(null.Duplicates()))
	}
	return nil
}

func contains(ks []bench.Kind, k bench.Kind) bool {
	return slices.Contains(ks, k)
}

// runChildStartup re-executes this binary to measure start-up in a fresh
// process.
func runChildStartup(kind bench.Kind, loc string, n int) (bench.StartupResult, error) {
	exe, err := os.Executable()
	if err != nil {
		return bench.StartupResult{}, err
	}
	cmd := exec.Command(exe, "child-startup", "-kind", string(kind), "-dir", loc, "-n", strconv.Itoa(n))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return bench.StartupResult{}, fmt.Errorf("start-up child for %s: %w", kind, err)
	}
	var res bench.StartupResult
	if err := json.Unmarshal(out, &res); err != nil {
		return res, fmt.Errorf("start-up child for %s: %w (output %q)", kind, err, out)
	}
	return res, nil
}

func childStartup(args []string) int {
	fs := flag.NewFlagSet("child-startup", flag.ExitOnError)
	kind := fs.String("kind", "", "maddy, spool or spool-pg")
	dir := fs.String("dir", "", "queue directory (spool-pg: DSN)")
	n := fs.Int("n", 0, "messages in it")
	fs.Parse(args)
	log.DefaultLogger.Out = log.NopOutput{}
	res, err := bench.StartupProbe(bench.Kind(*kind), *dir, *n)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child-startup:", err)
		return 1
	}
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

// maddyBin returns the maddy binary to run, building it once.
func (r *runner) maddyBin() (string, error) {
	if r.o.maddyBin != "" {
		return r.o.maddyBin, nil
	}
	root, err := bench.ModuleRoot()
	if err != nil {
		return "", err
	}
	r.progress("building cmd/maddy")
	bin, err := bench.BuildMaddy(root, r.o.dir)
	if err != nil {
		return "", err
	}
	r.o.maddyBin = bin
	return bin, nil
}

// e2eFigures are the rows of one end-to-end variant.
type e2eFigures struct {
	acc, thr, p50, p99, cpu, dbCPU, sys, ready, dups *bench.Figure
}

func newE2EFigures(t *bench.Table, queued int, suffix string, pg bool, multi bool) *e2eFigures {
	f := &e2eFigures{
		acc: t.Figure(fmt.Sprintf("accepted, %d queued%s", queued, suffix), "msg/s"),
		thr: t.Figure(fmt.Sprintf("delivered to the sink, %d queued%s", queued, suffix), "msg/s"),
		p50: t.Figure(fmt.Sprintf("MAIL → sink latency p50, %d queued%s", queued, suffix), "ms"),
		p99: t.Figure(fmt.Sprintf("MAIL → sink latency p99, %d queued%s", queued, suffix), "ms"),
		cpu: t.Figure(fmt.Sprintf("server CPU per message, %d queued%s", queued, suffix), "ms"),
	}
	if pg {
		f.dbCPU = t.Figure(fmt.Sprintf("database CPU per message, %d queued%s", queued, suffix), "ms")
	}
	if !multi {
		f.sys = t.Figure(fmt.Sprintf("server system CPU share, %d queued%s", queued, suffix), "%")
	}
	f.ready = t.Figure(fmt.Sprintf("process start → SMTP port open, %d queued%s", queued, suffix), "ms")
	if multi {
		f.dups = t.Figure(fmt.Sprintf("duplicate deliveries, %d queued%s", queued, suffix), "")
	}
	return f
}

func (f *e2eFigures) add(kind bench.Kind, res bench.E2EResult, timeout time.Duration) {
	if res.Delivered < res.Accepted {
		f.thr.AddNote("%s: only %d of %d delivered within %v", kind, res.Delivered, res.Accepted, timeout)
	}
	f.acc.Add(kind, float64(res.Accepted)/res.AcceptTook.Seconds())
	if res.DeliverTook > 0 {
		f.thr.Add(kind, float64(res.Delivered)/res.DeliverTook.Seconds())
	}
	f.p50.Add(kind, bench.Ms(bench.Percentile(res.Latency, 50)))
	f.p99.Add(kind, bench.Ms(bench.Percentile(res.Latency, 99)))
	f.cpu.Add(kind, bench.Ms(res.CPUPerMessage()))
	if f.dbCPU != nil && kind.InDatabase() && res.Accepted > 0 {
		f.dbCPU.Add(kind, bench.Ms(res.DBCPU)/float64(res.Accepted))
	}
	if t := res.User + res.System; t > 0 && f.sys != nil {
		f.sys.Add(kind, 100*float64(res.System)/float64(t))
	}
	f.ready.Add(kind, bench.Ms(res.Ready))
	if f.dups != nil {
		f.dups.Add(kind, float64(res.Duplicates))
	}
}

func (r *runner) e2e() error {
	bin, err := r.maddyBin()
	if err != nil {
		return err
	}
	pg := contains(r.o.kinds, bench.SpoolPG)
	multiNodes := pg && r.o.nodes > 1
	for _, queued := range r.o.e2eQueued {
		r.table.Section(fmt.Sprintf("end-to-end: maddy binary, smtp endpoint → queue → target.smtp → go-smtp sink; %d clients, %d × 4 KiB, %d already queued",
			r.o.e2eConns, r.o.e2eN, queued))
		one := newE2EFigures(r.table, queued, "", pg, false)
		var multi *e2eFigures
		var accRatio, thrRatio *bench.Figure
		if multiNodes {
			r.table.Section(fmt.Sprintf("end-to-end, spool-pg on %d nodes (maddy processes sharing one database, clients spread over them); %d clients, %d × 4 KiB, %d already queued",
				r.o.nodes, r.o.e2eConns, r.o.e2eN, queued))
			suffix := fmt.Sprintf(", %d nodes", r.o.nodes)
			multi = newE2EFigures(r.table, queued, suffix, true, true)
			accRatio = r.table.Figure(fmt.Sprintf("accepted, %d queued, %d nodes / 1 node", queued, r.o.nodes), "x")
			thrRatio = r.table.Figure(fmt.Sprintf("delivered, %d queued, %d nodes / 1 node", queued, r.o.nodes), "x")
			r.targets = append(r.targets, target{
				name: fmt.Sprintf("end-to-end, %d queued: spool-pg on %d nodes no slower than on 1 (accepted and delivered msg/s)", queued, r.o.nodes),
				check: func() (string, bool, bool) {
					a, aok := accRatio.Value(bench.SpoolPG)
					d, dok := thrRatio.Value(bench.SpoolPG)
					return fmt.Sprintf("accepted %.2f×, delivered %.2f× of 1 node", a, d), a >= 1 && d >= 1, aok && dok
				},
			})
		}
		locs := map[bench.Kind]string{}
		var dirs []string
		loc := func(kind bench.Kind) (string, error) {
			if l, ok := locs[kind]; ok {
				return l, nil
			}
			l, err := r.newLoc(kind, fmt.Sprintf("e2e-%d", queued))
			if err != nil {
				return "", err
			}
			gen := l
			if !kind.InDatabase() {
				if err := os.MkdirAll(l, 0o755); err != nil {
					return "", err
				}
				gen = bench.E2EQueueDir(l)
			}
			if queued > 0 {
				r.progress("generating %d queued messages for %s (end-to-end)", queued, kind)
				if _, err := bench.Generate(kind, gen, bench.Backlog{N: queued, BodySize: r.o.backBody}); err != nil {
					return "", err
				}
			}
			locs[kind] = l
			return l, nil
		}
		run := func(kind bench.Kind, nodes int, f *e2eFigures, round int) error {
			l, err := loc(kind)
			if err != nil {
				return err
			}
			c := bench.E2EConfig{Bin: bin, Kind: kind, Messages: r.o.e2eN, Clients: r.o.e2eConns, BodySize: 4096, Timeout: r.o.timeout}
			if kind.InDatabase() {
				c.DSN, c.Nodes, c.PG = l, nodes, r.pg
				c.Dir = r.freshDir(fmt.Sprintf("%s-e2e-%d-%dnodes", kind, queued, nodes))
				dirs = append(dirs, c.Dir)
				if err := os.MkdirAll(c.Dir, 0o755); err != nil {
					return err
				}
			} else {
				c.Dir = l
			}
			r.progress("end-to-end, %d queued, %s on %d node(s), round %d", queued, kind, nodes, round+1)
			res, err := bench.RunE2E(c)
			if err != nil {
				return fmt.Errorf("%s on %d node(s): %w", kind, nodes, err)
			}
			f.add(kind, res, r.o.timeout)
			return nil
		}
		for round := 0; round < r.o.rounds; round++ {
			for _, kind := range r.o.kinds {
				if err := run(kind, 1, one, round); err != nil {
					return err
				}
				if kind.InDatabase() && multi != nil {
					if err := run(kind, r.o.nodes, multi, round); err != nil {
						return err
					}
				}
			}
		}
		if multi != nil {
			for _, p := range []struct{ ratio, a, b *bench.Figure }{{accRatio, one.acc, multi.acc}, {thrRatio, one.thr, multi.thr}} {
				a, aok := p.a.Value(bench.SpoolPG)
				b, bok := p.b.Value(bench.SpoolPG)
				if aok && bok && a > 0 {
					p.ratio.Add(bench.SpoolPG, b/a)
				}
			}
		}
		for kind, l := range locs {
			r.dropLoc(kind, l)
		}
		if !r.o.keep {
			for _, d := range dirs {
				os.RemoveAll(d)
			}
		}
	}
	return nil
}

func (r *runner) takeover() error {
	if !contains(r.o.kinds, bench.SpoolPG) || r.o.nodes < 2 {
		return nil
	}
	bin, err := r.maddyBin()
	if err != nil {
		return err
	}
	r.table.Section(fmt.Sprintf("takeover: spool-pg on %d maddy processes, lease %v; node %s's next hop never answers, so its attempts stay in flight; then kill -9 %s",
		r.o.nodes, r.o.takeoverLease, bench.KilledNode, bench.KilledNode))
	held := r.table.Figure("messages leased to the killed node", "")
	left := r.table.Figure("kill → its last lease expires (as stored)", "ms")
	took := r.table.Figure("kill → all its messages delivered by the others", "ms")
	after := r.table.Figure("lease expiry → all delivered", "ms")
	dups := r.table.Figure("duplicate deliveries", "")
	bound := r.o.takeoverLease + 10*time.Second
	worst := time.Duration(0)
	measured := false
	r.targets = append(r.targets, target{
		name: fmt.Sprintf("takeover of a killed node's mail within lease + 10 s = %v (worst round)", bound),
		check: func() (string, bool, bool) {
			return worst.Round(time.Millisecond).String(), worst <= bound, measured
		},
	})
	for round := 0; round < r.o.rounds; round++ {
		dsn, err := r.pg.NewDatabase("takeover")
		if err != nil {
			return err
		}
		dir := r.freshDir("spool-pg-takeover")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		r.progress("takeover, round %d", round+1)
		res, err := bench.RunTakeover(bench.TakeoverConfig{Bin: bin, Dir: dir, DSN: dsn, Nodes: r.o.nodes,
			Lease: r.o.takeoverLease, Messages: r.o.takeoverN, Timeout: r.o.timeout})
		r.dropLoc(bench.SpoolPG, dsn)
		if !r.o.keep {
			os.RemoveAll(dir)
		}
		if err != nil {
			return err
		}
		held.Add(bench.SpoolPG, float64(res.Held))
		left.Add(bench.SpoolPG, bench.Ms(res.LeaseLeft))
		took.Add(bench.SpoolPG, bench.Ms(res.Took))
		after.Add(bench.SpoolPG, bench.Ms(res.Took-res.LeaseLeft))
		dups.Add(bench.SpoolPG, float64(res.Duplicates))
		worst = max(worst, res.Took)
		measured = true
	}
	return nil
}
