package queue

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/foxcpp/maddy/framework/config"
	modconfig "github.com/foxcpp/maddy/framework/config/module"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/dsn"
	"github.com/maddy-spool/spool/internal/target/queue/fate"
	"github.com/maddy-spool/spool/internal/target/queue/schedule"
)

// settings are the parsed directives other than the nested modules.
type settings struct {
	maxParallelism int
	// perDestination is max_parallelism_per_destination.
	perDestination int
	// destinations says how recipients map to destinations.
	destinations destinationMode
	// deadAfter, backoffMin and backoffMax are dead_destination_after
	// and dead_destination_backoff.
	deadAfter              int
	backoffMin, backoffMax time.Duration
	// fallbackAfter is fallback_after: tries (fallbackTries) or age.
	fallbackTries  int
	fallbackAge    time.Duration
	policy         schedule.Policy
	hostname       string
	autogenDomain  string
	dsnDisplayName string
	delayWarning   time.Duration
	// delayRepeat, if positive, repeats the delay report at this interval
	// after the first one, while the recipient is still pending.
	delayRepeat     time.Duration
	shutdownTimeout time.Duration
	successAction   string
	// adminSocket is the control socket path ("" when disabled).
	adminSocket string
	// minFreeSpace is the free space (bytes) under the location below
	// which new mail is refused with 452; 0 disables the check.
	minFreeSpace uint64
	// returnSizeLimit is the largest original (header and body) a RET=FULL
	// failure report returns whole; larger ones get their header only.
	returnSizeLimit int64
	// store says where messages are kept (the store directive).
	store storeSettings
}

// storeKind is a store backend.
type storeKind uint8

const (
	storeEmbedded storeKind = iota
	storePostgres
)

// storeSettings are the store directive: embedded (the default) or
// postgres { dsn ...; node ...; lease ... }.
type storeSettings struct {
	kind storeKind
	// dsn is the PostgreSQL connection string.
	dsn string
	// node names this server among the nodes sharing the store.
	node string
	// lease is how long a claim lasts unless renewed.
	lease time.Duration
}

// defaultLease is the lease directive's default: long enough that a
// renewal every third of it survives a pause of a few minutes, short
// enough that mail a dead node held is taken over within minutes.
const defaultLease = 5 * time.Minute

// minLease is the shortest lease accepted. Short leases hand a dead node's
// mail over sooner, and make a node that pauses (a long garbage
// collection, a stalled disk, a suspended VM) for a third of the lease
// lose its attempts to other nodes; tests use it, production should not.
const minLease = 10 * time.Second

// rules are the per-recipient rules these settings give.
func (s *settings) rules() fate.Rules {
	return fate.Rules{Policy: s.policy, DelayWarning: s.delayWarning, DelayRepeat: s.delayRepeat}
}

