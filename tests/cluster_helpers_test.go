//go:build unix

package tests

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/mail"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/testutils"
	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// Helpers of the cluster tests (cluster_test.go): several maddy processes
// whose target.spool blocks share one PostgreSQL database.

// clusterLease is the store's lease in the cluster tests: the shortest the
// module accepts, so that a takeover happens within seconds.
const clusterLease = 10 * time.Second

// clusterSlots bounds the cluster tests running at once: each runs a
// PostgreSQL server and two or three maddy processes, and all of them at
// once would starve the other parallel tests (whose waits are bounded by
// waitTimeout) on a small machine.
var clusterSlots = make(chan struct{}, 2)

// clusterTest marks t parallel and waits for a cluster slot, held until t
// and its cleanups are done.
func clusterTest(t *testing.T) {
	t.Parallel()
	clusterSlots <- struct{}{}
	t.Cleanup(func() { <-clusterSlots })
}

// newPG starts a throwaway PostgreSQL cluster for the test (skipped
// outside CI when PostgreSQL is not installed) and removes it at the end.
func newPG(t *testing.T) *pgtest.Cluster {
	t.Helper()
	pgtest.Require(t)
	c, err := pgtest.New(pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// createDB creates database name in c and returns its DSN.
func createDB(t *testing.T, c *pgtest.Cluster, name string) string {
	t.Helper()
	dsn, err := c.CreateDatabase(name)
	if err != nil {
		t.Fatal(err)
	}
	return dsn
}

// newPGProxy starts a proxy to c's server, which a test can cut or slow
// down, and returns it with the DSN of database db through it.
func newPGProxy(t *testing.T, c *pgtest.Cluster, db string) (*testutils.CutProxy, string) {
	t.Helper()
	p := testutils.NewCutProxy(t, "unix", fmt.Sprintf("%s/.s.PGSQL.%d", c.SocketDir(), pgtest.Port))
	return p, fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=%s sslmode=disable", p.Port(), db)
}

// storeDirective is the store block of a node, one line of params.Extra.
func storeDirective(dsn, node string) string {
	return fmt.Sprintf("store postgres {\n        dsn %q\n        node %s\n        lease %v\n    }", dsn, node, clusterLease)
}

// node is one maddy process of a cluster.
type node struct {
	*env
	name string
}

// startNode starts a maddy process named name on the shared store at dsn,
// delivering to its own sink of cs. tweak, if not nil, adjusts the
// configuration further.
//
// Dead-destination suspension is off: the cluster tests' next hop defers
// every first try (greylist), so a node whose claims happen to bring it
// dead_destination_after such tries in a row would suspend the next hop
// and hold back the attempts whose leases these tests are about.
// Suspension has its own tests (destinations_test.go).
func startNode(t *testing.T, cs *clusterSink, dsn, name string, tweak func(*params)) *node {
	t.Helper()
	e := newEnv(t, cs.sink(name), func(p *params) {
		p.Extra = append(p.Extra, storeDirective(dsn, name), "dead_destination_after 0")
		if tweak != nil {
			tweak(p)
		}
	})
	return &node{env: e, name: name}
}

// inFlight scrapes maddy_spool_attempts_in_flight; -1 if it could not.
func (n *node) inFlight() float64 {
	v, ok := n.metric("maddy_spool_attempts_in_flight")
	if !ok {
		return -1
	}
	return v
}

// reporters returns the nodes exporting the cluster-wide gauges
// (maddy_spool_messages_queued), and an error if a node did not answer.
func reporters(nodes ...*node) ([]string, error) {
	var out []string
	for _, n := range nodes {
		fams, err := scrape(n.metricsURL())
		if err != nil {
			return nil, fmt.Errorf("node %s: %w", n.name, err)
		}
		if _, ok := familyValue(fams["maddy_spool_messages_queued"], labels()); ok {
			out = append(out, n.name)
		}
	}
	return out, nil
}

// waitOneReporter waits until exactly one of nodes exports the
// cluster-wide gauges, and returns its name.
func waitOneReporter(t *testing.T, nodes ...*node) string {
	t.Helper()
	var got []string
	eventually(t, waitTimeout, func() bool {
		r, err := reporters(nodes...)
		got = r
		return err == nil && len(r) == 1
	})
	return got[0]
}

// clusterSink is the next hop of a cluster: one SMTP sink per node (so
// that what a node delivered, and what it is delivering, is told apart),
// all answering by one policy with one count of RCPT commands per
// recipient, so that "the first try of a recipient" means the first over
// the whole cluster. DSNs (null sender) are always accepted at once.
//
// A gate per node can hold the DATA stage of that node's mail (after the
// body was read, before the reply): the node then has attempts in flight,
// holding their leases, for as long as the test wants.
type clusterSink struct {
	t *testing.T
	// reply answers the MAIL, RCPT and DATA stages of mail with a sender;
	// try is the recipient's RCPT count over all sinks (1 at its first
	// try; for DATA, the count of the try under way). nil accepts.
	reply func(stage, rcpt string, try int) *smtp.SMTPError

	mu      sync.Mutex
	sinks   map[string]*testutils.SMTPSink
	order   []string
	tries   map[string]int
	gates   map[string]chan struct{} // present while the node's gate holds
	held    map[string]int           // DATA stages waiting at each gate
	changed chan struct{}            // closed and replaced on every change
}

func newClusterSink(t *testing.T, reply func(stage, rcpt string, try int) *smtp.SMTPError) *clusterSink {
	return &clusterSink{
		t:       t,
		reply:   reply,
		sinks:   map[string]*testutils.SMTPSink{},
		tries:   map[string]int{},
		gates:   map[string]chan struct{}{},
		held:    map[string]int{},
		changed: make(chan struct{}),
	}
}

// sink returns the node's sink, starting it on first use.
func (cs *clusterSink) sink(name string) *testutils.SMTPSink {
	cs.mu.Lock()
	s := cs.sinks[name]
	cs.mu.Unlock()
	if s != nil {
		return s
	}
	s = newSink(cs.t, testutils.WithScript(cs.script(name)))
	// Cleanups run last-in first-out: open the gates before the sink
	// closes, which waits for the sessions held there.
	cs.t.Cleanup(cs.releaseAll)
	cs.mu.Lock()
	cs.sinks[name] = s
	cs.order = append(cs.order, name)
	cs.mu.Unlock()
	return s
}

func (cs *clusterSink) script(name string) testutils.SinkScript {
	return func(stage, from, rcpt string, _ int) *smtp.SMTPError {
		if from == "" {
			return nil
		}
		cs.mu.Lock()
		key := strings.ToLower(rcpt)
		if stage == testutils.StageRCPT {
			cs.tries[key]++
		}
		try := cs.tries[key]
		gate := cs.gates[name]
		if stage == testutils.StageDATA && gate != nil {
			cs.held[name]++
			cs.notifyLocked()
			cs.mu.Unlock()
			<-gate
			cs.mu.Lock()
			cs.held[name]--
			cs.notifyLocked()
		}
		cs.mu.Unlock()
		if cs.reply == nil {
			return nil
		}
		return cs.reply(stage, rcpt, try)
	}
}

func (cs *clusterSink) notifyLocked() {
	close(cs.changed)
	cs.changed = make(chan struct{})
}

// hold closes the gates of the named nodes: their DATA stages wait.
func (cs *clusterSink) hold(names ...string) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for _, n := range names {
		if cs.gates[n] == nil {
			cs.gates[n] = make(chan struct{})
		}
	}
}

// release opens the gates of the named nodes.
func (cs *clusterSink) release(names ...string) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for _, n := range names {
		if g := cs.gates[n]; g != nil {
			close(g)
			delete(cs.gates, n)
		}
	}
}

