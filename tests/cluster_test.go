//go:build unix

package tests

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/testutils"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// The cluster tests run several maddy processes whose target.spool blocks
// share one PostgreSQL database (store postgres, lease 10s), each
// delivering to its own sink (see clusterSink), and check what the shared
// store promises: a dead or cut-off node's mail is taken over by the
// others within a lease, at the cost of at most the attempts it had in
// flight; a database outage refuses new mail with 451 4.3.0 and loses
// nothing; any node operates on the whole queue.

// clusterSender is the envelope sender of the cluster tests' mail; its
// DSNs come back to it through the sinks.
const clusterSender = "sender@origin.test"

// greylist is the cluster tests' next-hop policy: the first try of every
// recipient is deferred (451), wherever it is made; recipients at
// early.fail.test are refused (550) from the start, those at
// late.fail.test from their second try.
func greylist(stage, rcpt string, try int) *smtp.SMTPError {
	if stage != testutils.StageRCPT {
		return nil
	}
	rcpt = strings.ToLower(rcpt)
	switch {
	case strings.HasSuffix(rcpt, "@early.fail.test"):
		return testutils.SinkReply(550, [3]int{5, 1, 1}, "no such mailbox (early)")
	case try == 1:
		return testutils.SinkReply(451, [3]int{4, 4, 1}, "greylisted, try again")
	case strings.HasSuffix(rcpt, "@late.fail.test"):
		return testutils.SinkReply(550, [3]int{5, 1, 1}, "no such mailbox (late)")
	}
	return nil
}

// submitAll submits each message to its node and fails the test unless
// every one is accepted.
func submitAll(t *testing.T, nodes map[string]*node, msgs []sentMsg) {
	t.Helper()
	for _, m := range msgs {
		rcpts := m.rcpts()
		res := submitTx(nodes[m.node].smtpAddr(), clusterSender, rcpts, newMessage(clusterSender, rcpts, m.id, testBody(m.id)), waitTimeout)
		if !res.Accepted {
			t.Fatalf("message %s to node %s not accepted at %s: %v", m.id, m.node, res.Stage, res.Err)
		}
	}
}

// queueIDsByRcpt maps each pending recipient of a listing to its queue
// entry.
func queueIDsByRcpt(list []admin.MessageInfo) map[string]admin.MessageInfo {
	out := map[string]admin.MessageInfo{}
	for _, mi := range list {
		for _, r := range mi.Pending {
			out[strings.ToLower(r.Addr)] = mi
		}
	}
	return out
}

