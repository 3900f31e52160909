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

	"github.com/emersion/go-smtp"
)

// sendResult is what an SMTP client saw for one transaction.
type sendResult struct {
	mailErr error
	rcptErr map[string]error
	dataErr error // nil also when DATA was never reached
	lmtp    map[string]*smtp.SMTPError
}

func testMsg(id string) string {
	return "From: a@example.org\r\nMessage-Id: <" + id + ">\r\nSubject: hi\r\n\r\nbody of " + id + "\r\n"
}

// send runs one transaction on a fresh connection. DATA is skipped when no
// recipient was accepted, like a real client.
func send(t *testing.T, addr, from string, rcpts []string, data string, mopts *smtp.MailOptions, ropts *smtp.RcptOptions) sendResult {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return sendOn(t, c, from, rcpts, data, mopts, ropts, false)
}

func sendOn(t *testing.T, c *smtp.Client, from string, rcpts []string, data string, mopts *smtp.MailOptions, ropts *smtp.RcptOptions, lmtp bool) sendResult {
	t.Helper()
	res := sendResult{rcptErr: make(map[string]error)}
	if res.mailErr = c.Mail(from, mopts); res.mailErr != nil {
		_ = c.Reset()
		return res
	}
	ok := 0
	for _, r := range rcpts {
		if err := c.Rcpt(r, ropts); err != nil {
			res.rcptErr[r] = err
		} else {
			ok++
		}
	}
	if ok == 0 {
		_ = c.Reset()
		return res
	}
	var w interface {
		Write([]byte) (int, error)
		Close() error
	}
	var err error
	if lmtp {
		res.lmtp = make(map[string]*smtp.SMTPError)
		w, err = c.LMTPData(func(rcpt string, st *smtp.SMTPError) { res.lmtp[rcpt] = st })
	} else {
		w, err = c.Data()
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte(data)); err != nil {
		t.Fatal(err)
	}
	res.dataErr = w.Close()
	return res
}

