//go:build unix

package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/testutils"
)

// The destination tests run the built maddy with destination-aware
// delivery: the queue's destinations are the recipient domains, and the
// sink plays each domain's servers (slow, down, back again) through its
// per-domain behaviour, counting per domain what reached it.

// Limits of the destination tests: small, so that they are reached with a
// handful of messages.
const (
	destParallel = 8
	destLimit    = 2
)

// destOpts configure newDestEnv.
type destOpts struct {
	destination string   // the destination directive; "domain" if empty
	retry       string   // retry_schedule
	maxTries    string   // max_tries; "10" if empty
	blocks      string   // more top-level blocks for the configuration
	queue       []string // more lines for the target.spool block
}

// newDestEnv starts a server on writeConfig's configuration with
// destination domain (unless o says otherwise), max_parallelism destParallel and
// max_parallelism_per_destination destLimit. It has no metrics endpoint;
// `maddy spool` reaches it through its control socket.
func newDestEnv(t *testing.T, sink *testutils.SMTPSink, o destOpts) *env {
	t.Helper()
	if o.maxTries == "" {
		o.maxTries = "10"
	}
	if o.destination == "" {
		o.destination = "domain"
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sink per domain:\n%s", sink.DescribeDomains())
		}
	})
	return startEnv(t, sink, func(p *params) string {
		p.MetricsPort = 0
		p.Retry, p.MaxTries = o.retry, o.maxTries
		p.Extra = append([]string{
			"destination " + o.destination,
			fmt.Sprintf("max_parallelism %d", destParallel),
			fmt.Sprintf("max_parallelism_per_destination %d", destLimit),
		}, o.queue...)
		cfg := writeConfig(t, *p)
		if o.blocks != "" {
			patchConfig(t, cfg, "target.smtp next_hop {", o.blocks+"\n\ntarget.smtp next_hop {")
		}
		return cfg
	})
}

// down is the reply of a domain whose servers are down.
func down(domain string) testutils.DomainBehaviour {
	return testutils.DomainBehaviour{RcptReply: testutils.SinkReply(451, [3]int{4, 4, 1}, domain+" is down")}
}