// TestClusterNodeKilled: three nodes share the queue; the next hop defers
// every recipient's first try and then holds the DATA stage of every
// node's second tries, so each node has max_parallelism attempts in
// flight. One node is killed with SIGKILL and not restarted. The two
// others must deliver every accepted recipient within the lease plus 10
// seconds of the kill; repeated deliveries are bounded by what the dead
// node held (its leases as `spool list` showed them, which must match its
// attempts_in_flight); each permanent failure is reported by exactly one
// DSN. The node killed is the one exporting the cluster-wide gauges;
// afterwards exactly one survivor does.
func TestClusterNodeKilled(t *testing.T) {
	clusterTest(t)
	const (
		maxPar = 3
		nMsgs  = 24
	)
	pg := newPG(t)
	dsn := createDB(t, pg, "spool")
	cs := newClusterSink(t, greylist)
	names := []string{"n1", "n2", "n3"}
	nodes := map[string]*node{}
	for _, name := range names {
		nodes[name] = startNode(t, cs, dsn, name, func(p *params) {
			p.Retry, p.MaxTries = "1s", "20"
			p.Extra = append(p.Extra, fmt.Sprintf("max_parallelism %d", maxPar))
		})
	}
	// The victim is the node exporting the cluster-wide gauges, so that
	// the role is seen to pass on.
	victim := nodes[waitOneReporter(t, nodes["n1"], nodes["n2"], nodes["n3"])]
	var survivors []*node
	var survivorNames []string
	for _, name := range names {
		if name != victim.name {
			survivors = append(survivors, nodes[name])
			survivorNames = append(survivorNames, name)
		}
	}
	t.Logf("victim: %s, the reporter of the cluster-wide gauges", victim.name)

	// Every node's second tries wait at the DATA stage until the kill.
	cs.hold(names...)
	var msgs []sentMsg
	for i := 0; i < nMsgs; i++ {
		m := sentMsg{id: msgID(t, i), node: names[i%len(names)]}
		m.good = append(m.good, fmt.Sprintf("m%d.a@remote.test", i))
		if i%2 == 0 {
			m.good = append(m.good, fmt.Sprintf("m%d.b@remote.test", i))
		}
		// Every message owes a report that the node delivering its second
		// try sends: for the dead node's messages, a survivor must send it,
		// once.
		m.fail = append(m.fail, fmt.Sprintf("m%d@late.fail.test", i))
		if i%4 == 1 {
			m.fail = append(m.fail, fmt.Sprintf("m%d@early.fail.test", i))
		}
		msgs = append(msgs, m)
	}
	submitAll(t, nodes, msgs)

	// The victim has max_parallelism attempts waiting at the next hop, and
	// nothing else in flight: no delivery slot is free for a new claim, and
	// no attempt is sending a report.
	cs.waitHeld(victim.name, maxPar)
	inFlight := victim.waitMetric("maddy_spool_attempts_in_flight", eq(maxPar))
	list := survivors[0].listJSON()
	var (
		victimHeld []admin.MessageInfo
		owners     = map[string]int{}
		bound      int
	)
	for _, mi := range list {
		if mi.LeaseOwner == "" {
			continue
		}
		owners[mi.LeaseOwner]++
		if mi.LeaseOwner == victim.name {
			victimHeld = append(victimHeld, mi)
			bound += len(mi.Pending)
			if !mi.InFlight || time.Until(mi.LeaseExpiry) <= 0 || time.Until(mi.LeaseExpiry) > clusterLease {
				t.Errorf("a message leased by %s is listed with in_flight %v, lease_expiry %v (in %v)",
					victim.name, mi.InFlight, mi.LeaseExpiry, time.Until(mi.LeaseExpiry).Round(time.Millisecond))
			}
		}
	}
	if len(victimHeld) != int(inFlight) {
		t.Fatalf("spool list shows %d messages leased by %s, its maddy_spool_attempts_in_flight is %v", len(victimHeld), victim.name, inFlight)
	}
	t.Logf("before the kill: leases per node %v (of %d queued); %s has %v attempts in flight, %d pending recipients in them",
		owners, len(list), victim.name, inFlight, bound)

	victim.srv.kill()
	killed := time.Now()
	cs.releaseAll()

	// Every accepted recipient is delivered by a survivor, and every
	// refused one reported.
	allDone := func() bool {
		for _, m := range msgs {
			for _, r := range m.good {
				if cs.deliveries(m.id, r, survivorNames...) == 0 {
					return false
				}
			}
		}
		reports, err := dsnReports(cs.messages())
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			for _, r := range m.fail {
				if reports[dsnKey{m.id, r}] == 0 {
					return false
				}
			}
		}
		return true
	}
	eventually(t, clusterLease+waitTimeout, allDone)
	done := time.Since(killed)

	// Takeover: when the survivors delivered the last of the messages the
	// victim held.
	heldByRcpt := queueIDsByRcpt(victimHeld)
	var takeover time.Duration
	for _, m := range msgs {
		for _, r := range m.good {
			if _, ok := heldByRcpt[strings.ToLower(r)]; !ok {
				continue
			}
			at, _ := cs.firstDelivery(m.id, r, survivorNames...)
			takeover = max(takeover, at.Sub(killed))
		}
	}
	t.Logf("takeover: the dead node's %d messages delivered by the survivors %v after the kill; everything delivered and reported after %v",
		len(victimHeld), takeover.Round(time.Millisecond), done.Round(time.Millisecond))
	if limit := clusterLease + 10*time.Second; takeover > limit || done > limit {
		t.Errorf("takeover took %v, delivering and reporting everything %v: more than lease + 10s = %v", takeover, done, limit)
	}

	// Repeated deliveries: only of the messages the victim held, at most
	// once more each, at most bound in all.
	var dups []string
	for _, m := range msgs {
		for _, r := range m.good {
			n := cs.deliveries(m.id, r)
			if n <= 1 {
				continue
			}
			dups = append(dups, fmt.Sprintf("%s to %s ×%d", m.id, r, n))
			if _, ok := heldByRcpt[strings.ToLower(r)]; !ok || n > 2 {
				t.Errorf("%s delivered to %s %d times; only the dead node's messages may be delivered twice", m.id, r, n)
			}
		}
	}
	t.Logf("duplicates: %d (bound: %d pending recipients in the dead node's %d attempts in flight): %v", len(dups), bound, len(victimHeld), dups)
	if len(dups) > bound {
		t.Errorf("%d duplicate deliveries exceed the bound of %d", len(dups), bound)
	}

	// Exactly one DSN per refused recipient, and none for anyone else.
	reports, err := dsnReports(cs.messages())
	if err != nil {
		t.Fatal(err)
	}
	want := map[dsnKey]bool{}
	for _, m := range msgs {
		for _, r := range m.fail {
			want[dsnKey{m.id, r}] = true
		}
	}
	for k, n := range reports {
		switch {
		case !want[k]:
			t.Errorf("a DSN reports %s failed for %s, which the next hop accepts", k.rcpt, k.msgID)
		case n != 1:
			t.Errorf("%d DSNs report %s failed for %s, want 1", n, k.rcpt, k.msgID)
		}
	}
	// The dead node's messages owed reports it never sent: the survivors
	// sent them.
	bySurvivors, err := dsnReports(cs.messages(survivorNames...))
	if err != nil {
		t.Fatal(err)
	}
	takenOver := 0
	for _, m := range msgs {
		for _, r := range m.fail {
			if _, ok := heldByRcpt[strings.ToLower(r)]; ok {
				takenOver++
				if bySurvivors[dsnKey{m.id, r}] != 1 {
					t.Errorf("the failure of %s for %s (held by the dead node) was not reported by a survivor", r, m.id)
				}
			}
		}
	}
	t.Logf("DSNs: %d failures reported, %d owed, %d of them by the dead node's messages", len(reports), len(want), takenOver)

	// The survivors drained the queue, and one of them reports it.
	eventually(t, waitTimeout, func() bool { return len(survivors[0].listJSON()) == 0 })
	rep := waitOneReporter(t, survivors...)
	for _, n := range survivors {
		if n.name == rep {
			n.waitMetric("maddy_spool_messages_queued", eq(0))
		}
	}
	t.Logf("reporter after the kill: %s", rep)
}

