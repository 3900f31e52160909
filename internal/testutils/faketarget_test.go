package testutils

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/buffer"
	"github.com/foxcpp/maddy/framework/exterrors"
	"github.com/foxcpp/maddy/framework/module"
)

// testCtx bounds every wait so a bug fails the test instead of hanging it.
func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// outcome is what a well-behaved caller observed while delivering through
// a target.
type outcome struct {
	startErr  error
	partial   bool
	rcptErr   map[string]error
	bodyErr   error            // Body's result (non-partial)
	status    map[string]error // BodyNonAtomic statuses (partial)
	commitErr error
	committed bool
}

type mapCollector struct {
	mu sync.Mutex
	m  map[string]error
}

func (c *mapCollector) SetStatus(rcpt string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, dup := c.m[rcpt]; dup {
		panic("SetStatus called twice for " + rcpt)
	}
	c.m[rcpt] = err
}

// deliver drives tgt the way maddy's message pipeline does: Start,
// AddRcpt for each recipient, BodyNonAtomic if available (else Body), then
// Commit, or Abort when nothing can be delivered.
func deliver(ctx context.Context, tgt module.DeliveryTarget, meta *module.MsgMetadata, from string, rcpts []string, hdr textproto.Header, body []byte) outcome {
	var o outcome
	d, err := tgt.Start(ctx, meta, from)
	if err != nil {
		o.startErr = err
		return o
	}
	_, o.partial = d.(module.PartialDelivery)
	o.rcptErr = make(map[string]error)
	accepted := 0
	for _, r := range rcpts {
		err := d.AddRcpt(ctx, r, smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyFailure}})
		if err != nil {
			o.rcptErr[r] = err
		} else {
			accepted++
		}
	}
	if accepted == 0 {
		_ = d.Abort(ctx)
		return o
	}
	buf := buffer.MemoryBuffer{Slice: body}
	if pd, ok := d.(module.PartialDelivery); ok {
		c := &mapCollector{m: make(map[string]error)}
		pd.BodyNonAtomic(ctx, c, hdr, buf)
		o.status = c.m
	} else if err := d.Body(ctx, hdr, buf); err != nil {
		o.bodyErr = err
		_ = d.Abort(ctx)
		return o
	}
	o.commitErr = d.Commit(ctx)
	o.committed = o.commitErr == nil
	return o
}

func testHeader(msgID string) textproto.Header {
	var h textproto.Header
	h.Set("Message-Id", "<"+msgID+">")
	h.Set("Subject", "test")
	return h
}

func TestTempPerm(t *testing.T) {
	tmp := Temp(451, [3]int{4, 4, 1}, "later")
	perm := Perm(550, [3]int{5, 1, 1}, "no such user")
	if !exterrors.IsTemporaryOrUnspec(tmp) || !exterrors.IsTemporary(tmp) {
		t.Errorf("Temp not temporary")
	}
	if exterrors.IsTemporaryOrUnspec(perm) {
		t.Errorf("Perm classified temporary")
	}
	var se *exterrors.SMTPError
	if !errors.As(perm, &se) || se.Code != 550 || se.EnhancedCode != (exterrors.EnhancedCode{5, 1, 1}) || se.Message != "no such user" {
		t.Errorf("Perm = %#v", perm)
	}
	for name, f := range map[string]func(){
		"Temp(550)": func() { Temp(550, [3]int{5, 0, 0}, "") },
		"Perm(451)": func() { Perm(451, [3]int{4, 0, 0}, "") },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s did not panic", name)
				}
			}()
			f()
		}()
	}
}