// configure reads the target.spool block. It is a superset of maddy's
// target.queue directives, so replacing the module name is enough to
// switch. Every error names the directive and its file:line.
func (q *Queue) configure(cfg *config.Map) error {
	s := &q.cfg
	var (
		delays             []time.Duration
		initial, maxDelay  time.Duration
		factor             float64
		bounceNode         *config.Node
		successActionInput string
	)
	cfg.Bool("debug", true, false, &q.Log.Debug)
	cfg.Custom("target", false, true, nil, modconfig.DeliveryDirective, &q.target)
	cfg.String("location", false, false, q.location, &q.location)
	intDirective(cfg, "max_parallelism", defaultMaxParallelism, &s.maxParallelism)
	intDirective(cfg, "max_parallelism_per_destination", defaultPerDestination, &s.perDestination)
	var destinationInput string
	cfg.Custom("destination", false, false, func() (interface{}, error) { return "auto", nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			if len(n.Args) != 1 || (n.Args[0] != "auto" && n.Args[0] != "domain" && n.Args[0] != "single") {
				return nil, config.NodeErr(n, "destination: want auto, domain or single, got %q", strings.Join(n.Args, " "))
			}
			return n.Args[0], nil
		}, &destinationInput)
	cfg.Custom("dead_destination_after", false, false, func() (interface{}, error) { return defaultDeadAfter, nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			v, err := strconv.Atoi(strings.Join(n.Args, " "))
			if err != nil || v < 0 || len(n.Args) != 1 {
				return nil, config.NodeErr(n, "dead_destination_after: %q is not a number of attempts (0 disables)", strings.Join(n.Args, " "))
			}
			return v, nil
		}, &s.deadAfter)
	var backoff []time.Duration
	cfg.Custom("dead_destination_backoff", false, false, func() (interface{}, error) {
		return []time.Duration{defaultBackoffMin, defaultBackoffMax}, nil
	}, func(_ *config.Map, n config.Node) (interface{}, error) {
		if len(n.Args) != 2 {
			return nil, config.NodeErr(n, "dead_destination_backoff: want the first and the longest suspension, e.g. 10s 30s")
		}
		var out []time.Duration
		for _, a := range n.Args {
			d, err := parseDuration(a)
			if err != nil || d <= 0 {
				return nil, config.NodeErr(n, "dead_destination_backoff: %q is not a positive duration", a)
			}
			out = append(out, d)
		}
		if out[1] < out[0] {
			return nil, config.NodeErr(n, "dead_destination_backoff: the longest suspension %v is shorter than the first %v", out[1], out[0])
		}
		return out, nil
	}, &backoff)
	cfg.Custom("fallback_target", false, false, nil, modconfig.DeliveryDirective, &q.fallback)
	var fallbackAfter *config.Node
	cfg.Custom("fallback_after", false, false, nil, func(_ *config.Map, n config.Node) (interface{}, error) {
		return &n, nil
	}, &fallbackAfter)
	intDirective(cfg, "max_tries", schedule.DefaultMaxTries, &s.policy.MaxTries)
	durationDirective(cfg, "max_age", schedule.DefaultMaxAge, false, &s.policy.MaxAge)
	cfg.Custom("retry_schedule", false, false, func() (interface{}, error) { return []time.Duration(nil), nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			if len(n.Args) == 0 {
				return nil, config.NodeErr(n, "retry_schedule: want one or more durations")
			}
			var out []time.Duration
			for _, a := range n.Args {
				d, err := parseDuration(a)
				if err != nil || d <= 0 {
					return nil, config.NodeErr(n, "retry_schedule: %q is not a positive duration", a)
				}
				out = append(out, d)
			}
			return out, nil
		}, &delays)
	durationDirective(cfg, "retry_initial", 0, false, &initial)
	durationDirective(cfg, "retry_max", 0, false, &maxDelay)
	cfg.Custom("retry_factor", false, false, func() (interface{}, error) { return 0.0, nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			if len(n.Args) != 1 {
				return nil, config.NodeErr(n, "retry_factor: want one number")
			}
			f, err := strconv.ParseFloat(n.Args[0], 64)
			if err != nil || f < 1 || f > 100 {
				return nil, config.NodeErr(n, "retry_factor: %q is not a number from 1 to 100", n.Args[0])
			}
			return f, nil
		}, &factor)
	cfg.Custom("retry_jitter", false, false, func() (interface{}, error) { return schedule.DefaultJitter, nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			if len(n.Args) != 1 {
				return nil, config.NodeErr(n, "retry_jitter: want one number")
			}
			f, err := strconv.ParseFloat(n.Args[0], 64)
			if err != nil || f < 0 || f >= 1 {
				return nil, config.NodeErr(n, "retry_jitter: %q is not a fraction in [0, 1)", n.Args[0])
			}
			return f, nil
		}, &s.policy.Jitter)
	cfg.String("hostname", true, true, "", &s.hostname)
	cfg.String("autogenerated_msg_domain", true, false, "", &s.autogenDomain)
	cfg.String("dsn_display_name", false, false, "Mail Delivery System", &s.dsnDisplayName)
	durationDirective(cfg, "delay_warning", 4*time.Hour, true, &s.delayWarning)
	durationDirective(cfg, "delay_warning_repeat", 0, true, &s.delayRepeat)
	durationDirective(cfg, "shutdown_timeout", 10*time.Second, false, &s.shutdownTimeout)
	cfg.Custom("dsn_return_size_limit", false, false, func() (interface{}, error) { return int64(dsn.DefaultMaxFullSize), nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			size, err := config.ParseDataSize(strings.Join(n.Args, " "))
			if err != nil || size <= 0 {
				return nil, config.NodeErr(n, "dsn_return_size_limit: %q is not a positive size, e.g. 10M or 512K", strings.Join(n.Args, " "))
			}
			return int64(size), nil
		}, &s.returnSizeLimit)
	cfg.Custom("success_action", false, false, func() (interface{}, error) { return "auto", nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			if len(n.Args) != 1 || (n.Args[0] != "auto" && n.Args[0] != "delivered" && n.Args[0] != "relayed") {
				return nil, config.NodeErr(n, "success_action: want auto, delivered or relayed, got %q", strings.Join(n.Args, " "))
			}
			return n.Args[0], nil
		}, &successActionInput)
	cfg.String("admin_socket", false, false, "", &s.adminSocket)
	cfg.Custom("min_free_space", false, false, func() (interface{}, error) { return uint64(defaultMinFreeSpace), nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			// maddy's size syntax, as in max_message_size: 100M, 1G 512M;
			// 0 disables the check.
			v, err := config.ParseDataSize(strings.Join(n.Args, " "))
			if err != nil || len(n.Args) == 0 {
				return nil, config.NodeErr(n, "min_free_space: %q is not a size, e.g. 100M or 2G (0 disables)", strings.Join(n.Args, " "))
			}
			return uint64(v), nil
		}, &s.minFreeSpace)
	cfg.Custom("store", false, false, func() (interface{}, error) { return storeSettings{}, nil },
		func(_ *config.Map, n config.Node) (interface{}, error) { return parseStore(cfg.Globals, n) }, &s.store)
	cfg.Custom("bounce", false, false, nil, func(_ *config.Map, n config.Node) (interface{}, error) {
		return &n, nil
	}, &bounceNode)
	if _, err := cfg.Process(); err != nil {
		return err
	}

	block := cfg.Block
	switch {
	case delays != nil && (initial != 0 || maxDelay != 0 || factor != 0):
		return config.NodeErr(block, "%s: use either retry_schedule or retry_initial/retry_factor/retry_max, not both", ModName)
	case delays != nil:
		s.policy.Delays = delays
	case initial != 0 || maxDelay != 0 || factor != 0:
		if initial == 0 {
			initial = schedule.DefaultDelays[0]
		}
		if maxDelay == 0 {
			maxDelay = schedule.DefaultDelays[len(schedule.DefaultDelays)-1]
		}
		if factor == 0 {
			factor = 2
		}
		d, err := schedule.Exponential(initial, factor, maxDelay)
		if err != nil {
			return config.NodeErr(block, "%s: retry_initial/retry_factor/retry_max: %v", ModName, err)
		}
		s.policy.Delays = d
	default:
		s.policy.Delays = schedule.DefaultDelays
	}
	if err := s.policy.Validate(); err != nil {
		return config.NodeErr(block, "%s: %v", ModName, err)
	}

	s.successAction = successActionInput
	if s.successAction == "auto" {
		s.successAction = successActionFor(q.target)
	}
	s.destinations = destinationModeFor(destinationInput, q.target)
	s.backoffMin, s.backoffMax = backoff[0], backoff[1]
	if err := s.readFallbackAfter(q.fallback != nil, fallbackAfter); err != nil {
		return err
	}

	if bounceNode != nil {
		if s.autogenDomain == "" {
			return config.NodeErr(*bounceNode, "%s: autogenerated_msg_domain is required when bounce {} is used (DSNs are sent from MAILER-DAEMON@ that domain)", ModName)
		}
		p, err := newBouncePipeline(cfg.Globals, *bounceNode, q.name, s.hostname)
		if err != nil {
			return err
		}
		q.bounce = p
	}

	switch s.adminSocket {
	case "":
		s.adminSocket = filepath.Join(config.RuntimeDirectory, DefaultAdminSocket)
	case "off":
		s.adminSocket = ""
	}

	if s.store.lease == 0 {
		s.store.lease = defaultLease
	}
	if s.store.node == "" {
		s.store.node = s.hostname
	}
	if q.location == "" && s.store.kind == storePostgres {
		q.location = "postgres" // names the instance in metrics; no files
	}
	if q.location == "" {
		if q.name == "" {
			return config.NodeErr(block, "%s: an inline definition needs a location argument", ModName)
		}
		q.location = filepath.Join(config.StateDirectory, q.name)
	}
	return nil
}

