package tests

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/testutils"
)

// crashSeedEnv overrides the crash test's random seed, to replay a run.
const crashSeedEnv = "SPOOL_CRASH_SEED"

// crashSender is the envelope sender of every crash-test message; the sink
// accepts it, so DSNs to it are observable.
const crashSender = "sender@origin.test"

// rcptFate is what the crash test's sink does with one recipient.
type rcptFate struct {
	reject bool // 550 5.1.1 on every try
	defers int  // 451 4.4.1 to the first defers tries, then 250
}

// fateOf decides a recipient's fate from the seed and the address alone,
// so it is the same on every try and after every restart. Every address is
// unique to one message, so the sink's per-recipient attempt counter is the
// per (message, recipient) try number.
func fateOf(seed int64, rcpt string) rcptFate {
	h := fnv.New64a()
	_ = binary.Write(h, binary.LittleEndian, seed)
	h.Write([]byte(strings.ToLower(rcpt)))
	v := h.Sum64()
	switch v % 10 {
	case 0, 1:
		return rcptFate{reject: true}
	case 2, 3, 4:
		return rcptFate{defers: 1 + int(v/10%2)}
	default:
		return rcptFate{}
	}
}

// crashScript answers RCPT by fateOf; the sender's address (a DSN's
// recipient) is always accepted.
func crashScript(seed int64) testutils.SinkScript {
	return func(stage, _, rcpt string, attempt int) *smtp.SMTPError {
		if stage != testutils.StageRCPT || strings.EqualFold(rcpt, crashSender) {
			return nil
		}
		f := fateOf(seed, rcpt)
		switch {
		case f.reject:
			return testutils.SinkReply(550, [3]int{5, 1, 1}, "no such mailbox (crash test)")
		case attempt <= f.defers:
			return testutils.SinkReply(451, [3]int{4, 4, 1}, fmt.Sprintf("try again (attempt %d of %d deferred)", attempt, f.defers))
		}
		return nil
	}
}

// crashSeed returns the seed from SPOOL_CRASH_SEED or a fresh one.
func crashSeed(t *testing.T) int64 {
	t.Helper()
	if s := os.Getenv(crashSeedEnv); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", crashSeedEnv, s, err)
		}
		return v
	}
	return time.Now().UnixNano()
}

// acceptedLedger records the messages the server accepted (250 after DATA).
type acceptedLedger struct {
	mu    sync.Mutex
	rcpts map[string][]string // Message-ID -> recipients
}

func (l *acceptedLedger) add(id string, rcpts []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rcpts[id] = rcpts
}

func (l *acceptedLedger) snapshot() map[string][]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string][]string, len(l.rcpts))
	for k, v := range l.rcpts {
		out[k] = v
	}
	return out
}

// crashOutcome compares what the sink saw with what was accepted.
type crashOutcome struct {
	missing   []string // "id rcpt": neither delivered nor bounced (yet)
	wrong     []string // delivered although rejected, or bounced although accepted by the sink
	delivered int      // (id, rcpt) pairs delivered
	bounced   int      // (id, rcpt) pairs named in a failure DSN
	dsns      int
}

func checkCrashOutcome(seed int64, sink *testutils.SMTPSink, accepted map[string][]string) (crashOutcome, error) {
	var o crashOutcome
	msgs := sink.Messages()
	failed, n, err := dsnFailures(msgs)
	if err != nil {
		return o, err
	}
	o.dsns = n
	for id, rcpts := range accepted {
		for _, r := range rcpts {
			got := sink.DeliveryCount(id, r) > 0
			bounced := failed[strings.ToLower(r)] > 0
			f := fateOf(seed, r)
			switch {
			case f.reject && got, !f.reject && bounced:
				o.wrong = append(o.wrong, fmt.Sprintf("%s %s (fate %+v, delivered %v, bounced %v)", id, r, f, got, bounced))
			case f.reject && bounced:
				o.bounced++
			case !f.reject && got:
				o.delivered++
			default:
				o.missing = append(o.missing, id+" "+r)
			}
		}
	}
	sort.Strings(o.missing)
	sort.Strings(o.wrong)
	return o, nil
}