func (cs *clusterSink) releaseAll() {
	cs.mu.Lock()
	names := make([]string, 0, len(cs.gates))
	for n := range cs.gates {
		names = append(names, n)
	}
	cs.mu.Unlock()
	cs.release(names...)
}

// heldAt returns how many DATA stages wait at the node's gate.
func (cs *clusterSink) heldAt(name string) int {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.held[name]
}

// tryCount returns the RCPT commands the sinks got for rcpt.
func (cs *clusterSink) tryCount(rcpt string) int {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.tries[strings.ToLower(rcpt)]
}

// waitHeld waits until exactly n DATA stages wait at the node's gate.
func (cs *clusterSink) waitHeld(name string, n int) {
	cs.t.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for {
		cs.mu.Lock()
		got, ch := cs.held[name], cs.changed
		cs.mu.Unlock()
		if got == n {
			return
		}
		select {
		case <-ch:
		case <-timer.C:
			cs.t.Fatalf("%d DATA stages held at the gate of node %s after %v, want %d", got, name, waitTimeout, n)
		}
	}
}

// sinkOf returns the sink of a node that has one.
func (cs *clusterSink) sinkOf(name string) *testutils.SMTPSink {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.sinks[name]
}

// messages returns what the sinks of the named nodes (every node if none
// are named) accepted.
func (cs *clusterSink) messages(names ...string) []testutils.Message {
	if len(names) == 0 {
		cs.mu.Lock()
		names = append(names, cs.order...)
		cs.mu.Unlock()
	}
	var out []testutils.Message
	for _, n := range names {
		if s := cs.sinkOf(n); s != nil {
			out = append(out, s.Messages()...)
		}
	}
	return out
}