// parseStore reads the store directive:
//
//	store embedded
//	store postgres {
//	    dsn "host=/run/postgresql dbname=spool user=maddy"
//	    node mx1        # default: the global hostname
//	    lease 5m        # default; renewed while an attempt runs
//	}
func parseStore(globals map[string]interface{}, n config.Node) (interface{}, error) {
	if len(n.Args) != 1 {
		return nil, config.NodeErr(n, "store: want embedded or postgres, got %q", strings.Join(n.Args, " "))
	}
	switch n.Args[0] {
	case "embedded":
		if len(n.Children) > 0 {
			return nil, config.NodeErr(n, "store embedded takes no block (its directory is location)")
		}
		return storeSettings{kind: storeEmbedded}, nil
	case "postgres":
	default:
		return nil, config.NodeErr(n, "store: unknown store %q, want embedded or postgres", n.Args[0])
	}
	st := storeSettings{kind: storePostgres}
	m := config.NewMap(globals, n)
	m.String("dsn", false, true, "", &st.dsn)
	m.String("node", false, false, "", &st.node)
	durationDirective(m, "lease", defaultLease, false, &st.lease)
	if _, err := m.Process(); err != nil {
		return nil, err
	}
	if st.lease < minLease {
		return nil, config.NodeErr(n, "store postgres: lease %v is too short: an attempt renews its lease every third of it, and a pause of the node longer than that hands its mail to another node; use %v or more", st.lease, minLease)
	}
	if err := checkNodeName(st.node); err != nil {
		return nil, config.NodeErr(n, "store postgres: node: %v", err)
	}
	return st, nil
}