func smtpCode(err error) int {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

func TestSMTPSinkAcceptAndRecord(t *testing.T) {
	ctx := testCtx(t)
	s := NewSMTPSink(t)
	if !strings.HasPrefix(s.Addr(), "127.0.0.1:") || s.Port() == 0 || s.Addr() != fmt.Sprintf("127.0.0.1:%d", s.Port()) {
		t.Fatalf("Addr %q Port %d", s.Addr(), s.Port())
	}

	c, err := smtp.Dial(s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	for _, ext := range []string{"8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES", "PIPELINING"} {
		if ok, _ := c.Extension(ext); !ok {
			t.Errorf("extension %s not advertised", ext)
		}
	}
	if size, ok := c.MaxMessageSize(); !ok || size != 64<<20 {
		t.Errorf("SIZE = %d, %v", size, ok)
	}

	mopts := &smtp.MailOptions{UTF8: true, Return: smtp.DSNReturnHeaders, EnvelopeID: "env-1"}
	ropts := &smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed}}
	data := testMsg("one@x")
	res := sendOn(t, c, "sender@example.org", []string{"a@example.org", "b@example.org"}, data, mopts, ropts, false)
	if res.mailErr != nil || len(res.rcptErr) != 0 || res.dataErr != nil {
		t.Fatalf("send: %+v", res)
	}

	msgs, err := s.WaitMessages(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	m := msgs[0]
	if m.From != "sender@example.org" || !reflect.DeepEqual(m.Rcpts, []string{"a@example.org", "b@example.org"}) {
		t.Errorf("envelope: %q %q", m.From, m.Rcpts)
	}
	if string(m.Data) != data {
		t.Errorf("data = %q, want %q", m.Data, data)
	}
	if !m.MailOpts.UTF8 || m.MailOpts.Return != smtp.DSNReturnHeaders || m.MailOpts.EnvelopeID != "env-1" || m.MailOpts.Body != smtp.Body8BitMIME {
		t.Errorf("mail opts: %+v", m.MailOpts)
	}
	if len(m.RcptOpts) != 2 || !reflect.DeepEqual(m.RcptOpts[1].Notify, ropts.Notify) {
		t.Errorf("rcpt opts: %+v", m.RcptOpts)
	}
	if m.Received.IsZero() || m.MessageID() != "one@x" {
		t.Errorf("received %v id %q", m.Received, m.MessageID())
	}
	if s.Accepted() != 1 || s.Attempts(StageMAIL, "SENDER@example.org") != 1 || s.RcptAttempts("a@example.org") != 1 || s.Attempts(StageDATA, "b@example.org") != 1 {
		t.Errorf("counters: accepted %d mail %d rcpt %d data %d", s.Accepted(),
			s.Attempts(StageMAIL, "sender@example.org"), s.RcptAttempts("a@example.org"), s.Attempts(StageDATA, "b@example.org"))
	}
}

func TestSMTPSinkScripting(t *testing.T) {
	defer451 := SinkReply(451, [3]int{4, 4, 1}, "later")
	reject550 := SinkReply(550, [3]int{5, 1, 1}, "no such user")
	rcpts := []string{"a@x", "b@x"}

	cases := []struct {
		name      string
		script    SinkScript
		wantMail  int            // expected MAIL reply code, 0 = accepted
		wantRcpt  map[string]int // expected RCPT reply codes for rejected rcpts
		wantData  int            // expected DATA reply code, 0 = accepted
		wantRcpts []string       // recipients of the recorded message; nil = none recorded
	}{
		{name: "accept", wantRcpts: rcpts},
		{
			name:      "fixed rcpt reply",
			script:    SinkRcptReplies(map[string]*smtp.SMTPError{"B@x": reject550}),
			wantRcpt:  map[string]int{"b@x": 550},
			wantRcpts: []string{"a@x"},
		},
		{
			name:     "defer all rcpts",
			script:   SinkDeferFirst(5),
			wantRcpt: map[string]int{"a@x": 451, "b@x": 451},
		},
		{
			name: "reject at MAIL",
			script: func(stage, from, _ string, _ int) *smtp.SMTPError {
				if stage == StageMAIL && from == "f@x" {
					return reject550
				}
				return nil
			},
			wantMail: 550,
		},
		{
			name: "defer at DATA when b is a recipient",
			script: func(stage, _, rcpt string, _ int) *smtp.SMTPError {
				if stage == StageDATA && rcpt == "b@x" {
					return defer451
				}
				return nil
			},
			wantData: 451,
		},
		{
			name:      "chain",
			script:    SinkChain(nil, SinkDeferFirst(0), SinkRcptReplies(map[string]*smtp.SMTPError{"a@x": defer451})),
			wantRcpt:  map[string]int{"a@x": 451},
			wantRcpts: []string{"b@x"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := NewSMTPSink(t, WithScript(tc.script))
			res := send(t, s.Addr(), "f@x", rcpts, testMsg("m@x"), nil, nil)
			if got := smtpCode(res.mailErr); got != tc.wantMail {
				t.Errorf("MAIL code %d, want %d (%v)", got, tc.wantMail, res.mailErr)
			}
			gotRcpt := make(map[string]int)
			for r, err := range res.rcptErr {
				gotRcpt[r] = smtpCode(err)
			}
			if len(gotRcpt) != 0 || len(tc.wantRcpt) != 0 {
				if !reflect.DeepEqual(gotRcpt, tc.wantRcpt) {
					t.Errorf("RCPT codes %v, want %v", gotRcpt, tc.wantRcpt)
				}
			}
			if got := smtpCode(res.dataErr); got != tc.wantData {
				t.Errorf("DATA code %d, want %d (%v)", got, tc.wantData, res.dataErr)
			}
			msgs := s.Messages()
			switch {
			case tc.wantRcpts == nil && len(msgs) != 0:
				t.Errorf("recorded %+v, want nothing", msgs)
			case tc.wantRcpts != nil && (len(msgs) != 1 || !reflect.DeepEqual(msgs[0].Rcpts, tc.wantRcpts)):
				t.Errorf("recorded %+v, want rcpts %v", msgs, tc.wantRcpts)
			}
		})
	}
}

func TestSMTPSinkDeferFirstThenSwitch(t *testing.T) {
	ctx := testCtx(t)
	s := NewSMTPSink(t, WithScript(SinkDeferFirst(2, "slow@x")))

	var codes []int
	for i := 0; i < 3; i++ {
		res := send(t, s.Addr(), "f@x", []string{"slow@x", "fast@x"}, testMsg(fmt.Sprintf("m%d@x", i)), nil, nil)
		codes = append(codes, smtpCode(res.rcptErr["slow@x"]))
	}
	if !reflect.DeepEqual(codes, []int{451, 451, 0}) {
		t.Errorf("slow@x codes = %v", codes)
	}
	if err := s.WaitRcptAttempts(ctx, "slow@x", 3); err != nil {
		t.Fatal(err)
	}

	// Switching the script at runtime: a deferring sink starts accepting.
	s.SetScript(func(stage, _, _ string, _ int) *smtp.SMTPError {
		if stage == StageRCPT {
			return SinkReply(451, [3]int{4, 4, 1}, "deferring")
		}
		return nil
	})
	if res := send(t, s.Addr(), "f@x", []string{"x@x"}, testMsg("d@x"), nil, nil); smtpCode(res.rcptErr["x@x"]) != 451 {
		t.Errorf("after SetScript(defer): %+v", res)
	}
	s.SetScript(nil)
	if res := send(t, s.Addr(), "f@x", []string{"x@x"}, testMsg("d@x"), nil, nil); len(res.rcptErr) != 0 || res.dataErr != nil {
		t.Errorf("after SetScript(nil): %+v", res)
	}
	if _, err := s.WaitMessages(ctx, 4); err != nil {
		t.Fatal(err)
	}
}

func TestSMTPSinkDuplicates(t *testing.T) {
	s := NewSMTPSink(t)
	send(t, s.Addr(), "f@x", []string{"a@x", "b@x"}, testMsg("dup@x"), nil, nil)
	send(t, s.Addr(), "f@x", []string{"A@x"}, testMsg("dup@x"), nil, nil)
	send(t, s.Addr(), "f@x", []string{"a@x"}, testMsg("other@x"), nil, nil)

	if got := len(s.FindByMessageID("<dup@x>")); got != 2 {
		t.Errorf("FindByMessageID = %d messages", got)
	}
	if s.DeliveryCount("dup@x", "a@x") != 2 || s.DeliveryCount("<dup@x>", "b@x") != 1 || s.DeliveryCount("other@x", "a@x") != 1 {
		t.Errorf("DeliveryCount wrong")
	}
	want := []Duplicate{{MessageID: "dup@x", Rcpt: "a@x", Count: 2}}
	if got := s.Duplicates(); !reflect.DeepEqual(got, want) {
		t.Errorf("Duplicates = %+v, want %+v", got, want)
	}
}

func TestSMTPSinkLMTP(t *testing.T) {
	s := NewSMTPSink(t, WithLMTP(true), WithScript(func(stage, _, rcpt string, _ int) *smtp.SMTPError {
		if stage == StageDATA && rcpt == "b@x" {
			return SinkReply(552, [3]int{5, 2, 2}, "mailbox full")
		}
		return nil
	}))
	conn, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClientLMTP(conn)
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	res := sendOn(t, c, "f@x", []string{"a@x", "b@x", "c@x"}, testMsg("l@x"), nil, nil, true)
	if res.dataErr != nil {
		t.Fatalf("LMTP data: %v", res.dataErr)
	}
	if res.lmtp["a@x"] != nil || res.lmtp["c@x"] != nil || res.lmtp["b@x"] == nil || res.lmtp["b@x"].Code != 552 {
		t.Errorf("LMTP statuses: %+v", res.lmtp)
	}
	msgs := s.Messages()
	if len(msgs) != 1 || !reflect.DeepEqual(msgs[0].Rcpts, []string{"a@x", "c@x"}) || len(msgs[0].RcptOpts) != 2 {
		t.Errorf("recorded: %+v", msgs)
	}
}

func TestSMTPSinkOnMessage(t *testing.T) {
	var mu sync.Mutex
	fail := true
	var seen []string
	s := NewSMTPSink(t, WithOnMessage(func(m *Message) error {
		mu.Lock()
		defer mu.Unlock()
		if fail {
			fail = false
			return errors.New("disk full")
		}
		seen = append(seen, m.MessageID())
		return nil
	}))
	r1 := send(t, s.Addr(), "f@x", []string{"a@x"}, testMsg("h1@x"), nil, nil)
	r2 := send(t, s.Addr(), "f@x", []string{"a@x"}, testMsg("h2@x"), nil, nil)
	if smtpCode(r1.dataErr) != 451 || r2.dataErr != nil {
		t.Errorf("codes: %v / %v", r1.dataErr, r2.dataErr)
	}
	mu.Lock()
	defer mu.Unlock()
	if !reflect.DeepEqual(seen, []string{"h2@x"}) || s.Accepted() != 1 || len(s.Messages()) != 1 {
		t.Errorf("seen %v accepted %d", seen, s.Accepted())
	}
}

func TestSMTPSinkWithoutRecording(t *testing.T) {
	s := NewSMTPSink(t, WithoutRecording())
	send(t, s.Addr(), "f@x", []string{"a@x"}, testMsg("n@x"), nil, nil)
	if s.Accepted() != 1 || len(s.Messages()) != 0 || s.DeliveryCount("n@x", "a@x") != 1 {
		t.Errorf("accepted %d recorded %d", s.Accepted(), len(s.Messages()))
	}
}

func TestSMTPSinkConcurrent(t *testing.T) {
	ctx := testCtx(t)
	s := NewSMTPSink(t, WithScript(SinkDeferFirst(1)))
	const n = 16
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rcpt := fmt.Sprintf("r%d@x", i)
			// First try is deferred, the retry is accepted.
			for try := 0; try < 2; try++ {
				c, err := smtp.Dial(s.Addr())
				if err != nil {
					t.Error(err)
					return
				}
				_ = c.SendMail("f@x", []string{rcpt}, strings.NewReader(testMsg(rcpt)))
				c.Close()
			}
		}()
	}
	msgs, err := s.WaitMessages(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if len(msgs) != n || len(s.Duplicates()) != 0 {
		t.Errorf("messages %d duplicates %v", len(msgs), s.Duplicates())
	}
}