func TestScriptHelpers(t *testing.T) {
	e1, e2 := errors.New("e1"), errors.New("e2")

	ae := AttemptErrors(e1, nil, e2)
	got := []error{ae(0), ae(1), ae(2), ae(3), ae(4)}
	if want := []error{nil, e1, nil, e2, nil}; !reflect.DeepEqual(got, want) {
		t.Errorf("AttemptErrors = %v, want %v", got, want)
	}

	fr := FailRcpts(map[string]error{"Bad@Example.org": e1})
	if fr(1, "bad@example.org") != e1 || fr(1, "good@example.org") != nil {
		t.Errorf("FailRcpts mismatch")
	}

	ff := FailFirst(2, e1, "a@x")
	var seq []error
	for i := 0; i < 3; i++ {
		seq = append(seq, ff(i+1, "A@x"))
	}
	if want := []error{e1, e1, nil}; !reflect.DeepEqual(seq, want) {
		t.Errorf("FailFirst(a) = %v, want %v", seq, want)
	}
	if ff(1, "b@x") != nil {
		t.Errorf("FailFirst applied to unlisted rcpt")
	}
	all := FailFirst(1, e2)
	if all(1, "q@x") != e2 || all(2, "q@x") != nil || all(1, "r@x") != e2 {
		t.Errorf("FailFirst without rcpts should apply to all, per rcpt")
	}

	// ChainRcpt evaluates every script, so FailFirst keeps counting
	// while FailRcpts already fails the recipient.
	ff2 := FailFirst(1, e2)
	ch := ChainRcpt(nil, FailRcpts(map[string]error{"a@x": e1}), ff2)
	if ch(1, "a@x") != e1 || ch(2, "a@x") != e1 {
		t.Errorf("ChainRcpt should prefer the first script")
	}
	if ch(1, "b@x") != e2 || ch(2, "b@x") != nil {
		t.Errorf("ChainRcpt fallthrough wrong")
	}
}