// TestClusterNodeCutOff: node n1 reaches the database through a proxy.
// It claims three messages and its attempts wait at the next hop's DATA
// stage; then the proxy is cut (its connections reset, new ones refused).
// Node n2, connected directly, must take the messages over once n1's
// leases expire and deliver them. When the proxy is restored, n1 finds its
// leases lost and its attempts end: their late outcomes must be refused
// (n1 logs so), and the database must keep n2's outcome, the messages
// delivered and gone, not queued again. n1's attempts may also have
// delivered: that repeat is bounded by the recipients n1 held. The role
// of exporting the cluster-wide gauges passes from n1 to n2 at the cut.
func TestClusterNodeCutOff(t *testing.T) {
	clusterTest(t)
	pg := newPG(t)
	direct := createDB(t, pg, "spool")
	proxy, viaProxy := newPGProxy(t, pg, "spool")
	cs := newClusterSink(t, nil)
	cs.hold("n1")
	a := startNode(t, cs, viaProxy, "n1", nil)

	// n1 alone claims the messages; n2 starts once they are in flight.
	msgs := []sentMsg{
		{id: msgID(t, 1), node: "n1", good: []string{"one@remote.test"}},
		{id: msgID(t, 2), node: "n1", good: []string{"two.a@remote.test", "two.b@remote.test"}},
		{id: msgID(t, 3), node: "n1", good: []string{"three@remote.test"}},
	}
	submitAll(t, map[string]*node{"n1": a}, msgs)
	cs.waitHeld("n1", len(msgs))
	a.waitMetric("maddy_spool_attempts_in_flight", eq(float64(len(msgs))))
	if r := waitOneReporter(t, a); r != "n1" {
		t.Fatalf("reporter %s", r)
	}
	b := startNode(t, cs, direct, "n2", nil)
	bound := 0
	for _, mi := range b.listJSON() {
		if mi.LeaseOwner != "n1" || !mi.InFlight {
			t.Fatalf("before the cut, n2 lists %s with lease_owner %q, in_flight %v; want n1's attempt", mi.ID, mi.LeaseOwner, mi.InFlight)
		}
		bound += len(mi.Pending)
	}

	proxy.Cut()
	cut := time.Now()
	eventually(t, clusterLease+waitTimeout, func() bool {
		for _, m := range msgs {
			for _, r := range m.good {
				if cs.deliveries(m.id, r, "n2") == 0 {
					return false
				}
			}
		}
		return true
	})
	takeover := time.Since(cut)
	t.Logf("takeover: n2 delivered n1's %d messages %v after the cut", len(msgs), takeover.Round(time.Millisecond))
	if limit := clusterLease + 10*time.Second; takeover > limit {
		t.Errorf("takeover took %v, more than lease + 10s = %v", takeover, limit)
	}
	if a.srv.countLog("cannot renew the leases of attempts in flight") == 0 {
		t.Errorf("n1 logged no failed renewal while cut off")
	}
	// n1, the first node up, reported the cluster's figures; cut off, it
	// cannot, and n2 does.
	if r := waitOneReporter(t, a, b); r != "n2" {
		t.Errorf("while n1 is cut off, %s reports the cluster's figures", r)
	}
	eventually(t, waitTimeout, func() bool { return len(b.listJSON()) == 0 })

	// n1 comes back: its renewal finds the leases lost and cancels the
	// attempts; when they end, their outcomes are refused.
	proxy.Restore()
	restored := time.Now()
	eventually(t, waitTimeout, func() bool { return a.srv.countLog("lease lost while attempting") >= len(msgs) })
	cs.release("n1")
	eventually(t, waitTimeout, func() bool {
		return a.srv.countLog("lease lost; another node took the message over, dropping this node's outcome") >= len(msgs)
	})
	t.Logf("n1 refused its %d late outcomes %v after the proxy was restored", len(msgs), time.Since(restored).Round(time.Millisecond))
	a.waitMetric("maddy_spool_attempts_in_flight", eq(0))
	if n := a.srv.countLog("cannot save queue state"); n > 0 {
		t.Errorf("n1 logged %d failed saves: its late outcomes must be refused by the lease, not lost to I/O", n)
	}

	// The database holds n2's outcome: nothing queued, from either node.
	if n, err := pg.Psql("spool", "SELECT count(*) FROM spool_messages"); err != nil || n != "0" {
		t.Errorf("spool_messages has %s rows (%v), want 0", n, err)
	}
	for _, n := range []*node{a, b} {
		if l := n.listJSON(); len(l) != 0 {
			t.Errorf("%s lists %d messages after the takeover, want none: %+v", n.name, len(l), l)
		}
	}
	dups := 0
	for _, m := range msgs {
		for _, r := range m.good {
			byA, byB := cs.deliveries(m.id, r, "n1"), cs.deliveries(m.id, r, "n2")
			if byB != 1 || byA > 1 {
				t.Errorf("%s to %s delivered %d times by n1 and %d by n2; want at most once by n1 and once by n2", m.id, r, byA, byB)
			}
			dups += byA
		}
	}
	t.Logf("duplicates: %d repeated by n1's cancelled attempts (bound: %d recipients it held)", dups, bound)
	if dups > bound {
		t.Errorf("%d duplicates exceed the bound of %d", dups, bound)
	}
}

