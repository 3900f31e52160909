package bench

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/testutils"
)

// The destinations section (issue 12) runs the maddy binary as the
// end-to-end section does (smtp endpoint → queue → target.smtp → go-smtp
// sink), with recipients at several domains. target.smtp sends every
// domain to the one sink, which plays each domain's servers through its
// per-domain behaviour (testutils.DomainBehaviour) and counts what
// reached it per domain. Both queues run at their own defaults
// (max_parallelism 16 for target.queue; 100, 20 per destination, dead
// after 5, suspended 10s to 30s for target.spool); Spool is told that the
// recipient domains are its destinations (`destination domain`), since
// with target.smtp it would otherwise treat the one next hop as one.

// Domains of the destinations section.
const (
	// SlowDomain's server takes SlowConfig.RcptDelay to answer each RCPT.
	SlowDomain = "slow.bench.example"
	// DeadDomain's server refuses every RCPT with 451 4.4.1 during the
	// outage, then accepts.
	DeadDomain = "dead.bench.example"
	// BaseDomain gets the trickle of mail before the outage, OKDomain
	// during it; both answer at once.
	BaseDomain = "base.bench.example"
	OKDomain   = "ok.bench.example"
)

// SlowEvery: every SlowEvery-th message of the slow-destination load is
// for SlowDomain (5 %).
const SlowEvery = 20

// OtherDomains is the number of healthy domains sharing the rest of the
// slow-destination load.
const OtherDomains = 4

// OtherDomain is the i-th healthy domain (from 0) of the slow-destination
// load.
func OtherDomain(i int) string { return "d" + strconv.Itoa(i+1) + ".bench.example" }

// SlowLoadRcpt is the recipient of the seq-th message (from 1) of the
// slow-destination load: every SlowEvery-th is for SlowDomain, the others
// go round the OtherDomains in turn.
func SlowLoadRcpt(seq int64) string {
	user := "u" + strconv.FormatInt(seq, 10) + "@"
	if seq%SlowEvery == 0 {
		return user + SlowDomain
	}
	other := seq - seq/SlowEvery // the how-manieth other message this is
	return user + OtherDomain(int(other%OtherDomains))
}

// Goals of issue 12, checked by spool-bench.
const (
	// The other mail's MAIL→sink median with a slow destination stays
	// within SlowLatencyBound times its median without one, and its
	// throughput at least SlowThroughputBound times.
	SlowLatencyBound    = 2.0
	SlowThroughputBound = 0.8
	// At most DeadAttemptsBound attempts reach a dead destination during
	// its outage, and its mail is all delivered within DeadRecoveryBound
	// of its coming back.
	DeadAttemptsBound = 100
	DeadRecoveryBound = 60 * time.Second
	// Mail for another domain during the outage keeps its median within
	// OutageLatencyBound times its median before the outage.
	OutageLatencyBound = 2.0
)

// SlowVerdict compares the other mail of a run with a slow destination
// (slow) with that of a run without (base): the ratios of the medians and
// of the throughputs, and whether each meets its goal. A ratio with a zero
// or missing denominator is NaN and does not meet its goal.
func SlowVerdict(base, slow DomainResult) (latRatio, thrRatio float64, latOK, thrOK bool) {
	latRatio = ratio(Ms(base.P50()), Ms(slow.P50()))
	thrRatio = ratio(base.Rate(), slow.Rate())
	return latRatio, thrRatio, latRatio <= SlowLatencyBound, thrRatio >= SlowThroughputBound
}

// DeadVerdict says whether a dead-destination run met its goals: few
// attempts during the outage, and all of its mail delivered soon after
// the destination came back.
func DeadVerdict(r DeadResult) (attemptsOK, recoveryOK bool) {
	attemptsOK = r.OutageAttempts <= DeadAttemptsBound
	recoveryOK = r.Dead.Count >= r.DeadSent && r.DeadSent > 0 && r.RecoveryToLast <= DeadRecoveryBound
	return attemptsOK, recoveryOK
}

// ratio is b/a, NaN when a is 0.
func ratio(a, b float64) float64 {
	if a == 0 {
		return math.NaN()
	}
	return b / a
}

// CountWithin counts the times in [from, to).
func CountWithin(times []time.Time, from, to time.Time) int {
	n := 0
	for _, t := range times {
		if !t.Before(from) && t.Before(to) {
			n++
		}
	}
	return n
}