// checkNodeName refuses node names that would be unreadable in logs,
// listings and metrics.
func checkNodeName(s string) error {
	if len(s) > 64 {
		return fmt.Errorf("%q is longer than 64 characters", s[:64]+"...")
	}
	for _, r := range s {
		if r <= ' ' || r == 0x7f || r > '~' {
			return fmt.Errorf("%q: use letters, digits and punctuation, no spaces", s)
		}
	}
	return nil
}

// newBouncePipeline builds the bounce {} block with maddy's registered
// msgpipeline module, the same routing language as the smtp endpoint.
func newBouncePipeline(globals map[string]interface{}, node config.Node, instName, hostname string) (module.DeliveryTarget, error) {
	factory := module.Get("msgpipeline")
	if factory == nil {
		return nil, config.NodeErr(node, "%s: bounce: maddy's msgpipeline module is not compiled in", ModName)
	}
	mod, err := factory("msgpipeline", instName+"/bounce", nil, nil)
	if err != nil {
		return nil, config.NodeErr(node, "%s: bounce: %v", ModName, err)
	}
	// The pipeline inherits our hostname (the block's own, or the global
	// one), unless the bounce block sets its own.
	g := make(map[string]interface{}, len(globals)+1)
	for k, v := range globals {
		g[k] = v
	}
	g["hostname"] = hostname
	if err := mod.Init(config.NewMap(g, node)); err != nil {
		return nil, err
	}
	target, ok := mod.(module.DeliveryTarget)
	if !ok {
		return nil, config.NodeErr(node, "%s: bounce: msgpipeline is not a delivery target", ModName)
	}
	return target, nil
}

// Defaults of the per-destination directives. 100 attempts at once and 20
// per destination are Postfix's default_process_limit and
// default_destination_concurrency_limit: a destination that turns slow or
// dead can hold at most a fifth of the attempts, so the other four fifths
// keep flowing, while one destination still gets as many parallel
// connections as large providers accept from one sender. The dead
// destination rules suspend a destination after 5 failed attempts in a
// row (so a burst of new mail for a dead host costs about the
// per-destination limit in attempts, not one per message), and probe it
// after 10s, then 20s, and at most every 30s: a destination that comes
// back is found within 30s, so its whole backlog goes out within the
// minute after (see docs/performance.md), while a dead one costs two
// probes a minute.
const (
	defaultMaxParallelism = 100
	defaultPerDestination = 20
	defaultDeadAfter      = 5
	defaultBackoffMin     = 10 * time.Second
	defaultBackoffMax     = 30 * time.Second
	defaultFallbackTries  = 3
)