// txRecord is one SMTP transaction of a continuous submitter.
type txRecord struct {
	msg        sentMsg
	start, end time.Time
	res        txResult
}

// submitter sends messages to one node, one after another, until stop is
// closed, and records every transaction.
type submitter struct {
	mu   sync.Mutex
	txs  []txRecord
	done chan struct{}
}

func startSubmitter(t *testing.T, n *node, prefix string, stop <-chan struct{}) *submitter {
	s := &submitter{done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for i := 1; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			m := sentMsg{id: fmt.Sprintf("%s.%d@e2e.test", prefix, i), node: n.name,
				good: []string{fmt.Sprintf("%s.%d@remote.test", prefix, i)}}
			start := time.Now()
			res := submitTx(n.smtpAddr(), clusterSender, m.good, newMessage(clusterSender, m.good, m.id, testBody(m.id)), waitTimeout)
			s.mu.Lock()
			s.txs = append(s.txs, txRecord{msg: m, start: start, end: time.Now(), res: res})
			s.mu.Unlock()
			// Pacing, not synchronisation: a steady trickle of mail.
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return s
}

func (s *submitter) records() []txRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]txRecord(nil), s.txs...)
}

// count returns how many transactions that started after since ended as
// ok says.
func (s *submitter) count(since time.Time, ok func(txResult) bool) int {
	n := 0
	for _, r := range s.records() {
		if r.start.After(since) && ok(r.res) {
			n++
		}
	}
	return n
}

// waitEachSubmitter waits until every submitter has made n transactions,
// started after since, that ended as ok says.
func waitEachSubmitter(t *testing.T, subs []*submitter, since time.Time, ok func(txResult) bool, n int) {
	t.Helper()
	eventually(t, waitTimeout, func() bool {
		for _, s := range subs {
			if s.count(since, ok) < n {
				return false
			}
		}
		return true
	})
}

func accepted(r txResult) bool { return r.Accepted }
func refused(r txResult) bool  { return !r.Accepted }