// DomainResult is what the sink received of a group of domains.
type DomainResult struct {
	// Count is the messages received.
	Count int
	// Latency holds each one's time from MAIL to the sink's receipt.
	Latency []time.Duration
	// First and Took are the times from the start of the load until the
	// first and the last one arrived.
	First, Took time.Duration
}

// P50 is the median latency.
func (d DomainResult) P50() time.Duration { return Percentile(d.Latency, 50) }

// P99 is the 99th percentile latency.
func (d DomainResult) P99() time.Duration { return Percentile(d.Latency, 99) }

// Rate is the messages received per second from the start of the load.
func (d DomainResult) Rate() float64 {
	if d.Took <= 0 {
		return 0
	}
	return float64(d.Count) / d.Took.Seconds()
}

// DestConfig describes one run of the destinations section.
type DestConfig struct {
	Bin      string // maddy binary
	Kind     Kind   // Maddy or Spool
	Dir      string // the server's state directory
	Messages int
	Clients  int
	BodySize int
	// Timeout bounds each wait for deliveries (after the outage: from
	// the recovery on).
	Timeout time.Duration
}

// e2e is the end-to-end configuration of a destinations run: the
// module's defaults, with the recipient domains as Spool's destinations.
func (c DestConfig) e2e() E2EConfig {
	e := E2EConfig{Bin: c.Bin, Kind: c.Kind, Dir: c.Dir, Timeout: c.Timeout, QueueDefaults: true}
	if c.Kind != Maddy {
		e.QueueExtra = []string{"destination domain"}
	}
	return e
}

// destSink is the sink of a destinations run: the testutils sink, with
// the MAIL→sink latency of each message recorded under its recipient's
// group (group maps a domain to it), and the times of the RCPTs for one
// watched domain.
type destSink struct {
	*testutils.SMTPSink
	group func(domain string) string

	mu      sync.Mutex
	start   time.Time
	res     map[string]*DomainResult
	watched []time.Time
	changed chan struct{} // closed and replaced on each delivery
}

func startDestSink(group func(string) string, watch string) (*destSink, error) {
	s := &destSink{group: group, res: map[string]*DomainResult{}, changed: make(chan struct{})}
	script := func(stage, _, rcpt string, _ int) *smtp.SMTPError {
		if stage == testutils.StageRCPT && watch != "" && testutils.AddrDomain(rcpt) == watch {
			s.mu.Lock()
			s.watched = append(s.watched, time.Now())
			s.mu.Unlock()
		}
		return nil
	}
	var err error
	s.SMTPSink, err = testutils.StartSMTPSink(testutils.WithoutRecording(), testutils.WithScript(script),
		testutils.WithOnMessage(s.received))
	return s, err
}

func (s *destSink) received(m *testutils.Message) error {
	now := time.Now()
	h, err := m.Header()
	if err != nil || len(m.Rcpts) == 0 {
		return nil
	}
	ns, err := strconv.ParseInt(h.Get(SentHeader), 10, 64)
	if err != nil {
		return nil
	}
	g := s.group(testutils.AddrDomain(m.Rcpts[0]))
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.res[g]
	if r == nil {
		r = &DomainResult{}
		s.res[g] = r
	}
	r.Count++
	r.Latency = append(r.Latency, now.Sub(time.Unix(0, ns)))
	if !s.start.IsZero() {
		r.Took = now.Sub(s.start)
		if r.Count == 1 {
			r.First = r.Took
		}
	}
	close(s.changed)
	s.changed = make(chan struct{})
	return nil
}

// setStart sets the start of the load, from which DomainResult.Took
// counts.
func (s *destSink) setStart(t time.Time) {
	s.mu.Lock()
	s.start = t
	s.mu.Unlock()
}

// result returns a copy of what a group received so far.
func (s *destSink) result(g string) DomainResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.res[g]
	if r == nil {
		return DomainResult{}
	}
	c := *r
	c.Latency = append([]time.Duration(nil), r.Latency...)
	return c
}

// watchedTimes returns the times of the watched domain's RCPTs so far.
func (s *destSink) watchedTimes() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.watched...)
}

// waitCounts waits until each group has received want[group] messages,
// or until deadline; it reports whether they all had.
func (s *destSink) waitCounts(want map[string]int, deadline time.Time) bool {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		s.mu.Lock()
		done := true
		for g, n := range want {
			if r := s.res[g]; n > 0 && (r == nil || r.Count < n) {
				done = false
			}
		}
		ch := s.changed
		s.mu.Unlock()
		if done {
			return true
		}
		select {
		case <-ch:
		case <-timer.C:
			return false
		}
	}
}