// TestCrashKill9 submits mail from several concurrent clients while the
// server is killed with SIGKILL at random moments and restarted on the same
// state directory, then checks by Message-ID and recipient that every
// message accepted with 250 reached every recipient the sink accepts and
// was bounced with a DSN for every recipient the sink rejects. Duplicates
// (an attempt in flight at a kill is repeated) must stay within
// kills × the attempts that can be in flight. The seed is logged; SPOOL_CRASH_SEED replays it.
func TestCrashKill9(t *testing.T) {
	t.Parallel()
	const (
		kills          = 24
		clients        = 4
		maxParallelism = 4
		maxTries       = 5 // above the most defers fateOf hands out (2)
		drainTimeout   = 2 * time.Minute
	)
	seed := crashSeed(t)
	t.Logf("seed %d (replay with %s=%d)", seed, crashSeedEnv, seed)
	rng := rand.New(rand.NewSource(seed))

	// Every kill resets the server's connections to the sink; those errors
	// are expected and would only bury the figures in the log.
	sink := newSink(t, testutils.WithScript(crashScript(seed)), testutils.WithErrorLog(nil))
	e := newEnv(t, sink, func(p *params) {
		p.MaxTries = strconv.Itoa(maxTries)
		p.Extra = append(p.Extra, "max_parallelism "+strconv.Itoa(maxParallelism))
	})

	ledger := &acceptedLedger{rcpts: make(map[string][]string)}
	var (
		next       atomic.Int64
		attempted  atomic.Int64
		stop       = make(chan struct{})
		wg         sync.WaitGroup
		addr       = e.smtpAddr()
		clientSeed = rng.Int63()
	)
	for c := 0; c < clients; c++ {
		wg.Add(1)
		crng := rand.New(rand.NewSource(clientSeed + int64(c)))
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				n := next.Add(1)
				id := fmt.Sprintf("crash.%d@e2e.test", n)
				rcpts := make([]string, 1+crng.Intn(3))
				for k := range rcpts {
					rcpts[k] = fmt.Sprintf("m%d.r%d@remote.test", n, k+1)
				}
				attempted.Add(1)
				res := submitTx(addr, crashSender, rcpts, newMessage(crashSender, rcpts, id, testBody(id)), 10*time.Second)
				if res.Accepted {
					ledger.add(id, rcpts)
					continue
				}
				// The server is down or restarting: don't spin.
				select {
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
				}
			}
		}()
	}

	start := time.Now()
	for k := 1; k <= kills; k++ {
		// Random moments: anywhere from start-up to mid-delivery.
		time.Sleep(time.Duration(20+rng.Intn(480)) * time.Millisecond)
		e.srv.kill()
		e.restart()
	}
	close(stop)
	wg.Wait()
	killPhase := time.Since(start)
	accepted := ledger.snapshot()
	if len(accepted) == 0 {
		t.Fatal("no message was accepted during the run")
	}

	// Let the queue drain: every accepted recipient delivered or bounced.
	ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	var (
		o   crashOutcome
		err error
	)
	for {
		o, err = checkCrashOutcome(seed, sink, accepted)
		if err != nil {
			t.Fatal(err)
		}
		if len(o.missing) == 0 || ctx.Err() != nil {
			break
		}
		_, _ = sink.WaitMessages(ctx, sink.Accepted()+1)
	}
	if len(o.missing) == 0 {
		eventually(t, drainTimeout, func() bool {
			v, ok := e.metric("maddy_spool_messages_queued")
			return ok && v == 0
		})
		// Reports sent while draining the last messages are in now.
		o, err = checkCrashOutcome(seed, sink, accepted)
		if err != nil {
			t.Fatal(err)
		}
	}

	// A kill repeats at most the attempts in flight: max_parallelism
	// delivering plus SavesPerSlot × max_parallelism whose outcome was
	// being saved. Each is for one message (and possibly several of its
	// recipients), so the bound applies to repeated message deliveries:
	// per message, the most extra copies any of its recipients got.
	bound := kills * (1 + schedule.SavesPerSlot) * maxParallelism
	var dupPairs, dupDSNs int
	extraCopies := make(map[string]int)
	for _, d := range sink.Duplicates() {
		if !strings.HasPrefix(d.MessageID, "crash.") {
			dupDSNs += d.Count - 1
			continue
		}
		dupPairs += d.Count - 1
		extraCopies[d.MessageID] = max(extraCopies[d.MessageID], d.Count-1)
	}
	dupMsgs := 0
	for _, n := range extraCopies {
		dupMsgs += n
	}
	rcptTotal := 0
	for _, r := range accepted {
		rcptTotal += len(r)
	}
	t.Logf("seed %d: %d kills survived in %v; %d transactions tried, %d messages accepted (%d recipients); "+
		"%d delivered, %d bounced, lost %d; %d DSNs; duplicates: %d repeated message deliveries (%d recipient copies), %d DSNs (bound %d)",
		seed, kills, killPhase.Round(time.Millisecond), attempted.Load(), len(accepted), rcptTotal,
		o.delivered, o.bounced, len(o.missing), o.dsns, dupMsgs, dupPairs, dupDSNs, bound)

	if len(o.missing) > 0 {
		t.Errorf("lost %d accepted (message, recipient) pairs (seed %d), first ones: %v", len(o.missing), seed, firstN(o.missing, 20))
	}
	if len(o.wrong) > 0 {
		t.Errorf("%d recipients with the wrong outcome (seed %d): %v", len(o.wrong), seed, firstN(o.wrong, 20))
	}
	if dupMsgs+dupDSNs > bound {
		t.Errorf("%d repeated message deliveries and %d duplicate DSNs exceed kills × attempts in flight = %d (seed %d)",
			dupMsgs, dupDSNs, bound, seed)
	}
}

func firstN(s []string, n int) []string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