// waitCtx bounds a wait on the sink by waitTimeout.
func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// waitDomain waits until cond holds for what the sink saw of domain.
func waitDomain(t *testing.T, sink *testutils.SMTPSink, domain string, cond func(testutils.DomainStats) bool) testutils.DomainStats {
	t.Helper()
	st, err := sink.WaitDomain(waitCtx(t), domain, cond)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// pair is one message (by Message-ID) for one recipient.
type pair struct{ id, rcpt string }

// submitEach submits one message per recipient, from sender@origin.test,
// numbered from first on, and returns the pairs in order.
func submitEach(t *testing.T, e *env, first int, rcpts ...string) []pair {
	t.Helper()
	var out []pair
	for i, r := range rcpts {
		id := msgID(t, first+i)
		if err := submit(t, e.smtpAddr(), "sender@origin.test", []string{r}, id); err != nil {
			t.Fatalf("submitting %s to %s: %v", id, r, err)
		}
		out = append(out, pair{id, r})
	}
	return out
}

// deliveredPairs reports whether msgs hold every pair.
func deliveredPairs(msgs []testutils.Message, pairs []pair) bool {
	have := make(map[pair]bool)
	for _, m := range msgs {
		for _, r := range m.Rcpts {
			have[pair{m.MessageID(), strings.ToLower(r)}] = true
		}
	}
	for _, p := range pairs {
		if !have[pair{p.id, strings.ToLower(p.rcpt)}] {
			return false
		}
	}
	return true
}

// waitPairs waits until the sink accepted every pair.
func waitPairs(t *testing.T, sink *testutils.SMTPSink, what string, pairs []pair) {
	t.Helper()
	waitSink(t, sink, what, func(msgs []testutils.Message) bool { return deliveredPairs(msgs, pairs) })
}

// statsJSON runs `spool stats --json` and decodes its one Stats line.
func (e *env) statsJSON() admin.Stats {
	e.t.Helper()
	r := e.spoolOK("stats", "--json")
	lines := nonEmptyLines(r.stdout)
	if len(lines) != 1 {
		e.t.Fatalf("stats --json printed %d lines, want 1: %v", len(lines), r)
	}
	var st admin.Stats
	if err := strictDecode(lines[0], &st); err != nil {
		e.t.Fatalf("stats --json %q: %v", lines[0], err)
	}
	return st
}

// suspended returns the entry of stats for dest, if it is suspended.
func suspended(st admin.Stats, dest string) (admin.Suspended, bool) {
	for _, s := range st.Suspended {
		if s.Destination == dest {
			return s, true
		}
	}
	return admin.Suspended{}, false
}

// waitStats polls `spool stats --json` (every 100ms, up to waitTimeout)
// until cond holds, and returns those stats.
func (e *env) waitStats(what string, cond func(admin.Stats) bool) admin.Stats {
	e.t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		st := e.statsJSON()
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("waiting for %s: stats are still %+v", what, st)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitSettled waits until the queue holds n messages of one recipient
// each, every one attempted or postponed (it has a last error) and none in
// flight.
func (e *env) waitSettled(n int) {
	e.t.Helper()
	e.waitQueue(fmt.Sprintf("%d settled messages", n), func(q map[string]admin.MessageInfo) bool {
		if len(q) != n {
			return false
		}
		for _, mi := range q {
			if mi.InFlight || len(mi.Pending) != 1 || mi.Pending[0].LastError == "" {
				return false
			}
		}
		return true
	})
}

// outcome is one "recipient outcome" log line's fields.
type outcome map[string]any

func (o outcome) str(k string) string {
	v, _ := o[k].(string)
	return v
}

func (o outcome) num(k string) int {
	v, ok := o[k].(float64)
	if !ok {
		return -1
	}
	return int(v)
}

// outcomes returns the "recipient outcome" lines logged so far whose
// message_id (the Message-ID header field) is <id>, in order.
func (e *env) outcomes(id string) []outcome {
	e.t.Helper()
	var out []outcome
	for _, l := range e.srv.logLines() {
		_, rest, ok := strings.Cut(l, "recipient outcome")
		if !ok {
			continue
		}
		i := strings.IndexByte(rest, '{')
		if i < 0 {
			e.t.Fatalf("recipient outcome line without fields: %s", l)
		}
		var o outcome
		if err := json.Unmarshal([]byte(rest[i:]), &o); err != nil {
			e.t.Fatalf("recipient outcome line %q: %v", l, err)
		}
		if o.str("message_id") == "<"+id+">" {
			out = append(out, o)
		}
	}
	return out
}

// TestSlowDestination: a domain whose server takes 2 s per RCPT holds at
// most max_parallelism_per_destination attempts; the rest of
// max_parallelism goes to the other domains, whose mail is all delivered
// while the slow domain's is still in progress, although the slow
// domain's mail (enough to fill all but one slot) came first.
func TestSlowDestination(t *testing.T) {
	t.Parallel()
	const rcptDelay = 2 * time.Second
	sink := newSink(t)
	sink.SetDomain("slow.test", testutils.DomainBehaviour{RcptDelay: rcptDelay})
	e := newDestEnv(t, sink, destOpts{retry: "1s"})

	start := time.Now()
	var slowRcpts []string
	for i := 1; i < destParallel; i++ {
		slowRcpts = append(slowRcpts, fmt.Sprintf("s%d@slow.test", i))
	}
	slow := submitEach(t, e, 100, slowRcpts...)
	// The slow domain's attempts are under way before the others' mail
	// arrives.
	waitDomain(t, sink, "slow.test", func(d testutils.DomainStats) bool { return d.InFlight == destLimit })

	var fastRcpts []string
	for i := 1; i <= 5; i++ {
		fastRcpts = append(fastRcpts, fmt.Sprintf("f%d@a.test", i), fmt.Sprintf("f%d@b.test", i))
	}
	fast := submitEach(t, e, 200, fastRcpts...)
	// A message for both kinds of domain: its fast part does not wait
	// for its slow part.
	mixed := msgID(t, 99)
	if err := submit(t, e.smtpAddr(), "sender@origin.test", []string{"m@slow.test", "m@c.test"}, mixed); err != nil {
		t.Fatal(err)
	}
	fast = append(fast, pair{mixed, "m@c.test"})

	waitPairs(t, sink, "the fast domains' mail", fast)
	fastDone := time.Since(start)
	atFast := sink.DomainStats("slow.test")
	t.Logf("fast domains: %d messages delivered %v after the first slow one was submitted; slow.test then: %v",
		len(fast), fastDone.Round(time.Millisecond), atFast)
	slowTotal := len(slow) + 1
	if atFast.Accepted >= slowTotal {
		t.Errorf("the slow domain's mail was all delivered (%d) before the fast domains' mail: it held it up", atFast.Accepted)
	}

	slow = append(slow, pair{mixed, "m@slow.test"})
	waitPairs(t, sink, "the slow domain's mail", slow)
	slowDone := time.Since(start)
	st := sink.DomainStats("slow.test")
	t.Logf("slow.test: %d messages delivered after %v (at %v per RCPT, %d at a time: at least %v); %v",
		slowTotal, slowDone.Round(time.Millisecond), rcptDelay, destLimit, time.Duration(slowTotal/destLimit)*rcptDelay, st)
	if st.MaxInFlight != destLimit {
		t.Errorf("slow.test had at most %d transactions at once at the sink, want max_parallelism_per_destination = %d", st.MaxInFlight, destLimit)
	}
	for _, d := range []string{"a.test", "b.test", "c.test"} {
		if st := sink.DomainStats(d); st.MaxInFlight > destLimit {
			t.Errorf("%s had %d transactions at once, over the limit %d", d, st.MaxInFlight, destLimit)
		}
	}
	if d := sink.Duplicates(); len(d) > 0 {
		t.Errorf("duplicate deliveries: %+v", d)
	}
	if n := e.srv.countLog("recipient outcome", `"status":"deferred"`); n != 0 {
		t.Errorf("%d recipients were deferred; a slow destination is not a failing one", n)
	}
	e.waitQueue("an empty queue", func(q map[string]admin.MessageInfo) bool { return len(q) == 0 })
}

// probesBy returns how many probes a destination suspended at since can
// have sent by end: the k-th probe starts no earlier than the sum of the
// first k suspensions after since (each failed probe starts a suspension
// twice as long as the last, up to longest; a probe's own duration only
// delays the next).
func probesBy(since, end time.Time, first, longest time.Duration) int {
	n := 0
	at := since
	for d := first; ; d = min(2*d, longest) {
		at = at.Add(d)
		if at.After(end) {
			return n
		}
		n++
	}
}

func TestProbesBy(t *testing.T) {
	t0 := time.Unix(1000, 0)
	for _, tc := range []struct {
		after time.Duration
		want  int
	}{{0, 0}, {999 * time.Millisecond, 0}, {time.Second, 1}, {3 * time.Second, 2}, {6 * time.Second, 2}, {7 * time.Second, 3}, {15 * time.Second, 5}} {
		if got := probesBy(t0, t0.Add(tc.after), time.Second, 4*time.Second); got != tc.want {
			t.Errorf("probes by %v: %d, want %d", tc.after, got, tc.want)
		}
	}
}

// TestDeadDestination: a domain whose server refuses every recipient
// with 451 4.4.1 gets a bounded number of transactions while it is down
// (its limit, dead_destination_after, and one per probe), however many
// messages wait for it; it is listed as suspended, its mail's tries count
// only real attempts, other domains' mail flows meanwhile, and once it
// accepts again all of its mail is delivered within about a probe
// interval, although each message's own next retry is an hour away.
func TestDeadDestination(t *testing.T) {
	t.Parallel()
	const (
		deadAfter  = 3
		backoffMin = time.Second
		backoffMax = 4 * time.Second
		messages   = 10
	)
	sink := newSink(t)
	sink.SetDomain("dead.test", down("dead.test"))
	e := newDestEnv(t, sink, destOpts{retry: "1h", queue: []string{
		fmt.Sprintf("dead_destination_after %d", deadAfter),
		fmt.Sprintf("dead_destination_backoff %v %v", backoffMin, backoffMax),
	}})

	var rcpts []string
	for i := 1; i <= messages; i++ {
		rcpts = append(rcpts, fmt.Sprintf("u%d@dead.test", i))
	}
	dead := submitEach(t, e, 100, rcpts...)

	// Suspended, with the reason and the next probe.
	st := e.waitStats("dead.test suspended", func(st admin.Stats) bool {
		s, ok := suspended(st, "dead.test")
		return ok && !s.NextProbe.IsZero()
	})
	susp, _ := suspended(st, "dead.test")
	t.Logf("suspended: %+v", susp)
	if !strings.Contains(susp.Reason, "451 4.4.1") || !strings.Contains(susp.Reason, "dead.test is down") {
		t.Errorf("suspension reason %q, want the destination's 451 4.4.1 reply", susp.Reason)
	}
	if susp.Since.IsZero() || !susp.NextProbe.After(susp.Since) || susp.NextProbe.After(time.Now().Add(backoffMax+time.Second)) {
		t.Errorf("suspended since %v, next probe %v: want a probe within the longest suspension", susp.Since, susp.NextProbe)
	}
	text := e.spoolOK("stats").stdout
	mustContain(t, "spool stats", text, "Suspended destinations", "dead.test", "451 4.4.1", "maddy spool retry --to @DOMAIN")

	// At least one probe went out and failed.
	waitDomain(t, sink, "dead.test", func(d testutils.DomainStats) bool { return d.Transactions >= destLimit+deadAfter })

	// Other domains' mail is delivered meanwhile.
	t0 := time.Now()
	others := submitEach(t, e, 200, "a@ok.test", "b@ok.test", "c@ok.test")
	waitPairs(t, sink, "the other domain's mail", others)
	t.Logf("ok.test: %d messages delivered in %v while dead.test was suspended", len(others), time.Since(t0).Round(time.Millisecond))
	if _, still := suspended(e.statsJSON(), "dead.test"); !still {
		t.Errorf("dead.test was no longer suspended after the other domain's mail was delivered")
	}

	// Tries count attempts, not postponements: the tries of the queued
	// messages add up to the transactions the sink saw (each message has
	// one recipient), and the postponed messages have none but carry the
	// destination's error.
	var q map[string]admin.MessageInfo
	var tries, postponed int
	deadline := time.Now().Add(waitTimeout)
	for {
		q = byID(e.listJSON("--to", "@dead.test"))
		seen := sink.DomainStats("dead.test").Rcpts
		tries, postponed = 0, 0
		inFlight := false
		for _, mi := range q {
			inFlight = inFlight || mi.InFlight
			for _, r := range mi.Pending {
				tries += r.Tries
				if r.Tries == 0 && strings.Contains(r.LastError, "451 4.4.1") {
					postponed++
				}
			}
		}
		if len(q) == messages && !inFlight && tries == seen && seen == sink.DomainStats("dead.test").Rcpts {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the tries in the queue (%d) never matched the RCPTs the sink saw (%d): %+v", tries, seen, q)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("queue: %d messages for dead.test, %d tries in all, %d postponed without a try", len(q), tries, postponed)
	if postponed == 0 {
		t.Errorf("no message was postponed without a try: %+v", q)
	}
	for _, mi := range q {
		if mi.Destination != "dead.test" || len(mi.Pending) != 1 {
			t.Errorf("message %s: destination %q, pending %+v", mi.ID, mi.Destination, mi.Pending)
		}
		if mi.NextAttempt.Before(time.Now().Add(30 * time.Minute)) {
			t.Errorf("message %s is due at %v: want its own retry an hour away", mi.ID, mi.NextAttempt)
		}
	}
	// The text listing too: tried recipients with their tries, postponed
	// ones with none.
	list := e.spoolOK("list", "--to", "@dead.test").stdout
	mustContain(t, "spool list", list, fmt.Sprintf("-- %d messages, %d recipients pending", messages, messages))
	for what, re := range map[string]*regexp.Regexp{
		"a tried recipient":     regexp.MustCompile(`(?m)^    u\d+@dead\.test  \([1-9]\d* tries\)  451 4\.4\.1 dead\.test is down$`),
		"a postponed recipient": regexp.MustCompile(`(?m)^    u\d+@dead\.test  451 4\.4\.1 dead\.test is down$`),
	} {
		if !re.MatchString(list) {
			t.Errorf("spool list shows no line for %s:\n%s", what, list)
		}
	}
	if postponedLogged := e.srv.countLog("recipient outcome", `"note":"postponed: destination suspended"`, `"tries":0`); postponedLogged < postponed {
		t.Errorf("%d postponements logged, want at least %d", postponedLogged, postponed)
	}

	// The domain comes back.
	sink.ClearDomain("dead.test")
	back := time.Now()
	waitPairs(t, sink, "the dead domain's mail after it came back", dead)
	took := time.Since(back)
	outage := sink.DomainStats("dead.test")
	probes := probesBy(susp.Since, back, backoffMin, backoffMax)
	bound := destLimit + deadAfter + probes
	t.Logf("dead.test: %d transactions refused during an outage of %v after its suspension (bound %d = limit %d + dead_destination_after %d + %d probes), for %d messages; all delivered %v after it came back (longest suspension %v)",
		outage.RcptsRefused, back.Sub(susp.Since).Round(time.Millisecond), bound, destLimit, deadAfter, probes, messages, took.Round(time.Millisecond), backoffMax)
	if outage.RcptsRefused > bound {
		t.Errorf("dead.test got %d transactions while down, want at most %d", outage.RcptsRefused, bound)
	}
	if outage.RcptsRefused < deadAfter {
		t.Errorf("dead.test got %d transactions while down, fewer than dead_destination_after %d", outage.RcptsRefused, deadAfter)
	}
	if limit := backoffMax + 5*time.Second; took > limit {
		t.Errorf("the waiting mail took %v to be delivered after the domain came back, want within %v (a probe interval and a few seconds)", took, limit)
	}
	if outage.MaxInFlight > destLimit {
		t.Errorf("dead.test had %d transactions at once, over the limit %d", outage.MaxInFlight, destLimit)
	}
	e.srv.waitLog("destination answers again; releasing the messages waiting for it")
	e.waitStats("dead.test no longer suspended", func(st admin.Stats) bool {
		_, ok := suspended(st, "dead.test")
		return !ok
	})
	e.waitQueue("an empty queue", func(q map[string]admin.MessageInfo) bool { return len(q) == 0 })
	if d := sink.Duplicates(); len(d) > 0 {
		t.Errorf("duplicate deliveries: %+v", d)
	}
	if d := dsns(sink.Messages()); len(d) > 0 {
		t.Errorf("unexpected DSNs:\n%s", describe(d))
	}
}

// TestRetryLiftsSuspension: with the domain back but its next probe a
// minute away, `maddy spool retry --to @dead.test` ends the suspension and
// gets its mail delivered at once.
func TestRetryLiftsSuspension(t *testing.T) {
	t.Parallel()
	const messages = 4
	sink := newSink(t)
	sink.SetDomain("dead.test", down("dead.test"))
	e := newDestEnv(t, sink, destOpts{retry: "1h", queue: []string{
		"dead_destination_after 2",
		"dead_destination_backoff 1m 2m",
	}})
	dead := submitEach(t, e, 100, "a@dead.test", "b@dead.test", "c@dead.test", "d@dead.test")
	e.waitStats("dead.test suspended", func(st admin.Stats) bool {
		s, ok := suspended(st, "dead.test")
		return ok && s.NextProbe.After(time.Now().Add(30*time.Second))
	})
	e.waitSettled(messages)

	sink.ClearDomain("dead.test")
	start := time.Now()
	r := e.spoolOK("retry", "--to", "@dead.test")
	mustContain(t, "spool retry", r.stdout, fmt.Sprintf("%d matched", messages))
	waitPairs(t, sink, "the dead domain's mail after retry", dead)
	took := time.Since(start)
	t.Logf("retry --to @dead.test: %d messages delivered %v after the command (next probe was a minute away): %s", messages, took.Round(time.Millisecond), strings.TrimSpace(r.stdout))
	if took > 10*time.Second {
		t.Errorf("delivery took %v after retry --to, want at once", took)
	}
	e.srv.waitLog("operator lifted the suspension of a destination")
	st := e.statsJSON()
	if s, ok := suspended(st, "dead.test"); ok {
		t.Errorf("stats still lists dead.test as suspended: %+v", s)
	}
	if strings.Contains(e.spoolOK("stats").stdout, "Suspended destinations") {
		t.Errorf("stats text still lists suspended destinations")
	}
	e.waitQueue("an empty queue", func(q map[string]admin.MessageInfo) bool { return len(q) == 0 })
}

// TestRetryLiftsWholeTargetSuspension: with destination single (what
// auto means for target.smtp), the whole next hop is one destination,
// shown as "*", and it is suspended like a domain once it has failed
// dead_destination_after attempts in a row. The next hop is back and the
// operator retries every message: the mail goes out at once, as `retry
// --to @domain` gets it out for a suspended domain, rather than being
// postponed until the next probe a minute later.
func TestRetryLiftsWholeTargetSuspension(t *testing.T) {
	t.Parallel()
	const messages = 3
	sink := newSink(t)
	sink.SetDomain("x.test", down("x.test"))
	e := newDestEnv(t, sink, destOpts{destination: "single", retry: "1h", queue: []string{
		"dead_destination_after 2",
		"dead_destination_backoff 1m 2m",
	}})
	submitEach(t, e, 100, "a@x.test", "b@x.test", "c@x.test")
	st := e.waitStats("the next hop suspended", func(st admin.Stats) bool {
		return len(st.Suspended) == 1 && st.Suspended[0].NextProbe.After(time.Now().Add(30*time.Second))
	})
	t.Logf("suspended: %+v", st.Suspended[0])
	if st.Suspended[0].Destination != "*" {
		t.Errorf("the whole next hop is listed as %q, want *", st.Suspended[0].Destination)
	}
	e.waitSettled(messages)

	sink.ClearDomain("x.test")
	start := time.Now()
	r := e.spoolOK("retry", "--all")
	t.Logf("retry --all: %s", strings.TrimSpace(r.stdout))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := sink.WaitDomain(ctx, "x.test", func(d testutils.DomainStats) bool { return d.Accepted >= messages }); err != nil {
		t.Errorf("retry --all with the whole next hop suspended: the mail was not delivered within 10s (next probe %v): %v; stats: %+v",
			st.Suspended[0].NextProbe.Sub(start).Round(time.Second), err, e.statsJSON().Suspended)
		return
	}
	t.Logf("delivered %v after retry --all", time.Since(start).Round(time.Millisecond))
	if s := e.statsJSON().Suspended; len(s) != 0 {
		t.Errorf("stats still lists a suspension: %+v", s)
	}
}

// TestStoredPerDestination: a message for three domains is stored as one
// queue entry per domain, each with its own recipients and the same
// msg_id, and each domain's server gets one transaction with its own
// recipients.
func TestStoredPerDestination(t *testing.T) {
	t.Parallel()
	sink := newSink(t)
	domains := []string{"one.test", "two.test", "three.test"}
	for _, d := range domains {
		sink.SetDomain(d, down(d))
	}
	e := newDestEnv(t, sink, destOpts{retry: "1h"})
	id := msgID(t, 1)
	rcpts := []string{"a1@one.test", "b@two.test", "a2@one.test", "c@three.test"}
	if err := submit(t, e.smtpAddr(), "sender@origin.test", rcpts, id); err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"one.test":   {"a1@one.test", "a2@one.test"},
		"two.test":   {"b@two.test"},
		"three.test": {"c@three.test"},
	}

	q := e.waitQueue("three settled entries", func(q map[string]admin.MessageInfo) bool {
		if len(q) != 3 {
			return false
		}
		for _, mi := range q {
			if mi.InFlight || mi.Attempts < 1 {
				return false
			}
		}
		return true
	})
	msgIDs := map[string]bool{}
	got := map[string][]string{}
	for _, mi := range q {
		msgIDs[mi.MsgID] = true
		if mi.Rcpts != len(mi.Pending) {
			t.Errorf("entry %s has %d recipients, %d pending", mi.ID, mi.Rcpts, len(mi.Pending))
		}
		for _, r := range mi.Pending {
			got[mi.Destination] = append(got[mi.Destination], r.Addr)
			if !strings.Contains(r.LastError, mi.Destination+" is down") {
				t.Errorf("%s in the entry for %s: last error %q", r.Addr, mi.Destination, r.LastError)
			}
		}
	}
	for _, v := range got {
		sort.Strings(v)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("entries by destination: %v, want %v", got, want)
	}
	if len(msgIDs) != 1 || msgIDs[""] {
		t.Errorf("entries carry msg_ids %v, want one, the same for all", msgIDs)
	}
	t.Logf("spool list --json: %d entries for one message: %v", len(q), got)

	for _, d := range domains {
		sink.ClearDomain(d)
	}
	e.spoolOK("retry", "--all")
	waitSink(t, sink, "one transaction per domain", func(msgs []testutils.Message) bool {
		return len(msgs) >= 3 && deliveredPairs(msgs, []pair{{id, "a1@one.test"}, {id, "a2@one.test"}, {id, "b@two.test"}, {id, "c@three.test"}})
	})
	msgs := sink.FindByMessageID(id)
	if len(msgs) != 3 {
		t.Fatalf("the sink accepted %d transactions for the message, want 3:\n%s", len(msgs), describe(msgs))
	}
	for _, m := range msgs {
		r := append([]string(nil), m.Rcpts...)
		sort.Strings(r)
		dom := testutils.AddrDomain(r[0])
		if fmt.Sprint(r) != fmt.Sprint(want[dom]) {
			t.Errorf("transaction for %s had recipients %v, want %v", dom, r, want[dom])
		}
	}
	for _, d := range domains {
		// One refused try and one delivery.
		if st := sink.DomainStats(d); st.Transactions != 2 || st.Accepted != 1 {
			t.Errorf("%s: %v, want 2 transactions, 1 accepted", d, st)
		}
	}
	e.waitQueue("an empty queue", func(q map[string]admin.MessageInfo) bool { return len(q) == 0 })
}

// TestFallbackRelay: recipients of a domain that keeps deferring go
// through fallback_target after fallback_after tries: the fallback relay
// delivers one, refuses one (whose failure report says the mail went
// through the fallback) and defers one, and `maddy spool show` lists each
// recipient's attempts, the fallback ones marked.
//
// maddy 0.8.1's smtp endpoint offers no DSN extension, so a success
// report cannot be asked for; the failure report shows X-Spool-Via.
func TestFallbackRelay(t *testing.T) {
	t.Parallel()
	const via = "fallback fb_relay"
	sink := newSink(t)
	sink.SetDomain("dead.test", down("dead.test"))
	fb := newSink(t, testutils.WithScript(testutils.SinkRcptReplies(map[string]*smtp.SMTPError{
		"b@dead.test": testutils.SinkReply(550, [3]int{5, 1, 1}, "no such user at the relay"),
		"c@dead.test": testutils.SinkReply(452, [3]int{4, 2, 2}, "mailbox full at the relay"),
	})))
	e := newDestEnv(t, sink, destOpts{
		// Two quick tries, then the fallback's; the next after an hour.
		retry: "1s 1s 1h",
		blocks: fmt.Sprintf(`target.smtp fb_relay {
    targets tcp://127.0.0.1:%d
    starttls no
}`, fb.Port()),
		queue: []string{"fallback_target &fb_relay", "fallback_after 2"},
	})
	id := msgID(t, 1)
	rcpts := []string{"a@dead.test", "b@dead.test", "c@dead.test"}
	if err := submit(t, e.smtpAddr(), "sender@origin.test", rcpts, id); err != nil {
		t.Fatal(err)
	}

	waitPairs(t, fb, "delivery through the fallback", []pair{{id, "a@dead.test"}})
	for _, r := range rcpts {
		if n := sink.RcptAttempts(r); n != 2 {
			t.Errorf("%s was offered to its own domain %d times, want fallback_after = 2", r, n)
		}
		if n := fb.RcptAttempts(r); n != 1 {
			t.Errorf("%s was offered to the fallback %d times, want 1", r, n)
		}
	}
	if n := sink.DeliveryCount(id, "a@dead.test"); n != 0 {
		t.Errorf("a@dead.test reached its own domain %d times", n)
	}

	// The failure report for b says which way it went.
	msgs := waitSink(t, sink, "a failure report", func(msgs []testutils.Message) bool { return len(dsns(msgs)) > 0 })
	d := dsns(msgs)
	if len(d) != 1 {
		t.Fatalf("%d DSNs, want 1:\n%s", len(d), describe(d))
	}
	rep, err := parseDSN(d[0].Data)
	if err != nil {
		t.Fatalf("parsing the DSN: %v\n%s", err, d[0].Data)
	}
	rb := rep.recipient("b@dead.test")
	switch {
	case rb == nil:
		t.Errorf("the DSN does not report on b@dead.test: %v", rep.Recipients)
	default:
		if rb.Get("Action") != "failed" || rb.Get("Status") != "5.1.1" || rb.Get("X-Spool-Via") != via {
			t.Errorf("b@dead.test: Action %q Status %q X-Spool-Via %q, want failed, 5.1.1, %q", rb.Get("Action"), rb.Get("Status"), rb.Get("X-Spool-Via"), via)
		}
		if !strings.Contains(rb.Get("Diagnostic-Code"), "no such user at the relay") {
			t.Errorf("b@dead.test: Diagnostic-Code %q, want the relay's reply", rb.Get("Diagnostic-Code"))
		}
	}
	if len(rep.Recipients) != 1 {
		t.Errorf("the DSN has %d recipient blocks, want only b's: %v", len(rep.Recipients), rep.Recipients)
	}
	mustContain(t, "the DSN's text", rep.Text, "Sent through: "+via)
	t.Logf("failure report for b@dead.test: X-Spool-Via: %s", rb.Get("X-Spool-Via"))

	// c is still in progress; show lists every recipient's attempts.
	q := e.waitQueue("c waiting", func(q map[string]admin.MessageInfo) bool {
		return len(q) == 1 && !firstOf(q).InFlight && firstOf(q).Attempts == 3
	})
	qid := firstOf(q).ID
	show := e.spoolOK("show", qid).stdout
	t.Logf("spool show %s:\n%s", qid, show)
	mustContain(t, "spool show", show,
		"Destination:", "dead.test",
		"a@dead.test  delivered, 3 tries",
		"b@dead.test  failed, 3 tries",
		"c@dead.test  pending, 3 tries",
		"through "+via,
		"451 4.4.1 dead.test is down",
		"accepted  (through "+via+")",
		"550 5.1.1 no such user at the relay  (through "+via+")",
		"452 4.2.2 mailbox full at the relay  (through "+via+")",
	)
	var det admin.Detail
	if err := strictDecode(strings.TrimSpace(e.spoolOK("show", "--json", qid).stdout), &det); err != nil {
		t.Fatal(err)
	}
	for _, r := range det.All {
		var results []string
		for _, h := range r.History {
			results = append(results, h.Result+" via="+h.Via)
		}
		if len(r.History) != 3 || r.History[0].Via != "" || r.History[1].Via != "" || r.History[2].Via != via || r.Via != via {
			t.Errorf("%s: via %q, history %v: want two tries of its own domain, then one through %s", r.Addr, r.Via, results, via)
		}
	}

	// The record says which way each outcome went.
	delivered := false
	for _, o := range e.outcomes(id) {
		if o.str("rcpt") == "a@dead.test" && o.str("status") == "delivered" {
			delivered = o.str("via") == via && o.num("tries") == 3
		}
		if o.num("tries") == 3 && o.str("via") != via {
			t.Errorf("the outcome of the fallback try for %s has via %q, want %q", o.str("rcpt"), o.str("via"), via)
		}
		if o.num("tries") < 3 && o.str("via") != "" {
			t.Errorf("an outcome of its own domain's try for %s has via %q", o.str("rcpt"), o.str("via"))
		}
	}
	if !delivered {
		t.Errorf("no recipient outcome says a@dead.test was delivered at its third try via %q", via)
	}
}

func firstOf(q map[string]admin.MessageInfo) admin.MessageInfo {
	for _, mi := range q {
		return mi
	}
	return admin.MessageInfo{}
}

// TestRecipientOutcomeRecord: every recipient outcome is logged once, as
// one "recipient outcome" line with the queue ID, the Message-ID header
// field, the recipient, the destination, the tries, the arrival, the
// status and the reply.
func TestRecipientOutcomeRecord(t *testing.T) {
	t.Parallel()
	sink := newSink(t, testutils.WithScript(testutils.SinkChain(
		testutils.SinkRcptReplies(map[string]*smtp.SMTPError{
			"bad@a.test": testutils.SinkReply(550, [3]int{5, 1, 1}, "no such user here"),
		}),
		testutils.SinkDeferFirst(1, "later@b.test"),
	)))
	e := newDestEnv(t, sink, destOpts{retry: "1s"})
	before := time.Now().Add(-time.Second)
	id := msgID(t, 1)
	if err := submit(t, e.smtpAddr(), "sender@origin.test", []string{"ok@a.test", "bad@a.test", "later@b.test"}, id); err != nil {
		t.Fatal(err)
	}
	waitPairs(t, sink, "ok and later", []pair{{id, "ok@a.test"}, {id, "later@b.test"}})
	e.waitQueue("an empty queue", func(q map[string]admin.MessageInfo) bool { return len(q) == 0 })

	type key struct {
		rcpt, status string
		tries        int
	}
	want := map[key]bool{
		{"ok@a.test", "delivered", 1}:    true,
		{"bad@a.test", "failed", 1}:      true,
		{"later@b.test", "deferred", 1}:  true,
		{"later@b.test", "delivered", 2}: true,
	}
	var outs []outcome
	eventually(t, waitTimeout, func() bool { outs = e.outcomes(id); return len(outs) >= len(want) })
	// The recipient outcomes of the message, and nothing else about it.
	if len(outs) != len(want) {
		t.Errorf("%d recipient outcome lines, want %d: %v", len(outs), len(want), outs)
	}
	queueIDs := map[string]string{} // destination -> queue_id
	idRe := regexp.MustCompile(`^[0-9a-f]{16}$`)
	for _, o := range outs {
		k := key{o.str("rcpt"), o.str("status"), o.num("tries")}
		if !want[k] {
			t.Errorf("unexpected outcome %v", o)
			continue
		}
		delete(want, k)
		dest := testutils.AddrDomain(k.rcpt)
		if o.str("destination") != dest {
			t.Errorf("%v: destination %q, want %q", k, o.str("destination"), dest)
		}
		qid := o.str("queue_id")
		if !idRe.MatchString(qid) {
			t.Errorf("%v: queue_id %q", k, qid)
		}
		if prev, ok := queueIDs[dest]; ok && prev != qid {
			t.Errorf("%v: queue_id %s, but %s for an earlier outcome of the same entry", k, qid, prev)
		}
		queueIDs[dest] = qid
		if o.str("msg_id") == "" {
			t.Errorf("%v: no msg_id", k)
		}
		queued, err := time.Parse(time.RFC3339, o.str("queued"))
		if err != nil || queued.Before(before) || queued.After(time.Now()) {
			t.Errorf("%v: queued %q (%v), want the arrival time", k, o.str("queued"), err)
		}
		if v := o.str("via"); v != "" {
			t.Errorf("%v: via %q without a fallback", k, v)
		}
		switch k.status {
		case "delivered":
			if _, ok := o["smtp_code"]; ok {
				t.Errorf("%v: smtp_code on a delivered recipient: %v", k, o)
			}
		case "failed":
			if o.num("smtp_code") != 550 || o.str("smtp_enchcode") != "5.1.1" || o.str("reason") != "no such user here" {
				t.Errorf("%v: %v, want 550 5.1.1 no such user here", k, o)
			}
		case "deferred":
			if o.num("smtp_code") != 451 || o.str("smtp_enchcode") != "4.4.1" || !strings.Contains(o.str("reason"), "deferred by sink") {
				t.Errorf("%v: %v, want the sink's 451 4.4.1", k, o)
			}
		}
	}
	if len(want) > 0 {
		t.Errorf("missing outcomes: %v", want)
	}
	if queueIDs["a.test"] == queueIDs["b.test"] {
		t.Errorf("both destinations' outcomes have queue_id %s, want one entry each", queueIDs["a.test"])
	}
	for _, o := range outs {
		t.Logf("recipient outcome: %v", o)
	}
}
