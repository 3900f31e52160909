// Command spool-bench measures target.spool against maddy 0.8.1's
// target.queue in one run, alternating the two (maddy, spool, maddy,
// spool, ...), and prints a table of both figures and their ratio
// spool/maddy. See docs/performance.md.
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
	"strconv"
	"strings"
	"time"

	"github.com/foxcpp/maddy/framework/log"

	"github.com/maddy-spool/spool/internal/bench"
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
}

var allSections = []string{"disk", "enqueue", "backlog", "startup", "scale", "dispatch", "e2e"}

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
		onlyF      = flag.String("only", "maddy,spool", "modules to measure")
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
	flag.DurationVar(&o.timeout, "timeout", 3*time.Minute, "bound on each wait (drain, dispatch); a figure that hits it is marked")
	flag.DurationVar(&o.probeTime, "probe-duration", 3*time.Second, "length of each disk probe")
	flag.IntVar(&o.e2eN, "e2e-messages", 3000, "end-to-end: messages per measurement")
	flag.IntVar(&o.e2eConns, "e2e-clients", 16, "end-to-end: concurrent SMTP clients")
	flag.StringVar(&o.maddyBin, "maddy-bin", "", "end-to-end: maddy binary to run (default: go build ./cmd/maddy of this source tree)")
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
		o.kinds = append(o.kinds, bench.Kind(strings.TrimSpace(k)))
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
	err = b.all()
	fmt.Println()
	b.table.Print(os.Stdout)
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
	// spoolEnqueue64 is Spool's best 4 KiB, 1 rcpt enqueue rate at the
	// highest sender count, compared with the disk probes.
	spoolEnqueueTop float64
	probes          []probe
}

type probe struct {
	name string
	rate float64
}

// freshDir returns a new empty directory under the run's directory.
func (r *runner) freshDir(label string) string {
	r.seq++
	return filepath.Join(r.o.dir, fmt.Sprintf("%03d-%s", r.seq, label))
}

func (r *runner) progress(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "[%s] "+format+"\n", append([]interface{}{time.Now().Format("15:04:05")}, args...)...)
}

func (r *runner) all() error {
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
	}
	var errs []error
	for _, s := range steps {
		if !r.o.sections[s.name] {
			continue
		}
		if err := s.fn(); err != nil {
			r.progress("section %s failed: %v", s.name, err)
			errs = append(errs, fmt.Errorf("%s: %w", s.name, err))
		}
	}
	if len(r.probes) > 0 && r.spoolEnqueueTop > 0 {
		r.table.Section("Spool's durable enqueue (4 KiB, 1 rcpt, most senders) as a multiple of the disk's own rates")
		for _, p := range r.probes {
			f := r.table.Figure("spool enqueue / "+p.name, "x")
			f.Add(bench.Spool, r.spoolEnqueueTop/p.rate)
		}
	}
	return errors.Join(errs...)
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

