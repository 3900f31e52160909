package main

import (
	"fmt"
	"math"
	"os"
	"time"

	"github.com/maddy-spool/spool/internal/bench"
)

// destinations runs the section of issue 12 (destination-aware delivery):
// a slow destination next to healthy ones, and a destination that is dead
// for a while and comes back, end to end through the maddy binary with
// each queue at its defaults (Spool with `destination domain`). spool-pg
// is not measured here: its limits and suspensions are the same code.
func (r *runner) destinations() error {
	var kinds []bench.Kind
	for _, k := range r.o.kinds {
		if !k.InDatabase() {
			kinds = append(kinds, k)
		}
	}
	if len(kinds) == 0 {
		return nil
	}
	bin, err := r.maddyBin()
	if err != nil {
		return err
	}
	if err := r.destSlow(bin, kinds); err != nil {
		return err
	}
	return r.destDead(bin, kinds)
}

// destConfig is a destinations run of kind in a fresh state directory.
func (r *runner) destConfig(bin string, kind bench.Kind, label string) (bench.DestConfig, error) {
	dir := r.freshDir(string(kind) + "-" + label)
	c := bench.DestConfig{Bin: bin, Kind: kind, Dir: dir, Messages: r.o.destN, Clients: r.o.e2eConns, BodySize: 4096, Timeout: r.o.timeout}
	return c, os.MkdirAll(dir, 0o755)
}

func (r *runner) destSlow(bin string, kinds []bench.Kind) error {
	r.table.Section(fmt.Sprintf("destinations, slow: maddy binary, smtp endpoint → queue → target.smtp → go-smtp sink; %d clients, %d × 4 KiB, 1 in %d for %s (%v per RCPT), the rest over %d other domains; queues at their defaults (spool: destination domain)",
		r.o.e2eConns, r.o.destN, bench.SlowEvery, bench.SlowDomain, r.o.destSlowDelay, bench.OtherDomains))
	thrBase := r.table.Figure("other mail delivered, slow domain answering at once", "msg/s")
	thrSlow := r.table.Figure("other mail delivered, slow domain slow", "msg/s")
	thrRatio := r.table.Figure("other mail throughput, slow / at once", "x")
	p50Base := r.table.Figure("other mail MAIL → sink p50, slow domain at once", "ms")
	p50Slow := r.table.Figure("other mail MAIL → sink p50, slow domain slow", "ms")
	p50Ratio := r.table.Figure("other mail p50, slow / at once", "x")
	p99Base := r.table.Figure("other mail MAIL → sink p99, slow domain at once", "ms")
	p99Slow := r.table.Figure("other mail MAIL → sink p99, slow domain slow", "ms")
	slowTook := r.table.Figure("slow domain's mail all delivered, from the first MAIL", "ms")
	slowPar := r.table.Figure("slow domain's most transactions at once at the sink", "")
	dups := r.table.Figure("duplicate deliveries, both runs", "")
	goal := func(f *bench.Figure, bound float64, below bool, what string) target {
		return target{
			name: fmt.Sprintf("slow destination: other mail's %s with it %s %.1f× that without it (spool)", what, map[bool]string{true: "≤", false: "≥"}[below], bound),
			check: func() (string, bool, bool) {
				v, ok := f.Value(bench.Spool)
				m, mok := f.Value(bench.Maddy)
				got := fmt.Sprintf("%.2f×", v)
				if mok {
					got += fmt.Sprintf(" (maddy %.2f×)", m)
				}
				met := v >= bound
				if below {
					met = v <= bound
				}
				return got, met && !math.IsNaN(v), ok
			},
		}
	}
	r.targets = append(r.targets,
		goal(p50Ratio, bench.SlowLatencyBound, true, "MAIL → sink p50"),
		goal(thrRatio, bench.SlowThroughputBound, false, "throughput"))
	for round := 0; round < r.o.rounds; round++ {
		for _, kind := range kinds {
			var runs [2]bench.SlowResult
			for i, delay := range []time.Duration{0, r.o.destSlowDelay} {
				c, err := r.destConfig(bin, kind, "dest-slow")
				if err != nil {
					return err
				}
				r.progress("destinations, slow domain %v per RCPT, %s, round %d", delay, kind, round+1)
				res, err := bench.RunSlowDestination(bench.SlowConfig{DestConfig: c, RcptDelay: delay})
				if !r.o.keep {
					os.RemoveAll(c.Dir)
				}
				if err != nil {
					return fmt.Errorf("%s, slow domain %v: %w", kind, delay, err)
				}
				if res.Other.Count < res.OtherSent || res.Slow.Count < res.SlowSent {
					thrSlow.AddNote("%s (slow %v): only %d+%d of %d+%d delivered within %v", kind, delay,
						res.Other.Count, res.Slow.Count, res.OtherSent, res.SlowSent, r.o.timeout)
				}
				runs[i] = res
			}
			base, slow := runs[0], runs[1]
			thrBase.Add(kind, base.Other.Rate())
			thrSlow.Add(kind, slow.Other.Rate())
			p50Base.Add(kind, bench.Ms(base.Other.P50()))
			p50Slow.Add(kind, bench.Ms(slow.Other.P50()))
			p99Base.Add(kind, bench.Ms(base.Other.P99()))
			p99Slow.Add(kind, bench.Ms(slow.Other.P99()))
			lat, thr, _, _ := bench.SlowVerdict(base.Other, slow.Other)
			p50Ratio.Add(kind, lat)
			thrRatio.Add(kind, thr)
			slowTook.Add(kind, bench.Ms(slow.Slow.Took))
			slowPar.Add(kind, float64(slow.SlowMaxInFlight))
			dups.Add(kind, float64(base.Duplicates+slow.Duplicates))
		}
	}
	return nil
}

