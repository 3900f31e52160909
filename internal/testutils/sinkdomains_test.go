package testutils

import (
	"context"
	"errors"
	"fmt"
	"net"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

func TestAddrDomain(t *testing.T) {
	for in, want := range map[string]string{
		"a@Example.ORG":     "example.org",
		"\"a@b\"@c.example": "c.example",
		"postmaster":        "",
		"a@":                "",
	} {
		if got := AddrDomain(in); got != want {
			t.Errorf("AddrDomain(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestSMTPSinkDomainDownAndRecover: a domain set down refuses its
// recipients with the given reply while other domains are accepted, and
// accepts again once cleared; the per-domain figures count what was seen.
func TestSMTPSinkDomainDownAndRecover(t *testing.T) {
	ctx := testCtx(t)
	s := NewSMTPSink(t)
	s.SetDomain("Down.TEST", DomainBehaviour{RcptReply: SinkReply(451, [3]int{4, 4, 1}, "down for now")})

	res := send(t, s.Addr(), "f@x", []string{"a@DOWN.test", "b@up.test"}, testMsg("d1@x"), nil, nil)
	var se *smtp.SMTPError
	if err := res.rcptErr["a@DOWN.test"]; !errors.As(err, &se) || se.Code != 451 || se.EnhancedCode != (smtp.EnhancedCode{4, 4, 1}) || se.Message != "down for now" {
		t.Errorf("RCPT for the down domain: %v, want 451 4.4.1 down for now", err)
	}
	if res.rcptErr["b@up.test"] != nil || res.dataErr != nil {
		t.Errorf("the other domain: %+v", res)
	}
	// Counters of the recipient go on as usual.
	if n := s.RcptAttempts("a@down.test"); n != 1 {
		t.Errorf("RcptAttempts = %d", n)
	}

	s.ClearDomain("down.test")
	res = send(t, s.Addr(), "f@x", []string{"a@down.test"}, testMsg("d2@x"), nil, nil)
	if len(res.rcptErr) != 0 || res.dataErr != nil {
		t.Errorf("after ClearDomain: %+v", res)
	}

	// The transaction ends after the reply to DATA has been written.
	down, err := s.WaitDomain(ctx, "down.test", func(d DomainStats) bool { return d.InFlight == 0 })
	if err != nil {
		t.Fatal(err)
	}
	want := DomainStats{Rcpts: 2, RcptsRefused: 1, Transactions: 2, Accepted: 1, MaxInFlight: 1}
	if down != want {
		t.Errorf("down.test: %v, want %v", down, want)
	}
	up := s.DomainStats("UP.test")
	if want := (DomainStats{Rcpts: 1, Transactions: 1, Accepted: 1, MaxInFlight: 1}); up != want {
		t.Errorf("up.test: %v, want %v", up, want)
	}
	if got := s.DomainStats("never.test"); got != (DomainStats{}) {
		t.Errorf("unseen domain: %v", got)
	}
	if all := s.AllDomainStats(); len(all) != 2 {
		t.Errorf("AllDomainStats = %v", all)
	}
	t.Logf("domains:\n%s", s.DescribeDomains())
}

// TestSMTPSinkDomainScriptStillConsulted: a domain's reply wins over the
// script's, but the script still runs; without a domain reply the script
// decides.
func TestSMTPSinkDomainScriptStillConsulted(t *testing.T) {
	calls := 0
	var mu sync.Mutex
	s := NewSMTPSink(t, WithScript(func(stage, _, rcpt string, _ int) *smtp.SMTPError {
		if stage != StageRCPT {
			return nil
		}
		mu.Lock()
		calls++
		mu.Unlock()
		if rcpt == "bad@x.test" {
			return SinkReply(550, [3]int{5, 1, 1}, "no such user")
		}
		return nil
	}))
	s.SetDomain("x.test", DomainBehaviour{RcptReply: SinkReply(421, [3]int{4, 7, 0}, "go away")})
	res := send(t, s.Addr(), "f@x", []string{"bad@x.test", "ok@x.test"}, testMsg("s@x"), nil, nil)
	if smtpCode(res.rcptErr["bad@x.test"]) != 421 || smtpCode(res.rcptErr["ok@x.test"]) != 421 {
		t.Errorf("with the domain down: %+v", res.rcptErr)
	}
	s.SetDomain("x.test", DomainBehaviour{}) // up, no delay
	res = send(t, s.Addr(), "f@x", []string{"bad@x.test", "ok@x.test"}, testMsg("s2@x"), nil, nil)
	if smtpCode(res.rcptErr["bad@x.test"]) != 550 || res.rcptErr["ok@x.test"] != nil || res.dataErr != nil {
		t.Errorf("with the domain up: %+v", res)
	}
	mu.Lock()
	defer mu.Unlock()
	if calls != 4 {
		t.Errorf("script called %d times, want 4", calls)
	}
	if d := s.DomainStats("x.test"); d.Rcpts != 4 || d.RcptsRefused != 3 || d.Accepted != 1 {
		t.Errorf("x.test: %v", d)
	}
}

// TestSMTPSinkDomainTransactions: a transaction counts once per domain it
// has recipients in, and several transactions on one connection each
// count.
func TestSMTPSinkDomainTransactions(t *testing.T) {
	ctx := testCtx(t)
	s := NewSMTPSink(t)
	c, err := smtp.Dial(s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := 0; i < 2; i++ {
		res := sendOn(t, c, "f@x", []string{"a@one.test", "b@one.test", "c@two.test"}, testMsg(fmt.Sprintf("t%d@x", i)), nil, nil, false)
		if len(res.rcptErr) != 0 || res.dataErr != nil {
			t.Fatalf("send %d: %+v", i, res)
		}
	}
	// A transaction given up after RCPT (RSET) counts too.
	if err := c.Mail("f@x", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("d@two.test", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Reset(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.WaitDomain(ctx, "one.test", func(d DomainStats) bool { return d.InFlight == 0 }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.WaitDomain(ctx, "two.test", func(d DomainStats) bool { return d.InFlight == 0 }); err != nil {
		t.Fatal(err)
	}
	got := s.AllDomainStats()
	want := map[string]DomainStats{
		"one.test": {Rcpts: 4, Transactions: 2, Accepted: 2, MaxInFlight: 1},
		"two.test": {Rcpts: 3, Transactions: 3, Accepted: 2, MaxInFlight: 1},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got  %v\nwant %v", got, want)
	}
}

// TestSMTPSinkDomainSlow: RCPTs of a slow domain wait, its concurrent
// transactions are counted, other domains are not held up, a change of
// behaviour applies to the next command, and Close ends the waits.
func TestSMTPSinkDomainSlow(t *testing.T) {
	ctx := testCtx(t)
	s, err := StartSMTPSink()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	// A short delay is observed (a lower bound, so no flakiness).
	s.SetDomain("slow.test", DomainBehaviour{RcptDelay: 150 * time.Millisecond})
	start := time.Now()
	if res := send(t, s.Addr(), "f@x", []string{"a@slow.test"}, testMsg("s0@x"), nil, nil); len(res.rcptErr) != 0 || res.dataErr != nil {
		t.Fatalf("slow send: %+v", res)
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("a slow RCPT was answered after %v, want at least 150ms", d)
	}

	// Now it hangs: three transactions wait in RCPT at once.
	s.SetDomain("slow.test", DomainBehaviour{RcptDelay: time.Hour})
	const n = 3
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			c, err := smtp.Dial(s.Addr())
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if err := c.Mail("f@x", nil); err != nil {
				errs <- err
				return
			}
			errs <- c.Rcpt(fmt.Sprintf("h%d@slow.test", i), nil)
		}()
	}
	st, err := s.WaitDomain(ctx, "slow.test", func(d DomainStats) bool { return d.InFlight == n })
	if err != nil {
		t.Fatal(err)
	}
	if st.MaxInFlight != n || st.Transactions != n+1 || st.Accepted != 1 {
		t.Errorf("slow.test while hanging: %v", st)
	}

	// Another domain is not held up.
	if res := send(t, s.Addr(), "f@x", []string{"b@fast.test"}, testMsg("f@x"), nil, nil); len(res.rcptErr) != 0 || res.dataErr != nil {
		t.Errorf("fast send: %+v", res)
	}
	// The slow domain recovers for new commands; those already waiting
	// keep waiting.
	s.ClearDomain("slow.test")
	if res := send(t, s.Addr(), "f@x", []string{"c@slow.test"}, testMsg("s1@x"), nil, nil); len(res.rcptErr) != 0 || res.dataErr != nil {
		t.Errorf("send after recovery: %+v", res)
	}
	if st := s.DomainStats("slow.test"); st.Accepted != 2 || st.MaxInFlight != n+1 || st.InFlight < n {
		t.Errorf("slow.test after recovery: %v", st)
	}

	// Close cuts the waits short.
	start = time.Now()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Close took %v with RCPTs waiting", d)
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err == nil {
			t.Errorf("a hanging RCPT was accepted after Close")
		}
	}
	if st := s.DomainStats("slow.test"); st.InFlight != 0 {
		t.Errorf("slow.test after Close: %v", st)
	}
}

// TestSMTPSinkDomainData: a domain's DATA delay and reply; over SMTP the
// reply answers the whole transaction, over LMTP only its recipients.
func TestSMTPSinkDomainData(t *testing.T) {
	s := NewSMTPSink(t)
	s.SetDomain("slow.test", DomainBehaviour{DataDelay: 150 * time.Millisecond})
	s.SetDomain("full.test", DomainBehaviour{DataReply: SinkReply(452, [3]int{4, 3, 1}, "disk full")})

	start := time.Now()
	res := send(t, s.Addr(), "f@x", []string{"a@slow.test", "b@other.test"}, testMsg("d1@x"), nil, nil)
	if len(res.rcptErr) != 0 || res.dataErr != nil {
		t.Fatalf("slow DATA: %+v", res)
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("DATA answered after %v, want at least 150ms", d)
	}

	res = send(t, s.Addr(), "f@x", []string{"a@full.test", "b@other.test"}, testMsg("d2@x"), nil, nil)
	if len(res.rcptErr) != 0 || smtpCode(res.dataErr) != 452 {
		t.Errorf("DATA with a full domain over SMTP: %+v", res)
	}
	if d := s.DomainStats("full.test"); d.Rcpts != 1 || d.RcptsRefused != 0 || d.Accepted != 0 || d.Transactions != 1 {
		t.Errorf("full.test: %v", d)
	}

	l := NewSMTPSink(t, WithLMTP(true))
	l.SetDomain("full.test", DomainBehaviour{DataReply: SinkReply(452, [3]int{4, 3, 1}, "disk full")})
	conn, err := net.Dial("tcp", l.Addr())
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClientLMTP(conn)
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	lres := sendOn(t, c, "f@x", []string{"a@full.test", "b@other.test"}, testMsg("l@x"), nil, nil, true)
	if lres.lmtp["a@full.test"] == nil || lres.lmtp["a@full.test"].Code != 452 || lres.lmtp["b@other.test"] != nil {
		t.Errorf("LMTP statuses: %+v", lres.lmtp)
	}
	if msgs := l.Messages(); len(msgs) != 1 || !reflect.DeepEqual(msgs[0].Rcpts, []string{"b@other.test"}) {
		t.Errorf("LMTP recorded %+v", msgs)
	}
	if d := l.DomainStats("full.test"); d.Accepted != 0 {
		t.Errorf("LMTP full.test: %v", d)
	}
	if d := l.DomainStats("other.test"); d.Accepted != 1 {
		t.Errorf("LMTP other.test: %v", d)
	}
}

// TestSMTPSinkDomainConcurrentChanges: behaviour changes racing with
// traffic keep the figures consistent (run with -race).
func TestSMTPSinkDomainConcurrentChanges(t *testing.T) {
	ctx := testCtx(t)
	s := NewSMTPSink(t)
	down := DomainBehaviour{RcptReply: SinkReply(451, [3]int{4, 4, 1}, "down")}
	stop := make(chan struct{})
	flipped := make(chan struct{})
	go func() {
		defer close(flipped)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%2 == 0 {
				s.SetDomain("flap.test", down)
			} else {
				s.ClearDomain("flap.test")
			}
			time.Sleep(time.Millisecond)
		}
	}()
	const clients, each = 4, 5
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < each; j++ {
				c, err := smtp.Dial(s.Addr())
				if err != nil {
					t.Error(err)
					return
				}
				err = c.SendMail("f@x", []string{fmt.Sprintf("r%d.%d@flap.test", i, j)}, strings.NewReader(testMsg(fmt.Sprintf("c%d.%d@x", i, j))))
				if err != nil {
					// A refused recipient leaves the transaction open
					// until the sink hears of its end, which a bare
					// close tells it only later: RSET ends it before
					// this client starts the next, so one client's
					// transactions never overlap at the sink.
					c.Reset()
				}
				c.Close()
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-flipped
	st, err := s.WaitDomain(ctx, "flap.test", func(d DomainStats) bool { return d.InFlight == 0 })
	if err != nil {
		t.Fatal(err)
	}
	if st.Rcpts != clients*each || st.Transactions != clients*each || st.Accepted+st.RcptsRefused != clients*each ||
		st.Accepted != s.Accepted() || st.MaxInFlight < 1 || st.MaxInFlight > clients {
		t.Errorf("flap.test: %v (sink accepted %d)", st, s.Accepted())
	}
}

func TestSMTPSinkWaitDomainTimeout(t *testing.T) {
	s := NewSMTPSink(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := s.WaitDomain(ctx, "x.test", func(d DomainStats) bool { return d.Accepted > 0 })
	if !errors.Is(err, context.Canceled) {
		t.Errorf("WaitDomain = %v", err)
	}
}