// deliveries returns how many times the named nodes' sinks (every node's
// if none are named) accepted message id for rcpt.
func (cs *clusterSink) deliveries(id, rcpt string, names ...string) int {
	if len(names) == 0 {
		cs.mu.Lock()
		names = append(names, cs.order...)
		cs.mu.Unlock()
	}
	n := 0
	for _, name := range names {
		if s := cs.sinkOf(name); s != nil {
			n += s.DeliveryCount(id, rcpt)
		}
	}
	return n
}

// firstDelivery returns when one of the named nodes' sinks first accepted
// message id for rcpt; ok is false if none did.
func (cs *clusterSink) firstDelivery(id, rcpt string, names ...string) (time.Time, bool) {
	var first time.Time
	for _, m := range cs.messages(names...) {
		if m.MessageID() != id {
			continue
		}
		for _, r := range m.Rcpts {
			if strings.EqualFold(r, rcpt) && (first.IsZero() || m.Received.Before(first)) {
				first = m.Received
			}
		}
	}
	return first, !first.IsZero()
}

// sentMsg is a message the test submitted and the server accepted (250).
type sentMsg struct {
	id   string   // Message-ID, without brackets
	node string   // the node it was submitted to
	good []string // recipients the next hop accepts (eventually)
	fail []string // recipients it refuses for good: a DSN is owed
}

func (m sentMsg) rcpts() []string { return append(append([]string(nil), m.good...), m.fail...) }

// dsnKey names one failure reported by a DSN: the original message's
// Message-ID and the recipient.
type dsnKey struct{ msgID, rcpt string }

// dsnReports counts, among msgs, the DSNs reporting a recipient failed,
// per original message and recipient. The original is the Message-ID of
// the header the DSN returns.
func dsnReports(msgs []testutils.Message) (map[dsnKey]int, error) {
	out := map[dsnKey]int{}
	for _, m := range dsns(msgs) {
		r, err := parseDSN(m.Data)
		if err != nil {
			return nil, fmt.Errorf("DSN %s: %w", m.MessageID(), err)
		}
		orig, err := dsnOriginalID(m.Data)
		if err != nil {
			return nil, fmt.Errorf("DSN %s: %w", m.MessageID(), err)
		}
		for _, h := range r.Recipients {
			if !strings.EqualFold(strings.TrimSpace(h.Get("Action")), "failed") {
				continue
			}
			fr := strings.TrimSpace(h.Get("Final-Recipient"))
			addr := strings.TrimSpace(fr[strings.IndexByte(fr, ';')+1:])
			out[dsnKey{orig, strings.ToLower(addr)}]++
		}
	}
	return out, nil
}

// dsnOriginalID returns the Message-ID (without brackets) of the original
// header a DSN returns (its text/rfc822-headers or message/rfc822 part).
func dsnOriginalID(data []byte) (string, error) {
	msg, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		return "", err
	}
	_, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil {
		return "", err
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			return "", fmt.Errorf("no part returns the original header")
		}
		if err != nil {
			return "", err
		}
		pt, _, _ := mime.ParseMediaType(p.Header.Get("Content-Type"))
		switch pt {
		case "text/rfc822-headers", "message/rfc822", "message/global", "message/global-headers":
		default:
			continue
		}
		orig, err := mail.ReadMessage(bufio.NewReader(io.MultiReader(p, strings.NewReader("\r\n\r\n"))))
		if err != nil {
			return "", fmt.Errorf("original header: %w", err)
		}
		id := strings.TrimSpace(orig.Header.Get("Message-Id"))
		return strings.TrimSuffix(strings.TrimPrefix(id, "<"), ">"), nil
	}
}