// loadOnce opens a fresh queue of kind, runs one timed load, waits until
// everything accepted is delivered, and closes the queue.
func (r *runner) loadOnce(kind bench.Kind, dir string, senders int, spec bench.MsgSpec, wait bool) (bench.LoadResult, *bench.Queue, bool, error) {
	q, err := bench.OpenQueue(kind, dir, bench.QueueOptions{})
	if err != nil {
		return bench.LoadResult{}, nil, false, err
	}
	if wait {
		q.WaitLoaded()
	}
	res := bench.RunLoad(context.Background(), q.Target, senders, r.o.duration, 0, spec)
	drained := q.Null.WaitDelivered(res.Accepted, r.o.timeout)
	if err := q.Close(); err != nil {
		return res, q, drained, err
	}
	if res.Errors > 0 {
		return res, q, drained, fmt.Errorf("%s: %d enqueue errors, first: %v", kind, res.Errors, res.FirstErr)
	}
	return res, q, drained, nil
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
	var latFigs []*bench.Figure
	for _, c := range cfgs {
		f := r.table.Figure(fmt.Sprintf("enqueue %s, %d senders", c.spec, c.senders), "msg/s")
		var p50, p99 *bench.Figure
		if c.spec.BodySize == 4096 && c.spec.Rcpts == 1 {
			p50 = &bench.Figure{Name: fmt.Sprintf("enqueue→delivery p50, %s, %d senders", c.spec, c.senders), Unit: "ms"}
			p99 = &bench.Figure{Name: fmt.Sprintf("enqueue→delivery p99, %s, %d senders", c.spec, c.senders), Unit: "ms"}
			latFigs = append(latFigs, p50, p99)
		}
		for round := 0; round < r.o.rounds; round++ {
			for _, kind := range r.o.kinds {
				r.progress("enqueue %s, %d senders, %s round %d", c.spec, c.senders, kind, round+1)
				res, q, drained, err := r.loadOnce(kind, r.freshDir(string(kind)), c.senders, c.spec, false)
				if err != nil {
					return err
				}
				if !drained {
					f.Note = fmt.Sprintf("%s did not deliver everything within %v", kind, r.o.timeout)
				}
				f.Add(kind, res.Rate())
				if kind == bench.Spool && c.senders == maxSenders && c.spec.BodySize == 4096 && c.spec.Rcpts == 1 {
					r.spoolEnqueueTop = max(r.spoolEnqueueTop, res.Rate())
				}
				if p50 != nil {
					lat := q.Null.Latencies()
					p50.Add(kind, bench.Ms(bench.Percentile(lat, 50)))
					p99.Add(kind, bench.Ms(bench.Percentile(lat, 99)))
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
	return nil
}

// backlogDirs holds one generated not-yet-due backlog per module, reused by
// the backlog and startup sections.
var backlogDirs = map[bench.Kind]string{}

func (r *runner) backlogDir(kind bench.Kind) (string, error) {
	if d, ok := backlogDirs[kind]; ok {
		return d, nil
	}
	d := r.freshDir(fmt.Sprintf("%s-backlog-%d", kind, r.o.backlog))
	r.progress("generating %d queued messages for %s", r.o.backlog, kind)
	took, err := bench.Generate(kind, d, bench.Backlog{N: r.o.backlog, BodySize: r.o.backBody})
	if err != nil {
		return "", err
	}
	r.progress("generated in %v", took.Round(time.Millisecond))
	backlogDirs[kind] = d
	return d, nil
}

func (r *runner) backlog() error {
	r.table.Section(fmt.Sprintf("enqueue with %d messages already queued (not due; 4 KiB, 1 rcpt, 16 senders)", r.o.backlog))
	f := r.table.Figure(fmt.Sprintf("enqueue with %d queued", r.o.backlog), "msg/s")
	spec := bench.MsgSpec{BodySize: 4096, Rcpts: 1}
	for round := 0; round < r.o.rounds; round++ {
		for _, kind := range r.o.kinds {
			dir, err := r.backlogDir(kind)
			if err != nil {
				return err
			}
			r.progress("backlog enqueue, %s round %d", kind, round+1)
			res, _, drained, err := r.loadOnce(kind, dir, 16, spec, true)
			if err != nil {
				return err
			}
			if !drained {
				f.Note = fmt.Sprintf("%s did not deliver everything within %v", kind, r.o.timeout)
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
			dir, err := r.backlogDir(kind)
			if err != nil {
				return err
			}
			r.progress("start-up, %s round %d", kind, round+1)
			if err := figs.measure(kind, dir, r.o.backlog); err != nil {
				return err
			}
		}
	}
	return nil
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

func (f *startupFigures) measure(kind bench.Kind, dir string, n int) error {
	for i := range 2 {
		if i == 1 {
			if err := bench.EvictCache(dir); err != nil {
				return err
			}
		}
		res, err := runChildStartup(kind, dir, n)
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
	r.table.Section(fmt.Sprintf("scale: %d queued, Spool only (maddy's linear start-up and timer scan make it impractical here)", r.o.scale))
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
		if err := figs.measure(bench.Spool, dir, r.o.scale); err != nil {
			return err
		}
	}
	return nil
}

func (r *runner) dispatch() error {
	r.table.Section(fmt.Sprintf("dispatch of %d messages due at once (generated, max_parallelism %d)", r.o.dispatchN, r.o.dispatchPar))
	rate := r.table.Figure("attempts/s, first to last delivery", "msg/s")
	total := r.table.Figure("start → all delivered", "ms")
	par := r.table.Figure(fmt.Sprintf("most deliveries at once (limit %d)", r.o.dispatchPar), "")
	for round := 0; round < r.o.rounds; round++ {
		for _, kind := range r.o.kinds {
			dir := r.freshDir(string(kind) + "-due")
			r.progress("generating %d due messages for %s", r.o.dispatchN, kind)
			if _, err := bench.Generate(kind, dir, bench.Backlog{N: r.o.dispatchN, BodySize: r.o.backBody, Due: true}); err != nil {
				return err
			}
			r.progress("dispatch, %s round %d", kind, round+1)
			start := time.Now()
			q, err := bench.OpenQueue(kind, dir, bench.QueueOptions{MaxParallelism: r.o.dispatchPar})
			if err != nil {
				return err
			}
			done := q.Null.WaitDelivered(int64(r.o.dispatchN), r.o.timeout)
			elapsed := time.Since(start)
			delivered := q.Null.Delivered()
			first, last := q.Null.Span()
			if err := q.Close(); err != nil {
				return err
			}
			if !done {
				rate.Note = fmt.Sprintf("%s: only %d of %d delivered within %v; rate over those", kind, delivered, r.o.dispatchN, r.o.timeout)
			}
			if delivered > 1 {
				rate.Add(kind, float64(delivered-1)/last.Sub(first).Seconds())
			}
			total.Add(kind, bench.Ms(elapsed))
			par.Add(kind, float64(q.Null.MaxInFlight()))
			if q.Null.MaxInFlight() > int64(r.o.dispatchPar) {
				par.Note = fmt.Sprintf("%s EXCEEDED max_parallelism", kind)
			}
			if !r.o.keep {
				os.RemoveAll(dir)
			}
		}
	}
	return nil
}

func contains(ks []bench.Kind, k bench.Kind) bool {
	for _, x := range ks {
		if x == k {
			return true
		}
	}
	return false
}

// runChildStartup re-executes this binary to measure start-up in a fresh
// process.
func runChildStartup(kind bench.Kind, dir string, n int) (bench.StartupResult, error) {
	exe, err := os.Executable()
	if err != nil {
		return bench.StartupResult{}, err
	}
	cmd := exec.Command(exe, "child-startup", "-kind", string(kind), "-dir", dir, "-n", strconv.Itoa(n))
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
	kind := fs.String("kind", "", "maddy or spool")
	dir := fs.String("dir", "", "queue directory")
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

func (r *runner) e2e() error {
	bin := r.o.maddyBin
	if bin == "" {
		root, err := bench.ModuleRoot()
		if err != nil {
			return err
		}
		r.progress("building cmd/maddy")
		if bin, err = bench.BuildMaddy(root, r.o.dir); err != nil {
			return err
		}
	}
	for _, queued := range r.o.e2eQueued {
		r.table.Section(fmt.Sprintf("end-to-end: maddy binary, smtp endpoint → queue → target.smtp → go-smtp sink; %d clients, %d × 4 KiB, %d already queued",
			r.o.e2eConns, r.o.e2eN, queued))
		acc := r.table.Figure(fmt.Sprintf("accepted, %d queued", queued), "msg/s")
		thr := r.table.Figure(fmt.Sprintf("delivered to the sink, %d queued", queued), "msg/s")
		p50 := r.table.Figure(fmt.Sprintf("MAIL → sink latency p50, %d queued", queued), "ms")
		p99 := r.table.Figure(fmt.Sprintf("MAIL → sink latency p99, %d queued", queued), "ms")
		cpu := r.table.Figure(fmt.Sprintf("server CPU per message, %d queued", queued), "ms")
		sys := r.table.Figure(fmt.Sprintf("server system CPU share, %d queued", queued), "%")
		ready := r.table.Figure(fmt.Sprintf("process start → SMTP port open, %d queued", queued), "ms")
		dirs := map[bench.Kind]string{}
		for round := 0; round < r.o.rounds; round++ {
			for _, kind := range r.o.kinds {
				dir, ok := dirs[kind]
				if !ok {
					dir = r.freshDir(fmt.Sprintf("%s-e2e-%d", kind, queued))
					if err := os.MkdirAll(dir, 0o755); err != nil {
						return err
					}
					if queued > 0 {
						r.progress("generating %d queued messages for %s (end-to-end)", queued, kind)
						if _, err := bench.Generate(kind, bench.E2EQueueDir(dir), bench.Backlog{N: queued, BodySize: r.o.backBody}); err != nil {
							return err
						}
					}
					dirs[kind] = dir
				}
				r.progress("end-to-end, %d queued, %s round %d", queued, kind, round+1)
				res, err := bench.RunE2E(bench.E2EConfig{Bin: bin, Kind: kind, Dir: dir, Messages: r.o.e2eN,
					Clients: r.o.e2eConns, BodySize: 4096, Timeout: r.o.timeout})
				if err != nil {
					return fmt.Errorf("%s: %w", kind, err)
				}
				if res.Delivered < res.Accepted {
					thr.Note = fmt.Sprintf("%s: only %d of %d delivered within %v", kind, res.Delivered, res.Accepted, r.o.timeout)
				}
				acc.Add(kind, float64(res.Accepted)/res.AcceptTook.Seconds())
				if res.DeliverTook > 0 {
					thr.Add(kind, float64(res.Delivered)/res.DeliverTook.Seconds())
				}
				p50.Add(kind, bench.Ms(bench.Percentile(res.Latency, 50)))
				p99.Add(kind, bench.Ms(bench.Percentile(res.Latency, 99)))
				cpu.Add(kind, bench.Ms(res.CPUPerMessage()))
				if t := res.User + res.System; t > 0 {
					sys.Add(kind, 100*float64(res.System)/float64(t))
				}
				ready.Add(kind, bench.Ms(res.Ready))
			}
		}
		if !r.o.keep {
			for _, d := range dirs {
				os.RemoveAll(d)
			}
		}
	}
	return nil
}