// TestClusterDatabaseOutage: two nodes take mail continuously while
// PostgreSQL is stopped (as by a crash: pg_ctl stop -m immediate) and
// started again. Every transaction made while it is down must be refused
// with 451 4.3.0 at the end of DATA; both nodes must accept mail again
// once it is back, without a restart; every message accepted (before,
// during or after the outage) must be delivered, and the queue drain but
// for refused messages left under a receiving lease.
func TestClusterDatabaseOutage(t *testing.T) {
	clusterTest(t)
	pg := newPG(t)
	dsn := createDB(t, pg, "spool")
	cs := newClusterSink(t, greylist)
	retry := func(p *params) { p.Retry = "1s" }
	nodes := []*node{startNode(t, cs, dsn, "n1", retry), startNode(t, cs, dsn, "n2", retry)}

	stop := make(chan struct{})
	var subs []*submitter
	for _, n := range nodes {
		subs = append(subs, startSubmitter(t, n, t.Name()+"."+n.name, stop))
	}
	stopped := false
	stopSubmitters := func() {
		if !stopped {
			stopped = true
			close(stop)
			for _, s := range subs {
				<-s.done
			}
		}
	}
	t.Cleanup(stopSubmitters)
	begin := time.Now()
	// Mail flows through both nodes.
	waitEachSubmitter(t, subs, begin, accepted, 10)

	if err := pg.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	// Both nodes refuse mail for a while.
	waitEachSubmitter(t, subs, down, refused, 40)
	upAt := time.Now()
	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	up := time.Now()
	t.Logf("PostgreSQL down for %v (stopped %v, started %v)", up.Sub(down).Round(time.Millisecond),
		down.Sub(begin).Round(time.Millisecond), up.Sub(begin).Round(time.Millisecond))
	// Both nodes accept mail again by themselves.
	waitEachSubmitter(t, subs, up, accepted, 10)
	resumed := time.Since(up)
	stopSubmitters()

	// What the clients saw while the database was down.
	var (
		acked             []sentMsg
		outage, badCodes  int
		firstOK, lastFail time.Time
	)
	for _, s := range subs {
		for _, r := range s.records() {
			if r.res.Accepted {
				acked = append(acked, r.msg)
				if r.start.After(up) && (firstOK.IsZero() || r.end.Before(firstOK)) {
					firstOK = r.end
				}
				continue
			}
			if r.end.After(lastFail) {
				lastFail = r.end
			}
			inOutage := r.start.After(down) && r.end.Before(upAt)
			if inOutage {
				outage++
			}
			if r.res.code() != 451 || r.res.enhanced() != "4.3.0" || r.res.Stage != "end of DATA" {
				badCodes++
				t.Errorf("message %s to %s (during the outage: %v) refused at %s with %d %s: %v",
					r.msg.id, r.msg.node, inOutage, r.res.Stage, r.res.code(), r.res.enhanced(), r.res.Err)
			}
		}
	}
	if outage == 0 {
		t.Fatal("no transaction was made while PostgreSQL was down")
	}
	t.Logf("outage: %d transactions refused with 451 4.3.0 while the database was down; mail accepted again %v after it was started (last refusal %v after)",
		outage, resumed.Round(time.Millisecond), lastFail.Sub(up).Round(time.Millisecond))

	// Nothing accepted is lost.
	eventually(t, 2*time.Minute, func() bool {
		for _, m := range acked {
			if cs.deliveries(m.id, m.good[0]) == 0 {
				return false
			}
		}
		return true
	})
	dups := 0
	for _, m := range acked {
		if n := cs.deliveries(m.id, m.good[0]); n > 1 {
			dups += n - 1
		}
	}
	t.Logf("%d messages accepted, all delivered %v after PostgreSQL was started; %d duplicates",
		len(acked), time.Since(up).Round(time.Millisecond), dups)
	for _, n := range nodes {
		t.Logf("%s: %d failed saves, %d failed claims", n.name, n.srv.countLog("cannot save queue state"), n.srv.countLog("cannot claim due messages"))
	}

	// The queue drains, but for messages of refused transactions whose
	// commit failed: they stay under their receiving lease, to be
	// delivered when it expires (at least once; the client, told 451, may
	// send again).
	refusedRcpts := map[string]bool{}
	for _, s := range subs {
		for _, r := range s.records() {
			if !r.res.Accepted {
				refusedRcpts[strings.ToLower(r.msg.good[0])] = true
			}
		}
	}
	start := time.Now()
	var left []admin.MessageInfo
	drained := pollFor(2*time.Minute, func() bool {
		left = nodes[0].listJSON()
		for _, mi := range left {
			if !mi.Receiving {
				return false
			}
		}
		return true
	})
	if !drained {
		t.Fatalf("the queue did not drain within 2m: %+v", left)
	}
	for _, mi := range left {
		for _, r := range mi.Pending {
			if !refusedRcpts[strings.ToLower(r.Addr)] {
				t.Errorf("%s (to %s) is left under a receiving lease, but its transaction was accepted", mi.ID, r.Addr)
			}
		}
	}
	t.Logf("queue drained %v later; %d messages of refused transactions left under their receiving lease", time.Since(start).Round(time.Millisecond), len(left))
}