// Groups of the slow-destination load.
const (
	GroupSlow  = "slow"
	GroupOther = "other"
)

// SlowConfig is one run of the slow-destination load.
type SlowConfig struct {
	DestConfig
	// RcptDelay is how long SlowDomain's server takes for each RCPT; 0
	// makes it answer at once (the run without a slow domain).
	RcptDelay time.Duration
}

// SlowResult is what one slow-destination run saw.
type SlowResult struct {
	Accepted int
	// Other is the mail of the healthy domains, Slow that of SlowDomain.
	Other, Slow DomainResult
	// OtherSent and SlowSent are the messages accepted for each.
	OtherSent, SlowSent int
	// SlowMaxInFlight is the most transactions for SlowDomain the sink
	// saw at once.
	SlowMaxInFlight int
	Duplicates      int
}

// RunSlowDestination sends c.Messages, one recipient each (SlowLoadRcpt),
// through c.Clients SMTP connections and waits until the sink has them
// all (or c.Timeout after the last was accepted).
func RunSlowDestination(c SlowConfig) (SlowResult, error) {
	var res SlowResult
	sink, err := startDestSink(func(d string) string {
		if d == SlowDomain {
			return GroupSlow
		}
		return GroupOther
	}, "")
	if err != nil {
		return res, err
	}
	defer sink.Close()
	if c.RcptDelay > 0 {
		sink.SetDomain(SlowDomain, testutils.DomainBehaviour{RcptDelay: c.RcptDelay})
	}
	servers, stop, err := startNodes(c.e2e(), func(int) int { return sink.Port() })
	if err != nil {
		return res, err
	}
	defer stop()
	start := time.Now()
	sink.setStart(start)
	accepted, err := sendSMTPTo([]string{servers[0].addr}, c.Clients, c.Messages, c.BodySize, SlowLoadRcpt)
	res.Accepted = int(accepted)
	if err != nil {
		return res, err
	}
	// Messages are numbered in the order they were handed to clients;
	// with no error, all of 1..accepted were accepted.
	for seq := int64(1); seq <= accepted; seq++ {
		if seq%SlowEvery == 0 {
			res.SlowSent++
		} else {
			res.OtherSent++
		}
	}
	sink.waitCounts(map[string]int{GroupOther: res.OtherSent, GroupSlow: res.SlowSent}, time.Now().Add(c.Timeout))
	res.Other, res.Slow = sink.result(GroupOther), sink.result(GroupSlow)
	res.SlowMaxInFlight = sink.DomainStats(SlowDomain).MaxInFlight
	res.Duplicates = len(sink.Duplicates())
	return res, nil
}

// DeadConfig is one run of the dead-destination load.
type DeadConfig struct {
	DestConfig
	// Outage is how long DeadDomain refuses, counted from the start of
	// the load.
	Outage time.Duration
	// Baseline is how long mail trickles to BaseDomain before the
	// outage; the same trickle goes to OKDomain during the outage.
	Baseline time.Duration
	// TrickleEvery is the spacing of the trickle's messages.
	TrickleEvery time.Duration
}

// Groups of the dead-destination load.
const (
	GroupDead = "dead"
	GroupBase = "base"
	GroupOK   = "ok"
)

// DeadResult is what one dead-destination run saw.
type DeadResult struct {
	// DeadSent messages for DeadDomain were accepted; Dead is what the
	// sink received of them.
	DeadSent int
	Dead     DomainResult
	// OutageAttempts counts the RCPTs for DeadDomain the sink refused
	// (each message has one recipient, so each is one attempt that
	// reached the destination); FirstTenSeconds those of the outage's
	// first 10 s, when the destination was found dead; MaxInFlight the
	// most transactions for it at once.
	OutageAttempts  int
	FirstTenSeconds int
	MaxInFlight     int
	// RecoveryToLast is the time from the destination's recovery until
	// its last message arrived (or until the wait ended, if not all did);
	// RecoveryToFirst until its first arrived (the probe that found it
	// back).
	RecoveryToLast, RecoveryToFirst time.Duration
	// Base is the trickle before the outage, OK the one during it.
	Base, OK         DomainResult
	BaseSent, OKSent int
	Duplicates       int
}