func TestFakeTargetScripting(t *testing.T) {
	temp := Temp(451, [3]int{4, 2, 0}, "mailbox busy")
	perm := Perm(550, [3]int{5, 1, 1}, "no such user")
	bodyTemp := Temp(452, [3]int{4, 3, 1}, "disk full")
	rcpts := []string{"a@example.org", "b@example.org", "c@example.org"}

	type want struct {
		startErr  error
		rcptErr   map[string]error
		bodyErr   error
		status    map[string]error
		commitErr error
		delivered []string // rcpts of the single delivery; nil: none
	}
	cases := []struct {
		name    string
		partial bool
		setup   func(*FakeTarget)
		want    want
	}{
		{
			name: "accept all",
			want: want{delivered: rcpts},
		},
		{
			name:    "accept all partial",
			partial: true,
			want:    want{status: map[string]error{rcpts[0]: nil, rcpts[1]: nil, rcpts[2]: nil}, delivered: rcpts},
		},
		{
			name: "rcpt errors at AddRcpt",
			setup: func(ft *FakeTarget) {
				ft.Rcpt = FailRcpts(map[string]error{rcpts[1]: perm, rcpts[2]: temp})
			},
			want: want{rcptErr: map[string]error{rcpts[1]: perm, rcpts[2]: temp}, delivered: rcpts[:1]},
		},
		{
			name:    "rcpt errors at AddRcpt partial",
			partial: true,
			setup: func(ft *FakeTarget) {
				ft.Rcpt = FailRcpts(map[string]error{rcpts[1]: perm})
			},
			want: want{
				rcptErr:   map[string]error{rcpts[1]: perm},
				status:    map[string]error{rcpts[0]: nil, rcpts[2]: nil},
				delivered: []string{rcpts[0], rcpts[2]},
			},
		},
		{
			name: "rcpt error at body fails whole message without PartialDelivery",
			setup: func(ft *FakeTarget) {
				ft.FailAt = FailAtBody
				ft.Rcpt = FailRcpts(map[string]error{rcpts[2]: temp, rcpts[1]: perm})
			},
			// The first failing recipient in AddRcpt order decides.
			want: want{bodyErr: perm},
		},
		{
			name:    "rcpt error at body is per recipient with PartialDelivery",
			partial: true,
			setup: func(ft *FakeTarget) {
				ft.FailAt = FailAtBody
				ft.Rcpt = FailRcpts(map[string]error{rcpts[1]: perm, rcpts[2]: temp})
			},
			want: want{
				status:    map[string]error{rcpts[0]: nil, rcpts[1]: perm, rcpts[2]: temp},
				delivered: rcpts[:1],
			},
		},
		{
			name:    "success statuses omitted",
			partial: true,
			setup: func(ft *FakeTarget) {
				ft.FailAt = FailAtBody
				ft.OmitSuccessStatus = true
				ft.Rcpt = FailRcpts(map[string]error{rcpts[1]: perm})
			},
			want: want{status: map[string]error{rcpts[1]: perm}, delivered: []string{rcpts[0], rcpts[2]}},
		},
		{
			name:  "whole body error",
			setup: func(ft *FakeTarget) { ft.BodyErr = AttemptErrors(bodyTemp) },
			want:  want{bodyErr: bodyTemp},
		},
		{
			name:    "whole body error partial",
			partial: true,
			setup:   func(ft *FakeTarget) { ft.BodyErr = AttemptErrors(bodyTemp) },
			want:    want{status: map[string]error{rcpts[0]: bodyTemp, rcpts[1]: bodyTemp, rcpts[2]: bodyTemp}},
		},
		{
			name:  "start error",
			setup: func(ft *FakeTarget) { ft.StartErr = AttemptErrors(temp) },
			want:  want{startErr: temp},
		},
		{
			name:  "commit error",
			setup: func(ft *FakeTarget) { ft.CommitErr = AttemptErrors(temp) },
			want:  want{commitErr: temp},
		},
		{
			name:    "all rcpts rejected",
			partial: true,
			setup:   func(ft *FakeTarget) { ft.Rcpt = func(int, string) error { return perm } },
			want:    want{rcptErr: map[string]error{rcpts[0]: perm, rcpts[1]: perm, rcpts[2]: perm}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ft := &FakeTarget{Partial: tc.partial}
			if tc.setup != nil {
				ft.Update(tc.setup)
			}
			o := deliver(testCtx(t), ft, &module.MsgMetadata{ID: "m1"}, "from@example.org", rcpts, testHeader("m1@x"), []byte("hello\r\n"))

			if o.startErr != tc.want.startErr {
				t.Fatalf("start error = %v, want %v", o.startErr, tc.want.startErr)
			}
			if tc.want.startErr == nil && o.partial != tc.partial {
				t.Errorf("delivery implements PartialDelivery = %v, want %v", o.partial, tc.partial)
			}
			if len(o.rcptErr) != 0 || len(tc.want.rcptErr) != 0 {
				if !reflect.DeepEqual(o.rcptErr, tc.want.rcptErr) {
					t.Errorf("AddRcpt errors = %v, want %v", o.rcptErr, tc.want.rcptErr)
				}
			}
			if o.bodyErr != tc.want.bodyErr {
				t.Errorf("Body error = %v, want %v", o.bodyErr, tc.want.bodyErr)
			}
			if tc.want.status != nil && !reflect.DeepEqual(o.status, tc.want.status) {
				t.Errorf("statuses = %v, want %v", o.status, tc.want.status)
			}
			if o.commitErr != tc.want.commitErr {
				t.Errorf("Commit error = %v, want %v", o.commitErr, tc.want.commitErr)
			}

			dels := ft.Deliveries()
			if tc.want.delivered == nil {
				if len(dels) != 0 {
					t.Errorf("delivered %+v, want nothing", dels)
				}
			} else if len(dels) != 1 || !reflect.DeepEqual(dels[0].Rcpts, tc.want.delivered) {
				t.Errorf("delivered %+v, want rcpts %v", dels, tc.want.delivered)
			}
			if pe := ft.ProtocolErrors(); len(pe) != 0 {
				t.Errorf("protocol errors: %v", pe)
			}
			if n := ft.InFlight(); n != 0 {
				t.Errorf("InFlight = %d after attempt, want 0", n)
			}
			if ft.Attempts() != 1 {
				t.Errorf("Attempts = %d", ft.Attempts())
			}
		})
	}
}

// TestFakeTargetRetrySequence checks that per-attempt scripts see the
// attempt number and that runtime updates affect only later attempts.
func TestFakeTargetRetrySequence(t *testing.T) {
	ctx := testCtx(t)
	busy := Temp(451, [3]int{4, 2, 1}, "busy")
	ft := &FakeTarget{Partial: true, Rcpt: FailFirst(2, busy, "slow@x")}
	rcpts := []string{"fast@x", "slow@x"}

	o1 := deliver(ctx, ft, &module.MsgMetadata{ID: "m"}, "f@x", rcpts, testHeader("m@x"), []byte("b"))
	o2 := deliver(ctx, ft, &module.MsgMetadata{ID: "m"}, "f@x", rcpts[1:], testHeader("m@x"), []byte("b"))
	ft.Update(func(ft *FakeTarget) { ft.Rcpt = nil })
	o3 := deliver(ctx, ft, &module.MsgMetadata{ID: "m"}, "f@x", rcpts[1:], testHeader("m@x"), []byte("b"))

	if o1.rcptErr["slow@x"] != busy || o1.rcptErr["fast@x"] != nil || !o1.committed {
		t.Errorf("attempt 1: %+v", o1)
	}
	if o2.rcptErr["slow@x"] != busy {
		t.Errorf("attempt 2: %+v", o2)
	}
	if len(o3.rcptErr) != 0 || !o3.committed {
		t.Errorf("attempt 3: %+v", o3)
	}
	if ft.CountDelivered("SLOW@x") != 1 || ft.CountDelivered("fast@x") != 1 {
		t.Errorf("CountDelivered: slow %d fast %d", ft.CountDelivered("slow@x"), ft.CountDelivered("fast@x"))
	}
	dels := ft.Deliveries()
	if len(dels) != 2 || dels[0].Attempt != 1 || dels[1].Attempt != 3 {
		t.Errorf("deliveries: %+v", dels)
	}
}