// TestClusterOutageUnsavedOutcome: an attempt that ends while PostgreSQL
// is down cannot save its outcome. Once the database is back, the message
// must be attempted again as promptly as a takeover would be (within the
// lease plus 10 seconds): the node that holds it keeps renewing its lease,
// so no other node can step in meanwhile.
func TestClusterOutageUnsavedOutcome(t *testing.T) {
	clusterTest(t)
	pg := newPG(t)
	dsn := createDB(t, pg, "spool")
	// The first try is deferred at the DATA stage, after the gate.
	cs := newClusterSink(t, func(stage, _ string, try int) *smtp.SMTPError {
		if stage == testutils.StageDATA && try == 1 {
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "try again")
		}
		return nil
	})
	retry := func(p *params) { p.Retry = "1s" }
	nodes := map[string]*node{"n1": startNode(t, cs, dsn, "n1", retry), "n2": startNode(t, cs, dsn, "n2", retry)}
	cs.hold("n1", "n2")
	m := sentMsg{id: msgID(t, 1), node: "n1", good: []string{"rcpt@remote.test"}}
	submitAll(t, nodes, []sentMsg{m})
	holder, other := waitHolder(t, cs, nodes["n1"], nodes["n2"])

	// The attempt ends (451) while the database is down.
	if err := pg.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	cs.releaseAll()
	if _, err := holder.srv.findLog("cannot save queue state, will retry", waitTimeout); err != nil {
		t.Fatal(err)
	}
	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	up := time.Now()

	limit := clusterLease + 10*time.Second
	delivered := func() bool { return cs.deliveries(m.id, m.good[0]) > 0 }
	if pollFor(limit, delivered) {
		t.Logf("delivered %v after PostgreSQL was started", time.Since(up).Round(time.Millisecond))
		return
	}
	var state string
	for _, mi := range other.listJSON() {
		state += fmt.Sprintf(" %s: lease_owner %s, in_flight %v, tries %d, next_attempt in %v;",
			mi.ID, mi.LeaseOwner, mi.InFlight, mi.Attempts, time.Until(mi.NextAttempt).Round(time.Second))
	}
	t.Errorf("not delivered within %v of PostgreSQL's start: %s keeps the unsaved outcome and its lease "+
		"and does not save it again in time; %s lists:%s", limit, holder.name, other.name, state)
	// How long it takes after all, for the record.
	eventually(t, 2*time.Minute, delivered)
	t.Logf("delivered %v after PostgreSQL was started", time.Since(up).Round(time.Millisecond))
}

// TestClusterOperateFromAnyNode: `maddy spool` on any node acts on the
// whole cluster's queue. Two nodes hold messages submitted to each (their
// first try deferred, the next one an hour away) and one attempt in
// flight on one node, waiting at the next hop. Then:
//   - `spool list --json` on either node shows all of them, the attempt
//     in flight with its lease_owner and lease_expiry;
//   - `spool hold ID` on the other node is deferred until the attempt
//     ends (451 at DATA), and then applied by its holder: the message is
//     held, and no longer attempted;
//   - `spool retry --all` on one node makes every message due, whichever
//     node accepted it, and they are delivered (the held one stays held).
func TestClusterOperateFromAnyNode(t *testing.T) {
	clusterTest(t)
	pg := newPG(t)
	dsn := createDB(t, pg, "spool")
	cs := newClusterSink(t, func(stage, rcpt string, try int) *smtp.SMTPError {
		switch {
		case stage == testutils.StageRCPT && try == 1 && strings.HasSuffix(rcpt, "@slow.test"):
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "greylisted, try again")
		case stage == testutils.StageDATA && strings.HasSuffix(rcpt, "@busy.test"):
			return testutils.SinkReply(451, [3]int{4, 3, 2}, "busy, try again")
		}
		return nil
	})
	// Retries an hour away: every attempt after the first is asked for.
	hour := func(p *params) { p.Retry, p.MaxTries = "1h", "10" }
	nodes := map[string]*node{"n1": startNode(t, cs, dsn, "n1", hour), "n2": startNode(t, cs, dsn, "n2", hour)}

	var slow []sentMsg
	for i := 1; i <= 4; i++ {
		n := fmt.Sprintf("n%d", 1+i%2)
		slow = append(slow, sentMsg{id: msgID(t, i), node: n, good: []string{fmt.Sprintf("m%d.%s@slow.test", i, n)}})
	}
	submitAll(t, nodes, slow)
	settledFirst := func(list []admin.MessageInfo) bool {
		if len(list) != len(slow) {
			return false
		}
		for _, mi := range list {
			if mi.InFlight || mi.Attempts != 1 {
				return false
			}
		}
		return true
	}
	eventually(t, waitTimeout, func() bool { return settledFirst(nodes["n1"].listJSON()) })

	// One attempt in flight, on whichever node claims it.
	cs.hold("n1", "n2")
	busy := sentMsg{id: msgID(t, 0), node: "n1", good: []string{"x@busy.test"}}
	submitAll(t, nodes, []sentMsg{busy})
	holder, other := waitHolder(t, cs, nodes["n1"], nodes["n2"])
	cs.release(other.name)

	// Both nodes list the whole queue, the same way.
	lists := map[string][]admin.MessageInfo{}
	var busyID string
	for _, n := range []*node{holder, other} {
		list := n.listJSON()
		lists[n.name] = list
		byRcpt := queueIDsByRcpt(list)
		if len(list) != len(slow)+1 {
			t.Errorf("%s lists %d messages, want %d: %+v", n.name, len(list), len(slow)+1, list)
		}
		for _, m := range slow {
			mi, ok := byRcpt[m.good[0]]
			if !ok || mi.InFlight || mi.LeaseOwner != "" || !mi.LeaseExpiry.IsZero() {
				t.Errorf("%s lists %s (accepted by %s) as %+v; want it queued, not leased", n.name, m.id, m.node, mi)
			}
		}
		mi, ok := byRcpt[busy.good[0]]
		if !ok || !mi.InFlight || mi.LeaseOwner != holder.name {
			t.Fatalf("%s lists the message in flight on %s as %+v", n.name, holder.name, mi)
		}
		if left := time.Until(mi.LeaseExpiry); left <= 0 || left > clusterLease {
			t.Errorf("%s lists lease_expiry %v for the attempt in flight, %v from now; want within the lease", n.name, mi.LeaseExpiry, left)
		}
		busyID = mi.ID
	}
	if a, b := idsOf(lists["n1"]), idsOf(lists["n2"]); strings.Join(a, " ") != strings.Join(b, " ") {
		t.Errorf("the nodes list different queues: n1 %v, n2 %v", a, b)
	}

	// hold on the other node: recorded for the holder, applied when its
	// attempt ends.
	res := holdInFlight(t, pg, other, busyID, func() { cs.release(holder.name) })
	// (What the detail says of the state after the attempt is checked by
	// TestClusterHoldReportsHeldState.)
	if res.Deferred != 1 || len(res.Items) != 1 || res.Items[0].Outcome != admin.Deferred ||
		!strings.Contains(res.Items[0].Detail, "applied after the attempt in flight") {
		t.Errorf("hold on %s of a message in flight on %s: %+v", other.name, holder.name, res)
	}
	holder.srv.waitLog("operator request applied")
	for _, n := range []*node{holder, other} {
		mi := byID(n.listJSON())[busyID]
		if !mi.Held || mi.InFlight || mi.LeaseOwner != "" || mi.Attempts != 1 {
			t.Errorf("after the hold, %s lists the message as %+v; want held, not leased, attempted once", n.name, mi)
		}
	}
	t.Logf("hold on %s of a message in flight on %s: %s", other.name, holder.name, res.Items[0].Detail)

	// retry --all on one node: every message is due, on every node.
	r := other.spoolOK("retry", "--all", "--json")
	if err := strictDecode(strings.TrimSpace(r.stdout), &res); err != nil {
		t.Fatalf("retry --json: %v\n%s", err, r.stdout)
	}
	if res.Changed != len(slow) || res.Unchanged != 1 {
		t.Errorf("retry --all on %s: %+v; want %d changed and the held one unchanged", other.name, res, len(slow))
	}
	for _, m := range slow {
		waitDeliveredCluster(t, cs, m)
	}
	eventually(t, waitTimeout, func() bool { return len(holder.listJSON()) == 1 })
	if n := cs.tryCount(busy.good[0]); n != 1 {
		t.Errorf("the held message was tried %d times, want 1", n)
	}
	bySink := map[string]int{}
	for _, m := range slow {
		for _, n := range []string{"n1", "n2"} {
			bySink[n] += cs.deliveries(m.id, m.good[0], n)
		}
	}
	t.Logf("retry --all on %s: %d made due, delivered by n1 %d, by n2 %d", other.name, res.Changed, bySink["n1"], bySink["n2"])
}