func TestSMTPSinkWaitTimeout(t *testing.T) {
	s := NewSMTPSink(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.WaitMessages(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitMessages = %v", err)
	}
	if err := s.WaitRcptAttempts(ctx, "a@x", 1); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitRcptAttempts = %v", err)
	}
}

func TestSMTPSinkShutdown(t *testing.T) {
	ctx := testCtx(t)
	s, err := StartSMTPSink()
	if err != nil {
		t.Fatal(err)
	}

	// A transaction in progress...
	c1, err := smtp.Dial(s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	if err := c1.Mail("f@x", nil); err != nil {
		t.Fatal(err)
	}
	if err := c1.Rcpt("a@x", nil); err != nil {
		t.Fatal(err)
	}

	done := make(chan error, 1)
	go func() { done <- s.Shutdown(ctx) }()
	if err := waitUntil(ctx, &s.mu, &s.changed, func() bool { return s.draining }); err != nil {
		t.Fatal(err)
	}

	// ...new transactions are refused while draining...
	c2, err := smtp.Dial(s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := c2.Mail("f@x", nil); smtpCode(err) != 421 {
		t.Errorf("MAIL while draining: %v", err)
	}

	// ...and the one in progress completes before Shutdown returns.
	w, err := c1.Data()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte(testMsg("last@x"))); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Errorf("DATA during drain: %v", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if s.Accepted() != 1 {
		t.Errorf("accepted %d", s.Accepted())
	}
	if _, err := smtp.Dial(s.Addr()); err == nil {
		t.Errorf("sink still listening after Shutdown")
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestSMTPSinkShutdownTimeout(t *testing.T) {
	s, err := StartSMTPSink()
	if err != nil {
		t.Fatal(err)
	}
	c, err := smtp.Dial(s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("f@x", nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Shutdown with stuck transaction = %v", err)
	}
	// The connection was dropped by the forced close.
	if err := c.Rcpt("a@x", nil); err == nil {
		t.Errorf("connection survived Close")
	}
}