func TestFakeTargetRecording(t *testing.T) {
	ctx := testCtx(t)
	ft := &FakeTarget{Partial: true, FailAt: FailAtBody, Rcpt: FailRcpts(map[string]error{"b@x": Perm(550, [3]int{5, 1, 1}, "no")})}

	meta := &module.MsgMetadata{
		ID:            "msg-1",
		OriginalRcpts: map[string]string{"a@x": "A@x"},
		SMTPOpts:      smtp.MailOptions{EnvelopeID: "env1", Return: smtp.DSNReturnHeaders},
		Conn:          &module.ConnState{Proto: "ESMTP", Hostname: "client.test"},
	}
	hdr := testHeader("rec@x")
	body := []byte("line 1\r\nline 2\r\n")
	o := deliver(ctx, ft, meta, "sender@x", []string{"a@x", "b@x"}, hdr, body)
	if !o.committed {
		t.Fatalf("not committed: %+v", o)
	}
	// Mutating the caller's objects must not change what was recorded.
	meta.OriginalRcpts["a@x"] = "changed"
	meta.Conn.Hostname = "changed"
	hdr.Set("Subject", "changed")
	body[0] = 'X'

	recs := ft.Records()
	if len(recs) != 1 {
		t.Fatalf("records = %d", len(recs))
	}
	r := recs[0]
	if r.Attempt != 1 || r.From != "sender@x" || !r.Partial || r.MsgMeta.ID != "msg-1" ||
		r.MsgMeta.OriginalRcpts["a@x"] != "A@x" || r.MsgMeta.Conn.Hostname != "client.test" ||
		r.MsgMeta.SMTPOpts.EnvelopeID != "env1" {
		t.Errorf("start record wrong: %+v meta %+v", r, r.MsgMeta)
	}
	if len(r.Rcpts) != 2 || r.Rcpts[0].Rcpt != "a@x" || r.Rcpts[0].Err != nil || r.Rcpts[1].BodyErr == nil ||
		!reflect.DeepEqual(r.Rcpts[0].Opts.Notify, []smtp.DSNNotify{smtp.DSNNotifyFailure}) {
		t.Errorf("rcpt records wrong: %+v", r.Rcpts)
	}
	if !r.BodyCalled || string(r.Body) != "line 1\r\nline 2\r\n" || r.Header.Get("Subject") != "test" {
		t.Errorf("body record wrong: %q %v", r.Body, r.Header.Get("Subject"))
	}
	if r.Status["a@x"] != nil || r.Status["b@x"] == nil || !r.Committed || r.Aborted || r.CommitErr != nil {
		t.Errorf("outcome record wrong: %+v", r)
	}

	dels := ft.Deliveries()
	if len(dels) != 1 {
		t.Fatalf("deliveries = %d", len(dels))
	}
	d := dels[0]
	if d.From != "sender@x" || !reflect.DeepEqual(d.Rcpts, []string{"a@x"}) || string(d.Body) != "line 1\r\nline 2\r\n" ||
		d.Header.Get("Message-Id") != "<rec@x>" || d.MsgMeta.ID != "msg-1" {
		t.Errorf("delivered wrong: %+v", d)
	}
	if _, ok := d.RcptOpts["b@x"]; ok || len(d.RcptOpts["a@x"].Notify) != 1 {
		t.Errorf("RcptOpts wrong: %+v", d.RcptOpts)
	}
	// Returned copies are independent of the target's state.
	d.Rcpts[0] = "mutated"
	d.Header.Set("Subject", "mutated")
	if again := ft.Deliveries()[0]; again.Rcpts[0] != "a@x" || again.Header.Get("Subject") != "test" {
		t.Errorf("Deliveries returned shared state")
	}
}