// destinationMode is how a queue maps recipients to destinations.
type destinationMode uint8

const (
	// destinationDomain: each recipient domain is a destination; a
	// message with recipients in several domains is stored once per
	// domain (as target.remote sends one transaction per domain anyway).
	destinationDomain destinationMode = iota
	// destinationSingle: the nested target is one destination (a relay,
	// an LMTP server); messages are stored whole.
	destinationSingle
)

// destinationModeFor resolves the destination directive. auto picks
// domain for target.remote, which connects to each recipient domain's own
// servers, and single for anything else, which sends all recipients of a
// message in one transaction that splitting would break up.
func destinationModeFor(input string, t module.DeliveryTarget) destinationMode {
	switch input {
	case "domain":
		return destinationDomain
	case "single":
		return destinationSingle
	}
	if m, ok := t.(module.Module); ok && m.Name() == "target.remote" {
		return destinationDomain
	}
	return destinationSingle
}

// readFallbackAfter reads fallback_after: a number of tries, or an age.
func (s *settings) readFallbackAfter(haveFallback bool, n *config.Node) error {
	if n == nil {
		if haveFallback {
			s.fallbackTries = defaultFallbackTries
		}
		return nil
	}
	if !haveFallback {
		return config.NodeErr(*n, "fallback_after needs fallback_target")
	}
	arg := strings.Join(n.Args, " ")
	if v, err := strconv.Atoi(arg); err == nil && v >= 1 && len(n.Args) == 1 {
		s.fallbackTries = v
		return nil
	}
	if d, err := parseDuration(arg); err == nil && d > 0 && len(n.Args) == 1 {
		s.fallbackAge = d
		return nil
	}
	return config.NodeErr(*n, "fallback_after: %q is neither a number of tries (e.g. 3) nor an age (e.g. 30m)", arg)
}

// successActionFor decides the DSN action for NOTIFY=SUCCESS recipients:
// targets that store mail locally deliver it ("delivered"); anything else
// hands it to another MTA, which may not carry the DSN request onward, so
// Spool reports "relayed" (RFC 3464 section 2.3.3).
func successActionFor(t module.DeliveryTarget) string {
	if m, ok := t.(module.Module); ok {
		switch m.Name() {
		case "imapsql", "target.lmtp":
			return "delivered"
		}
	}
	return "relayed"
}

func intDirective(cfg *config.Map, name string, def int, store *int) {
	cfg.Custom(name, false, false, func() (interface{}, error) { return def, nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			if len(n.Args) != 1 {
				return nil, config.NodeErr(n, "%s: want one number", name)
			}
			v, err := strconv.Atoi(n.Args[0])
			if err != nil || v < 1 {
				return nil, config.NodeErr(n, "%s: %q is not a positive whole number", name, n.Args[0])
			}
			return v, nil
		}, store)
}

func durationDirective(cfg *config.Map, name string, def time.Duration, zeroOK bool, store *time.Duration) {
	cfg.Custom(name, false, false, func() (interface{}, error) { return def, nil },
		func(_ *config.Map, n config.Node) (interface{}, error) {
			if len(n.Args) != 1 {
				return nil, config.NodeErr(n, "%s: want one duration, e.g. 30m or 5d", name)
			}
			d, err := parseDuration(n.Args[0])
			if err != nil || d < 0 || (d == 0 && !zeroOK) {
				return nil, config.NodeErr(n, "%s: %q is not a positive duration", name, n.Args[0])
			}
			return d, nil
		}, store)
}

// parseDuration is time.ParseDuration plus a leading day count ("5d",
// "1d12h"), since queue lifetimes are naturally said in days.
func parseDuration(s string) (time.Duration, error) {
	days, rest, found := strings.Cut(s, "d")
	if !found {
		return time.ParseDuration(s)
	}
	n, err := strconv.ParseUint(days, 10, 16)
	if err != nil || n > 3650 {
		return 0, fmt.Errorf("invalid day count in %q", s)
	}
	d := time.Duration(n) * 24 * time.Hour
	if rest != "" {
		r, err := time.ParseDuration(rest)
		if err != nil || r < 0 {
			return 0, fmt.Errorf("invalid duration %q", s)
		}
		d += r
	}
	return d, nil
}