// waitDeliveredCluster waits until some node delivered m to every good
// recipient.
func waitDeliveredCluster(t *testing.T, cs *clusterSink, m sentMsg) {
	t.Helper()
	eventually(t, waitTimeout, func() bool {
		for _, r := range m.good {
			if cs.deliveries(m.id, r) == 0 {
				return false
			}
		}
		return true
	})
}

// TestClusterStartupErrors: `maddy run` exits at start-up, naming the
// store and the node, when the DSN does not parse, when the database
// cannot be reached, and when another running node already uses the node
// name (that node is left alone).
func TestClusterStartupErrors(t *testing.T) {
	clusterTest(t)
	pg := newPG(t)
	dsn := createDB(t, pg, "spool")
	closed := freePorts(t, 1)[0] // nothing listens there any more

	// failStart runs a node that must not start, and returns the error
	// line naming its store.
	failStart := func(t *testing.T, dsn, name string) string {
		t.Helper()
		ports := freePorts(t, 2)
		cfg := writeConfig(t, params{Dir: t.TempDir(), SMTPPort: ports[0], SinkPort: ports[1],
			Extra: []string{storeDirective(dsn, name)}})
		s, err := launch(t, "--config", cfg, "run")
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		code := s.wait()
		if code == 0 {
			t.Errorf("maddy exited with status 0")
		}
		want := fmt.Sprintf("store postgres (node %s)", name)
		var line string
		for _, l := range s.logLines() {
			if strings.Contains(l, readyPrefix) {
				t.Errorf("maddy started listening: %s", l)
			}
			if strings.Contains(l, want) {
				line = l
			}
		}
		if line == "" {
			t.Fatalf("no error naming %q; output:\n%s", want, s.tail(20))
		}
		t.Logf("exit status %d after %v: %s", code, time.Since(start).Round(time.Millisecond), line)
		return line
	}

	t.Run("bad DSN", func(t *testing.T) {
		line := failStart(t, "host=/tmp port=notaport user=postgres password=s3cr3t dbname=spool", "bad1")
		mustContain(t, "the error", line, "cannot parse", "notaport")
		if strings.Contains(line, "s3cr3t") {
			t.Errorf("the error shows the password: %s", line)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		line := failStart(t, fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=spool sslmode=disable connect_timeout=5", closed), "down1")
		mustContain(t, "the error", line, "connect", "refused")
	})
	t.Run("node name in use", func(t *testing.T) {
		cs := newClusterSink(t, nil)
		first := startNode(t, cs, dsn, "mx1", nil)
		line := failStart(t, dsn, "mx1")
		mustContain(t, "the error", line, "node name mx1 is already in use")
		if first.srv.exited() {
			t.Fatal("the running node exited")
		}
		m := sentMsg{id: msgID(t, 1), node: "mx1", good: []string{"rcpt@remote.test"}}
		submitAll(t, map[string]*node{"mx1": first}, []sentMsg{m})
		waitDeliveredCluster(t, cs, m)
	})
}

// TestClusterHoldReportsHeldState: `spool hold ID` on one node, for a
// message in flight on another, waits until the holder has applied the
// hold and then says what became of the message: "held". The holder's
// database connection is slowed down (100 ms per request) so that the
// moment between the holder's two writes (the attempt's outcome, which
// hands it the request, then the hold itself) is long enough to be seen.
func TestClusterHoldReportsHeldState(t *testing.T) {
	clusterTest(t)
	pg := newPG(t)
	direct := createDB(t, pg, "spool")
	proxy, viaProxy := newPGProxy(t, pg, "spool")
	cs := newClusterSink(t, func(stage, _ string, _ int) *smtp.SMTPError {
		if stage == testutils.StageDATA {
			return testutils.SinkReply(451, [3]int{4, 3, 2}, "busy, try again")
		}
		return nil
	})
	hour := func(p *params) { p.Retry, p.MaxTries = "1h", "10" }
	cs.hold("n1")
	holder := startNode(t, cs, viaProxy, "n1", hour)
	m := sentMsg{id: msgID(t, 1), node: "n1", good: []string{"x@busy.test"}}
	submitAll(t, map[string]*node{"n1": holder}, []sentMsg{m})
	cs.waitHeld("n1", 1)
	other := startNode(t, cs, direct, "n2", hour)
	list := other.listJSON()
	if len(list) != 1 || list[0].LeaseOwner != "n1" {
		t.Fatalf("n2 lists %+v; want the message leased by n1", list)
	}
	id := list[0].ID
	proxy.SetLatency(100 * time.Millisecond)
	res := holdInFlight(t, pg, other, id, func() { cs.release("n1") })
	holder.srv.waitLog("operator request applied")
	final := byID(other.listJSON())[id]
	t.Logf("hold reported: %+v; the message now: held %v, lease_owner %q", res.Items, final.Held, final.LeaseOwner)
	if !final.Held {
		t.Fatalf("the hold was not applied: %+v", final)
	}
	if len(res.Items) != 1 || res.Items[0].Outcome != admin.Deferred ||
		!strings.Contains(res.Items[0].Detail, "applied after the attempt in flight: held") {
		t.Errorf("hold reports %+v for a message that the holder then held; "+
			"the operator waited only until the request was handed to the holder, not until it was applied", res.Items)
	}
}

// waitHolder waits until the gate of a or b holds one attempt, and returns
// that node and the other.
func waitHolder(t *testing.T, cs *clusterSink, a, b *node) (holder, other *node) {
	t.Helper()
	eventually(t, waitTimeout, func() bool {
		switch {
		case cs.heldAt(a.name) == 1:
			holder, other = a, b
		case cs.heldAt(b.name) == 1:
			holder, other = b, a
		}
		return holder != nil
	})
	return holder, other
}

// holdInFlight runs `maddy spool hold ID --json` on node n for a message
// in flight on another node: the command must wait (the request recorded
// in the database) until endAttempt lets the attempt end, and succeed.
// It returns the command's result.
func holdInFlight(t *testing.T, pg *pgtest.Cluster, n *node, id string, endAttempt func()) admin.Result {
	t.Helper()
	qid, err := strconv.ParseInt(id, 16, 64)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan cliResult, 1)
	go func() { done <- n.spool("hold", id, "--json") }()
	eventually(t, waitTimeout, func() bool {
		v, err := pg.Psql("spool", fmt.Sprintf("SELECT request FROM spool_messages WHERE id = %d", qid))
		return err == nil && v != "0" && v != ""
	})
	select {
	case r := <-done:
		t.Fatalf("hold returned before the attempt in flight ended: %v", r)
	default:
	}
	endAttempt()
	r := <-done
	if r.code != 0 {
		t.Fatalf("hold failed: %v", r)
	}
	var res admin.Result
	if err := strictDecode(strings.TrimSpace(r.stdout), &res); err != nil {
		t.Fatalf("hold --json: %v\n%s", err, r.stdout)
	}
	return res
}