func (r *runner) destDead(bin string, kinds []bench.Kind) error {
	const every = 50 * time.Millisecond
	r.table.Section(fmt.Sprintf("destinations, dead: %d clients send %d × 4 KiB for %s, which refuses every RCPT (451 4.4.1) for %v from the first, then accepts; 1 message every %v for %s meanwhile (for %s during %v before: the baseline); queues at their defaults (spool: destination domain)",
		r.o.e2eConns, r.o.destN, bench.DeadDomain, r.o.destOutage, every, bench.OKDomain, bench.BaseDomain, r.o.destBaseline))
	attempts := r.table.Figure("attempts reaching the dead domain during the outage", "")
	first := r.table.Figure("… of them in the outage's first 10 s", "")
	par := r.table.Figure("dead domain's most transactions at once at the sink", "")
	found := r.table.Figure("recovery → its first message delivered (the probe)", "ms")
	recovery := r.table.Figure("recovery → its last message delivered", "ms")
	drain := r.table.Figure("its messages delivered after the recovery, first → last", "msg/s")
	delivered := r.table.Figure(fmt.Sprintf("its messages delivered (of %d)", r.o.destN), "")
	p50Base := r.table.Figure("other mail MAIL → sink p50, before the outage", "ms")
	p50OK := r.table.Figure("other mail MAIL → sink p50, during the outage", "ms")
	p50Ratio := r.table.Figure("other mail p50, during / before the outage", "x")
	p99OK := r.table.Figure("other mail MAIL → sink p99, during the outage", "ms")
	dups := r.table.Figure("duplicate deliveries", "")
	var (
		worstAttempts int
		worstRecovery time.Duration
		allDelivered  = true
		attemptsMet   = true
		recoveryMet   = true
		measured      bool
	)
	maddyNote := func(f *bench.Figure, format func(float64) string) string {
		if v, ok := f.Value(bench.Maddy); ok {
			return " (maddy " + format(v) + ")"
		}
		return ""
	}
	r.targets = append(r.targets,
		target{
			name: fmt.Sprintf("dead destination: at most %d attempts reach it during a %v outage (spool, worst round)", bench.DeadAttemptsBound, r.o.destOutage),
			check: func() (string, bool, bool) {
				return fmt.Sprintf("%d%s", worstAttempts, maddyNote(attempts, func(v float64) string { return fmt.Sprintf("%.0f", v) })),
					attemptsMet, measured
			},
		},
		target{
			name: fmt.Sprintf("dead destination: all %d of its messages delivered within %v of its recovery (spool, worst round)", r.o.destN, bench.DeadRecoveryBound),
			check: func() (string, bool, bool) {
				got := worstRecovery.Round(time.Millisecond).String()
				if !allDelivered {
					got = "not all delivered within " + r.o.timeout.String()
				}
				if v, ok := delivered.Value(bench.Maddy); ok {
					got += fmt.Sprintf(" (maddy: %.0f delivered in %v)", v, r.o.timeout)
				}
				return got, recoveryMet, measured
			},
		},
		target{
			name: fmt.Sprintf("dead destination: other mail's MAIL → sink p50 during the outage ≤ %.1f× that before it (spool)", bench.OutageLatencyBound),
			check: func() (string, bool, bool) {
				v, ok := p50Ratio.Value(bench.Spool)
				return fmt.Sprintf("%.2f×%s", v, maddyNote(p50Ratio, func(v float64) string { return fmt.Sprintf("%.2f×", v) })),
					v <= bench.OutageLatencyBound, ok
			},
		})
	for round := 0; round < r.o.rounds; round++ {
		for _, kind := range kinds {
			c, err := r.destConfig(bin, kind, "dest-dead")
			if err != nil {
				return err
			}
			r.progress("destinations, dead domain for %v, %s, round %d", r.o.destOutage, kind, round+1)
			res, err := bench.RunDeadDestination(bench.DeadConfig{DestConfig: c, Outage: r.o.destOutage, Baseline: r.o.destBaseline, TrickleEvery: every})
			if !r.o.keep {
				os.RemoveAll(c.Dir)
			}
			if err != nil {
				return fmt.Errorf("%s, dead domain: %w", kind, err)
			}
			attempts.Add(kind, float64(res.OutageAttempts))
			first.Add(kind, float64(res.FirstTenSeconds))
			par.Add(kind, float64(res.MaxInFlight))
			delivered.Add(kind, float64(res.Dead.Count))
			if res.Dead.Count > 0 {
				found.Add(kind, bench.Ms(res.RecoveryToFirst))
			}
			if res.Dead.Count > 1 && res.Dead.Took > res.Dead.First {
				drain.Add(kind, float64(res.Dead.Count-1)/(res.Dead.Took-res.Dead.First).Seconds())
			}
			if res.Dead.Count < res.DeadSent {
				recovery.AddNote("%s: only %d of %d delivered within %v of the recovery", kind, res.Dead.Count, res.DeadSent, r.o.timeout)
			} else {
				recovery.Add(kind, bench.Ms(res.RecoveryToLast))
			}
			if res.OK.Count < res.OKSent {
				p50OK.AddNote("%s: only %d of %d delivered", kind, res.OK.Count, res.OKSent)
			}
			p50Base.Add(kind, bench.Ms(res.Base.P50()))
			p50OK.Add(kind, bench.Ms(res.OK.P50()))
			p99OK.Add(kind, bench.Ms(res.OK.P99()))
			p50Ratio.Add(kind, float64(res.OK.P50())/float64(res.Base.P50()))
			dups.Add(kind, float64(res.Duplicates))
			if kind == bench.Spool {
				measured = true
				worstAttempts = max(worstAttempts, res.OutageAttempts)
				worstRecovery = max(worstRecovery, res.RecoveryToLast)
				allDelivered = allDelivered && res.Dead.Count >= res.DeadSent
				aOK, rOK := bench.DeadVerdict(res)
				attemptsMet, recoveryMet = attemptsMet && aOK, recoveryMet && rOK
			}
		}
	}
	return nil
}