// RunDeadDestination: with DeadDomain down from the start, a trickle of
// mail to BaseDomain for c.Baseline (the baseline latency); then the
// outage: c.Messages for DeadDomain through c.Clients connections while
// the trickle goes on to OKDomain, until c.Outage after the outage began,
// when DeadDomain accepts again; then a wait until all of its mail has
// arrived (at most c.Timeout).
func RunDeadDestination(c DeadConfig) (DeadResult, error) {
	var res DeadResult
	sink, err := startDestSink(func(d string) string {
		switch d {
		case DeadDomain:
			return GroupDead
		case BaseDomain:
			return GroupBase
		}
		return GroupOK
	}, DeadDomain)
	if err != nil {
		return res, err
	}
	defer sink.Close()
	sink.SetDomain(DeadDomain, testutils.DomainBehaviour{RcptReply: testutils.SinkReply(451, [3]int{4, 4, 1}, DeadDomain+" is down")})
	servers, stop, err := startNodes(c.e2e(), func(int) int { return sink.Port() })
	if err != nil {
		return res, err
	}
	defer stop()
	addr := servers[0].addr

	ctx, cancel := context.WithTimeout(context.Background(), c.Baseline)
	res.BaseSent, err = trickle(ctx, addr, "@"+BaseDomain, c.TrickleEvery, c.BodySize)
	cancel()
	if err != nil {
		return res, err
	}
	if !sink.waitCounts(map[string]int{GroupBase: res.BaseSent}, time.Now().Add(c.Timeout)) {
		return res, fmt.Errorf("bench: dead destination: the baseline mail was not delivered within %v", c.Timeout)
	}

	outageStart := time.Now()
	sink.setStart(outageStart)
	ctx, cancel = context.WithDeadline(context.Background(), outageStart.Add(c.Outage))
	defer cancel()
	var (
		wg       sync.WaitGroup
		trickErr error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		res.OKSent, trickErr = trickle(ctx, addr, "@"+OKDomain, c.TrickleEvery, c.BodySize)
	}()
	accepted, sendErr := sendSMTPTo([]string{addr}, c.Clients, c.Messages, c.BodySize, func(seq int64) string {
		return "u" + strconv.FormatInt(seq, 10) + "@" + DeadDomain
	})
	res.DeadSent = int(accepted)
	<-ctx.Done()
	sink.ClearDomain(DeadDomain)
	recovered := time.Now()
	wg.Wait()
	if sendErr != nil {
		return res, sendErr
	}
	if trickErr != nil {
		return res, trickErr
	}
	sink.waitCounts(map[string]int{GroupDead: res.DeadSent, GroupOK: res.OKSent}, recovered.Add(c.Timeout))
	res.Dead, res.Base, res.OK = sink.result(GroupDead), sink.result(GroupBase), sink.result(GroupOK)
	if res.Dead.Count > 0 {
		res.RecoveryToFirst = res.Dead.First - recovered.Sub(outageStart)
	}
	if res.Dead.Count >= res.DeadSent {
		res.RecoveryToLast = res.Dead.Took - recovered.Sub(outageStart)
	} else {
		res.RecoveryToLast = time.Since(recovered)
	}
	st := sink.DomainStats(DeadDomain)
	res.OutageAttempts = st.RcptsRefused
	res.MaxInFlight = st.MaxInFlight
	res.FirstTenSeconds = CountWithin(sink.watchedTimes(), outageStart, outageStart.Add(10*time.Second))
	res.Duplicates = len(sink.Duplicates())
	return res, nil
}

// trickle sends one message to a new recipient at domain (given as
// "@domain") every `every` over one connection until ctx ends, and
// returns how many it sent.
func trickle(ctx context.Context, addr, domain string, every time.Duration, bodySize int) (int, error) {
	c, err := smtp.Dial(addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if err := c.Hello("trickle.bench.example"); err != nil {
		return 0, err
	}
	body := Body(bodySize)
	tick := time.NewTicker(every)
	defer tick.Stop()
	n := 0
	for {
		id := "t" + strconv.FormatInt(msgSeq.Add(1), 36)
		if err := sendOne(c, id, "t"+strconv.Itoa(n)+domain, body); err != nil {
			return n, err
		}
		n++
		select {
		case <-ctx.Done():
			c.Quit()
			return n, nil
		case <-tick.C:
		}
	}
}