func TestFakeTargetProtocolErrors(t *testing.T) {
	ctx := testCtx(t)
	body := buffer.MemoryBuffer{Slice: []byte("x")}
	cases := []struct {
		name string
		run  func(d module.Delivery)
	}{
		{"commit before body", func(d module.Delivery) { _ = d.Commit(ctx) }},
		{"add rcpt after abort", func(d module.Delivery) {
			_ = d.Abort(ctx)
			_ = d.AddRcpt(ctx, "late@x", smtp.RcptOptions{})
		}},
		{"double abort", func(d module.Delivery) { _ = d.Abort(ctx); _ = d.Abort(ctx) }},
		{"commit after failed body", func(d module.Delivery) {
			_ = d.AddRcpt(ctx, "a@x", smtp.RcptOptions{})
			if d.Body(ctx, textproto.Header{}, body) == nil {
				panic("body should fail")
			}
			_ = d.Commit(ctx)
		}},
		{"duplicate rcpt", func(d module.Delivery) {
			_ = d.AddRcpt(ctx, "a@x", smtp.RcptOptions{})
			_ = d.AddRcpt(ctx, "a@x", smtp.RcptOptions{})
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ft := &FakeTarget{BodyErr: AttemptErrors(errors.New("boom"))}
			d, err := ft.Start(ctx, &module.MsgMetadata{}, "f@x")
			if err != nil {
				t.Fatal(err)
			}
			tc.run(d)
			if pe := ft.ProtocolErrors(); len(pe) != 1 {
				t.Errorf("protocol errors = %q, want exactly one", pe)
			}
		})
	}
}

func TestFakeTargetNonPartialType(t *testing.T) {
	ctx := testCtx(t)
	for _, partial := range []bool{false, true} {
		ft := &FakeTarget{Partial: partial}
		d, err := ft.Start(ctx, &module.MsgMetadata{}, "")
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := d.(module.PartialDelivery); ok != partial {
			t.Errorf("Partial=%v: implements PartialDelivery = %v", partial, ok)
		}
		_ = d.Abort(ctx)
	}
}

func TestFakeTargetModule(t *testing.T) {
	m, err := NewFakeTargetModule(FakeTargetModName, "ft1", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name() != "testutils.fake_target" || m.InstanceName() != "ft1" || m.Init(nil) != nil {
		t.Errorf("module identity wrong: %q %q", m.Name(), m.InstanceName())
	}
	if _, ok := m.(module.DeliveryTarget); !ok {
		t.Errorf("module is not a DeliveryTarget")
	}
}

func TestFakeTargetWaitDelivered(t *testing.T) {
	ctx := testCtx(t)
	ft := &FakeTarget{}

	// Nothing delivered: an expired context ends the wait with an error.
	short, cancel := context.WithCancel(ctx)
	cancel()
	dels, err := ft.WaitDelivered(short, 1)
	if !errors.Is(err, context.Canceled) || len(dels) != 0 {
		t.Errorf("WaitDelivered on cancelled ctx = %v, %v", dels, err)
	}

	const n = 8
	go func() {
		for i := 0; i < n; i++ {
			deliver(ctx, ft, &module.MsgMetadata{ID: fmt.Sprint(i)}, "f@x", []string{"r@x"}, testHeader(fmt.Sprint(i)), []byte("b"))
		}
	}()
	dels, err = ft.WaitDelivered(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	if len(dels) < n {
		t.Fatalf("got %d deliveries", len(dels))
	}
	if err := ft.WaitStarted(ctx, n); err != nil {
		t.Fatal(err)
	}
	if err := ft.WaitIdle(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestFakeTargetBlockAndConcurrency(t *testing.T) {
	ctx := testCtx(t)
	ft := &FakeTarget{Partial: true}
	ft.Block()

	const n = 6
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			deliver(ctx, ft, &module.MsgMetadata{ID: fmt.Sprint(i)}, "f@x", []string{fmt.Sprintf("r%d@x", i)}, testHeader(fmt.Sprint(i)), []byte("b"))
		}()
	}
	if err := ft.WaitBlocked(ctx, n); err != nil {
		t.Fatal(err)
	}
	if ft.InFlight() != n || ft.MaxConcurrent() != n || ft.Attempts() != n || len(ft.Deliveries()) != 0 {
		t.Errorf("while blocked: inflight %d max %d attempts %d delivered %d",
			ft.InFlight(), ft.MaxConcurrent(), ft.Attempts(), len(ft.Deliveries()))
	}
	ft.Unblock()
	if _, err := ft.WaitDelivered(ctx, n); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if ft.InFlight() != 0 || ft.Blocked() != 0 || ft.MaxConcurrent() != n {
		t.Errorf("after: inflight %d blocked %d max %d", ft.InFlight(), ft.Blocked(), ft.MaxConcurrent())
	}
}

// TestFakeTargetParallelismLimit shows how MaxConcurrent verifies a limit:
// 20 deliveries through a 3-slot semaphore never exceed 3 in flight.
func TestFakeTargetParallelismLimit(t *testing.T) {
	ctx := testCtx(t)
	ft := &FakeTarget{}
	ft.BlockBody()
	sem := make(chan struct{}, 3)
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			deliver(ctx, ft, &module.MsgMetadata{}, "f@x", []string{"r@x"}, textproto.Header{}, []byte("b"))
		}()
	}
	// Three attempts reach the body gate; the semaphore holds the rest.
	if err := ft.WaitBlocked(ctx, 3); err != nil {
		t.Fatal(err)
	}
	recs := ft.Records()
	if len(recs) != 3 || len(recs[0].Rcpts) != 1 {
		t.Errorf("records while held at body: %d", len(recs))
	}
	ft.Unblock()
	wg.Wait()
	if got := ft.MaxConcurrent(); got != 3 {
		t.Errorf("MaxConcurrent = %d, want 3", got)
	}
	if got := len(ft.Deliveries()); got != 20 {
		t.Errorf("delivered %d, want 20", got)
	}
}

func TestFakeTargetBlockedContextCancel(t *testing.T) {
	ctx := testCtx(t)
	for _, atBody := range []bool{false, true} {
		t.Run(fmt.Sprintf("atBody=%v", atBody), func(t *testing.T) {
			ft := &FakeTarget{Partial: atBody}
			if atBody {
				ft.BlockBody()
			} else {
				ft.Block()
			}
			dctx, cancel := context.WithCancel(ctx)
			done := make(chan outcome, 1)
			go func() {
				done <- deliver(dctx, ft, &module.MsgMetadata{}, "f@x", []string{"r@x"}, textproto.Header{}, []byte("b"))
			}()
			if err := ft.WaitBlocked(ctx, 1); err != nil {
				t.Fatal(err)
			}
			cancel()
			o := <-done
			if atBody {
				if !errors.Is(o.status["r@x"], context.Canceled) {
					t.Errorf("status = %v, want context.Canceled", o.status)
				}
			} else if !errors.Is(o.startErr, context.Canceled) {
				t.Errorf("start error = %v, want context.Canceled", o.startErr)
			}
			if ft.InFlight() != 0 || ft.Blocked() != 0 || len(ft.Deliveries()) != 0 {
				t.Errorf("after cancel: inflight %d blocked %d delivered %d", ft.InFlight(), ft.Blocked(), len(ft.Deliveries()))
			}
		})
	}
}

// TestFakeTargetRace hammers the target from many goroutines while the
// script is swapped and state is read, for the race detector.
func TestFakeTargetRace(t *testing.T) {
	ctx := testCtx(t)
	ft := &FakeTarget{Partial: true, FailAt: FailAtBody, Rcpt: FailFirst(1, Temp(451, [3]int{4, 0, 0}, "x"))}
	var wg sync.WaitGroup
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			deliver(ctx, ft, &module.MsgMetadata{}, "f@x", []string{fmt.Sprintf("r%d@x", i%4)}, textproto.Header{}, []byte("b"))
			_ = ft.Records()
			_ = ft.Deliveries()
			_ = ft.MaxConcurrent()
		}()
	}
	ft.Update(func(ft *FakeTarget) { ft.Rcpt = nil })
	wg.Wait()
	if ft.Attempts() != 32 || ft.InFlight() != 0 {
		t.Errorf("attempts %d inflight %d", ft.Attempts(), ft.InFlight())
	}
	if pe := ft.ProtocolErrors(); len(pe) != 0 {
		t.Errorf("protocol errors: %v", pe)
	}
}
