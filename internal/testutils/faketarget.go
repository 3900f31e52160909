package testutils

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"strings"
	"sync"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/buffer"
	"github.com/foxcpp/maddy/framework/config"
	"github.com/foxcpp/maddy/framework/module"
)

// FakeTargetModName is the module name reported by FakeTarget.Name.
const FakeTargetModName = "testutils.fake_target"

// FailPoint selects when a scripted per-recipient error is reported.
type FailPoint int

const (
	// FailAtAddRcpt returns the recipient's error from AddRcpt (the zero
	// value, as that is what most targets do).
	FailAtAddRcpt FailPoint = iota
	// FailAtBody accepts the recipient in AddRcpt and reports its error at
	// body time: through the StatusCollector when Partial is set, otherwise
	// as the error of Body for the whole message.
	FailAtBody
)

func (p FailPoint) String() string {
	switch p {
	case FailAtAddRcpt:
		return "AddRcpt"
	case FailAtBody:
		return "Body"
	default:
		return fmt.Sprintf("FailPoint(%d)", int(p))
	}
}

// FakeTarget is a scriptable in-memory module.DeliveryTarget.
//
// The exported fields form the script. Set them before the target is used;
// to change them while deliveries may be running, use Update. Each attempt
// takes a snapshot of the script in Start, so one attempt never sees a mix
// of old and new behaviour.
//
// The zero value accepts everything and is ready to use.
type FakeTarget struct {
	// InstName is returned by InstanceName.
	InstName string

	// Rcpt decides each recipient's outcome; nil accepts all. It is called
	// exactly once per AddRcpt call, even with FailAt == FailAtBody.
	Rcpt RcptScript
	// StartErr, BodyErr and CommitErr fail the whole attempt at that stage;
	// nil means success. BodyErr fails the body for every recipient.
	StartErr  AttemptScript
	BodyErr   AttemptScript
	CommitErr AttemptScript

	// FailAt selects when errors from Rcpt are reported.
	FailAt FailPoint

	// Partial makes Start return a delivery that also implements
	// module.PartialDelivery. Without it the delivery deliberately lacks
	// BodyNonAtomic, so code under test takes its all-or-nothing path.
	Partial bool

	// OmitSuccessStatus makes BodyNonAtomic call SetStatus only for failed
	// recipients, to exercise callers that must treat "no status" as
	// success.
	OmitSuccessStatus bool

	mu          sync.Mutex
	changed     notifier
	attempts    int
	inFlight    int
	maxInFlight int
	blocked     int
	startGate   chan struct{}
	bodyGate    chan struct{}
	rcptGate    chan struct{}
	gatedRcpt   string
	records     []*AttemptRecord
	delivered   []Delivered
	protoErrs   []string
}

// AttemptRecord is everything one attempt (one Start call) saw.
type AttemptRecord struct {
	Attempt int // 1-based Start call number
	MsgMeta *module.MsgMetadata
	From    string
	Partial bool // the delivery implemented module.PartialDelivery

	StartErr error
	Rcpts    []RcptRecord // every AddRcpt call, in order

	BodyCalled bool
	Header     textproto.Header
	Body       []byte
	// BodyErr is the whole-message body error (Body's result, or the error
	// applied to every recipient by BodyNonAtomic).
	BodyErr error
	// Status is the body-time outcome of each recipient accepted by
	// AddRcpt; nil means success.
	Status map[string]error

	Committed bool
	CommitErr error
	Aborted   bool
}

// RcptRecord is one AddRcpt call.
type RcptRecord struct {
	Rcpt string
	Opts smtp.RcptOptions
	// Err is what AddRcpt returned.
	Err error
	// BodyErr is the scripted error withheld until body time (FailAtBody).
	BodyErr error
}

// Delivered is a message committed by a FakeTarget. Only recipients that
// were accepted both by AddRcpt and at body time appear in Rcpts.
type Delivered struct {
	Attempt  int
	MsgMeta  *module.MsgMetadata
	From     string
	Rcpts    []string
	RcptOpts map[string]smtp.RcptOptions
	Header   textproto.Header
	Body     []byte
}

var (
	_ module.Module          = (*FakeTarget)(nil)
	_ module.DeliveryTarget  = (*FakeTarget)(nil)
	_ module.Delivery        = (*fakeDelivery)(nil)
	_ module.PartialDelivery = (*fakePartialDelivery)(nil)
)

// NewFakeTargetModule has the module.FuncNewModule signature so a
// FakeTarget can be registered with module.Register or handed to code that
// instantiates targets by factory.
func NewFakeTargetModule(_, instName string, _, _ []string) (module.Module, error) {
	return &FakeTarget{InstName: instName}, nil
}

// Name implements module.Module.
func (t *FakeTarget) Name() string { return FakeTargetModName }

// InstanceName implements module.Module.
func (t *FakeTarget) InstanceName() string { return t.InstName }

// Init implements module.Module; the fake has no configuration directives.
func (t *FakeTarget) Init(*config.Map) error { return nil }

// Update runs fn with the target's lock held so the script fields can be
// changed while deliveries are running (e.g. switch from failing to
// accepting). fn must only touch exported fields and must not call methods
// of t. Attempts already started keep their old script.
func (t *FakeTarget) Update(fn func(t *FakeTarget)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	fn(t)
}

// targetScript is the per-attempt snapshot of the exported fields.
type targetScript struct {
	rcpt              RcptScript
	start             AttemptScript
	body              AttemptScript
	commit            AttemptScript
	failAt            FailPoint
	partial           bool
	omitSuccessStatus bool
}

// Start implements module.DeliveryTarget.
func (t *FakeTarget) Start(ctx context.Context, msgMeta *module.MsgMetadata, mailFrom string) (module.Delivery, error) {
	t.mu.Lock()
	t.attempts++
	n := t.attempts
	sc := targetScript{
		rcpt:              t.Rcpt,
		start:             t.StartErr,
		body:              t.BodyErr,
		commit:            t.CommitErr,
		failAt:            t.FailAt,
		partial:           t.Partial,
		omitSuccessStatus: t.OmitSuccessStatus,
	}
	t.inFlight++
	if t.inFlight > t.maxInFlight {
		t.maxInFlight = t.inFlight
	}
	rec := &AttemptRecord{Attempt: n, MsgMeta: cloneMeta(msgMeta), From: mailFrom, Partial: sc.partial}
	t.records = append(t.records, rec)
	t.changed.broadcast()
	t.mu.Unlock()

	err := t.hold(ctx, gateStart)
	if err == nil && sc.start != nil {
		err = sc.start(n)
	}
	if err != nil {
		t.mu.Lock()
		rec.StartErr = err
		t.inFlight--
		t.changed.broadcast()
		t.mu.Unlock()
		return nil, err
	}

	d := &fakeDelivery{t: t, attempt: n, sc: sc, rec: rec}
	if sc.partial {
		return &fakePartialDelivery{d}, nil
	}
	return d, nil
}

// gatePoint names where an attempt can be held up.
type gatePoint uint8

const (
	gateStart gatePoint = iota
	gateBody
	gateRcpt
)

// hold parks the caller while the gate at point is closed. It is how
// tests keep an attempt in flight at a known point.
func (t *FakeTarget) hold(ctx context.Context, point gatePoint) error {
	t.mu.Lock()
	gate := map[gatePoint]chan struct{}{gateStart: t.startGate, gateBody: t.bodyGate, gateRcpt: t.rcptGate}[point]
	if gate == nil {
		t.mu.Unlock()
		return nil
	}
	t.blocked++
	t.changed.broadcast()
	t.mu.Unlock()

	var err error
	select {
	case <-gate:
	case <-ctx.Done():
		err = ctx.Err()
	}

	t.mu.Lock()
	t.blocked--
	t.changed.broadcast()
	t.mu.Unlock()
	return err
}

// Block makes subsequent attempts wait inside Start (after being counted
// and recorded) until Unblock is called or their context is cancelled.
func (t *FakeTarget) Block() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.startGate == nil {
		t.startGate = make(chan struct{})
	}
}

// BlockBody makes attempts wait at the start of Body/BodyNonAtomic, after
// recipients were added, until Unblock or context cancellation. A
// cancelled wait fails the body with ctx.Err().
func (t *FakeTarget) BlockBody() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.bodyGate == nil {
		t.bodyGate = make(chan struct{})
	}
}

// BlockRcpt makes AddRcpt of rcpt wait, before the Rcpt script runs,
// until Unblock or context cancellation. A cancelled wait fails the
// recipient with ctx.Err(), as a real target reports an attempt cut off
// by its caller; other recipients go on.
func (t *FakeTarget) BlockRcpt(rcpt string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.rcptGate == nil {
		t.rcptGate = make(chan struct{})
	}
	t.gatedRcpt = rcpt
}

// Unblock releases every waiting attempt and disables all gates.
func (t *FakeTarget) Unblock() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.rcptGate != nil {
		close(t.rcptGate)
		t.rcptGate = nil
	}
	if t.startGate != nil {
		close(t.startGate)
		t.startGate = nil
	}
	if t.bodyGate != nil {
		close(t.bodyGate)
		t.bodyGate = nil
	}
}

// Attempts returns the number of Start calls so far.
func (t *FakeTarget) Attempts() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.attempts
}

// InFlight returns the number of attempts started but not yet finished by
// a failed Start, Commit or Abort.
func (t *FakeTarget) InFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.inFlight
}

// MaxConcurrent returns the largest InFlight value ever observed, for
// checking parallelism limits.
func (t *FakeTarget) MaxConcurrent() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.maxInFlight
}

// Blocked returns the number of attempts currently waiting at a gate.
func (t *FakeTarget) Blocked() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.blocked
}

// Deliveries returns a copy of the committed messages in commit order.
func (t *FakeTarget) Deliveries() []Delivered {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.deliveriesLocked()
}

func (t *FakeTarget) deliveriesLocked() []Delivered {
	out := make([]Delivered, len(t.delivered))
	for i, d := range t.delivered {
		out[i] = d.clone()
	}
	return out
}

// CountDelivered returns how many committed messages include rcpt
// (case-insensitive); more than one for the same message means a
// duplicate delivery.
func (t *FakeTarget) CountDelivered(rcpt string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, d := range t.delivered {
		for _, r := range d.Rcpts {
			if strings.EqualFold(r, rcpt) {
				n++
			}
		}
	}
	return n
}

// Records returns a copy of every attempt's record in Start order.
func (t *FakeTarget) Records() []AttemptRecord {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]AttemptRecord, len(t.records))
	for i, r := range t.records {
		out[i] = r.clone()
	}
	return out
}

// ProtocolErrors lists misuses of the Delivery API by the caller (calls
// after Commit/Abort, Commit without a successful Body, duplicate
// recipients, ...). Tests should usually assert it is empty.
func (t *FakeTarget) ProtocolErrors() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.protoErrs...)
}

// WaitDelivered blocks until at least n messages were committed and
// returns all of them. On ctx expiry it returns what was delivered so far
// together with an error.
func (t *FakeTarget) WaitDelivered(ctx context.Context, n int) ([]Delivered, error) {
	err := waitUntil(ctx, &t.mu, &t.changed, func() bool { return len(t.delivered) >= n })
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		return t.deliveriesLocked(), fmt.Errorf("testutils: waiting for %d deliveries, have %d: %w", n, len(t.delivered), err)
	}
	return t.deliveriesLocked(), nil
}

// WaitStarted blocks until Start was called at least n times.
func (t *FakeTarget) WaitStarted(ctx context.Context, n int) error {
	err := waitUntil(ctx, &t.mu, &t.changed, func() bool { return t.attempts >= n })
	if err != nil {
		return fmt.Errorf("testutils: waiting for %d attempts, have %d: %w", n, t.Attempts(), err)
	}
	return nil
}

// WaitBlocked blocks until at least n attempts are parked at a gate (see
// Block and BlockBody).
func (t *FakeTarget) WaitBlocked(ctx context.Context, n int) error {
	err := waitUntil(ctx, &t.mu, &t.changed, func() bool { return t.blocked >= n })
	if err != nil {
		return fmt.Errorf("testutils: waiting for %d blocked attempts, have %d: %w", n, t.Blocked(), err)
	}
	return nil
}

// WaitIdle blocks until no attempt is in flight.
func (t *FakeTarget) WaitIdle(ctx context.Context) error {
	err := waitUntil(ctx, &t.mu, &t.changed, func() bool { return t.inFlight == 0 })
	if err != nil {
		return fmt.Errorf("testutils: waiting for idle, %d in flight: %w", t.InFlight(), err)
	}
	return nil
}

// protoErrLocked records a misuse and returns the error handed back to
// the caller. Such errors are unclassified, hence treated as temporary.
func (t *FakeTarget) protoErrLocked(attempt int, format string, args ...any) error {
	msg := fmt.Sprintf("attempt %d: ", attempt) + fmt.Sprintf(format, args...)
	t.protoErrs = append(t.protoErrs, msg)
	t.changed.broadcast()
	return errors.New("testutils: fake target: " + msg)
}

// fakeDelivery is the plain module.Delivery; it must not grow a
// BodyNonAtomic method (see fakePartialDelivery).
type fakeDelivery struct {
	t       *FakeTarget
	attempt int
	sc      targetScript

	// Guarded by t.mu.
	rec        *AttemptRecord
	accepted   []*acceptedRcpt
	bodyCalled bool
	bodyOK     bool
	finished   bool
}

type acceptedRcpt struct {
	rcpt    string
	opts    smtp.RcptOptions
	bodyErr error // scripted, withheld until body time
	status  error // body-time outcome
}

// fakePartialDelivery adds module.PartialDelivery on top of fakeDelivery.
type fakePartialDelivery struct {
	*fakeDelivery
}

func (d *fakeDelivery) AddRcpt(ctx context.Context, rcptTo string, opts smtp.RcptOptions) error {
	t := d.t
	t.mu.Lock()
	switch {
	case d.finished:
		err := t.protoErrLocked(d.attempt, "AddRcpt(%q) after Commit/Abort", rcptTo)
		t.mu.Unlock()
		return err
	case d.bodyCalled:
		err := t.protoErrLocked(d.attempt, "AddRcpt(%q) after Body", rcptTo)
		t.mu.Unlock()
		return err
	}
	for _, a := range d.accepted {
		if a.rcpt == rcptTo {
			t.protoErrLocked(d.attempt, "duplicate AddRcpt(%q)", rcptTo)
			d.rec.Rcpts = append(d.rec.Rcpts, RcptRecord{Rcpt: rcptTo, Opts: cloneRcptOpts(opts)})
			t.mu.Unlock()
			return nil
		}
	}
	gated := rcptTo == t.gatedRcpt
	t.mu.Unlock()

	// The script runs unlocked: it is user code and may be slow or call
	// back into t.
	var err error
	if gated {
		err = t.hold(ctx, gateRcpt)
	}
	if d.sc.rcpt != nil && err == nil {
		err = d.sc.rcpt(d.attempt, rcptTo)
	}

	rr := RcptRecord{Rcpt: rcptTo, Opts: cloneRcptOpts(opts)}
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil && d.sc.failAt == FailAtAddRcpt {
		rr.Err = err
	} else {
		rr.BodyErr = err
		d.accepted = append(d.accepted, &acceptedRcpt{rcpt: rcptTo, opts: cloneRcptOpts(opts), bodyErr: err})
	}
	d.rec.Rcpts = append(d.rec.Rcpts, rr)
	t.changed.broadcast()
	return rr.Err
}

// beginBody validates the call order and marks the body as started.
func (d *fakeDelivery) beginBody(method string) error {
	t := d.t
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case d.finished:
		return t.protoErrLocked(d.attempt, "%s after Commit/Abort", method)
	case d.bodyCalled:
		return t.protoErrLocked(d.attempt, "%s called twice", method)
	}
	d.bodyCalled = true
	d.rec.BodyCalled = true
	return nil
}

// readBody waits at the body gate, reads the buffer, records it and
// evaluates the whole-body script. The returned error applies to every
// recipient.
func (d *fakeDelivery) readBody(ctx context.Context, header textproto.Header, body buffer.Buffer) error {
	if err := d.t.hold(ctx, gateBody); err != nil {
		return err
	}

	var data []byte
	rc, err := body.Open()
	if err == nil {
		data, err = io.ReadAll(rc)
		if cerr := rc.Close(); err == nil {
			err = cerr
		}
	}

	d.t.mu.Lock()
	d.rec.Header = header.Copy()
	d.rec.Body = data
	d.t.mu.Unlock()

	if err != nil {
		return fmt.Errorf("testutils: fake target: reading body: %w", err)
	}
	if d.sc.body != nil {
		return d.sc.body(d.attempt)
	}
	return nil
}

func (d *fakeDelivery) Body(ctx context.Context, header textproto.Header, body buffer.Buffer) error {
	if err := d.beginBody("Body"); err != nil {
		return err
	}
	whole := d.readBody(ctx, header, body)

	t := d.t
	t.mu.Lock()
	defer t.mu.Unlock()
	err := whole
	if err == nil {
		// Without PartialDelivery a single recipient's body failure can
		// only be reported by failing the message for everybody.
		for _, a := range d.accepted {
			if a.bodyErr != nil {
				err = a.bodyErr
				break
			}
		}
	}
	d.rec.BodyErr = err
	d.rec.Status = make(map[string]error, len(d.accepted))
	for _, a := range d.accepted {
		a.status = err
		d.rec.Status[a.rcpt] = err
	}
	d.bodyOK = err == nil
	t.changed.broadcast()
	return err
}

func (d *fakePartialDelivery) BodyNonAtomic(ctx context.Context, c module.StatusCollector, header textproto.Header, body buffer.Buffer) {
	t := d.t
	if err := d.beginBody("BodyNonAtomic"); err != nil {
		t.mu.Lock()
		rcpts := make([]string, len(d.accepted))
		for i, a := range d.accepted {
			rcpts[i] = a.rcpt
		}
		t.mu.Unlock()
		for _, r := range rcpts {
			c.SetStatus(r, err)
		}
		return
	}
	whole := d.readBody(ctx, header, body)

	type result struct {
		rcpt string
		err  error
	}
	t.mu.Lock()
	results := make([]result, 0, len(d.accepted))
	d.rec.BodyErr = whole
	d.rec.Status = make(map[string]error, len(d.accepted))
	for _, a := range d.accepted {
		a.status = whole
		if a.status == nil {
			a.status = a.bodyErr
		}
		d.rec.Status[a.rcpt] = a.status
		results = append(results, result{a.rcpt, a.status})
	}
	// Commit is legitimate after BodyNonAtomic whatever the statuses; it
	// just delivers to the recipients that succeeded.
	d.bodyOK = true
	omit := d.sc.omitSuccessStatus
	t.changed.broadcast()
	t.mu.Unlock()

	// The collector is the caller's code: call it without our lock.
	for _, r := range results {
		if r.err == nil && omit {
			continue
		}
		c.SetStatus(r.rcpt, r.err)
	}
}

func (d *fakeDelivery) Commit(ctx context.Context) error {
	t := d.t
	t.mu.Lock()
	switch {
	case d.finished:
		err := t.protoErrLocked(d.attempt, "Commit after Commit/Abort")
		t.mu.Unlock()
		return err
	case !d.bodyCalled:
		err := t.protoErrLocked(d.attempt, "Commit before Body")
		t.mu.Unlock()
		return err
	case !d.bodyOK:
		err := t.protoErrLocked(d.attempt, "Commit after failed Body")
		t.mu.Unlock()
		return err
	}
	t.mu.Unlock()

	var err error
	if d.sc.commit != nil {
		err = d.sc.commit(d.attempt)
	}

	t.mu.Lock()
	defer t.mu.Unlock()
	if d.finished {
		// Raced with a concurrent Commit/Abort on the same delivery.
		return t.protoErrLocked(d.attempt, "concurrent Commit/Abort")
	}
	d.finished = true
	t.inFlight--
	d.rec.CommitErr = err
	d.rec.Committed = err == nil
	if err == nil {
		del := Delivered{
			Attempt:  d.attempt,
			MsgMeta:  d.rec.MsgMeta,
			From:     d.rec.From,
			RcptOpts: make(map[string]smtp.RcptOptions),
			Header:   d.rec.Header,
			Body:     d.rec.Body,
		}
		for _, a := range d.accepted {
			if a.status == nil {
				del.Rcpts = append(del.Rcpts, a.rcpt)
				del.RcptOpts[a.rcpt] = a.opts
			}
		}
		// A commit with nobody left to deliver to delivers nothing.
		if len(del.Rcpts) > 0 {
			t.delivered = append(t.delivered, del)
		}
	}
	t.changed.broadcast()
	return err
}

func (d *fakeDelivery) Abort(ctx context.Context) error {
	t := d.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if d.finished {
		// Aborting after a failed Commit is harmless cleanup; anything
		// else means the caller lost track of the delivery.
		if !(d.rec.CommitErr != nil && !d.rec.Aborted) {
			t.protoErrLocked(d.attempt, "Abort after Commit/Abort")
		}
		d.rec.Aborted = true
		return nil
	}
	d.finished = true
	d.rec.Aborted = true
	t.inFlight--
	t.changed.broadcast()
	return nil
}

func cloneRcptOpts(o smtp.RcptOptions) smtp.RcptOptions {
	o.Notify = append([]smtp.DSNNotify(nil), o.Notify...)
	return o
}

// cloneMeta copies msgMeta so later mutation by the caller does not alter
// the record. ConnState.ModData is not copied (it holds a lock and opaque
// values).
func cloneMeta(m *module.MsgMetadata) *module.MsgMetadata {
	if m == nil {
		return nil
	}
	c := m.DeepCopy()
	c.OriginalRcpts = maps.Clone(m.OriginalRcpts)
	if m.SMTPOpts.Auth != nil {
		a := *m.SMTPOpts.Auth
		c.SMTPOpts.Auth = &a
	}
	if m.Conn != nil {
		c.Conn = &module.ConnState{
			Proto:        m.Conn.Proto,
			Hostname:     m.Conn.Hostname,
			LocalAddr:    m.Conn.LocalAddr,
			RemoteAddr:   m.Conn.RemoteAddr,
			TLS:          m.Conn.TLS,
			RDNSName:     m.Conn.RDNSName,
			AuthUser:     m.Conn.AuthUser,
			AuthPassword: m.Conn.AuthPassword,
		}
	}
	return c
}

func (d Delivered) clone() Delivered {
	d.MsgMeta = cloneMeta(d.MsgMeta)
	d.Rcpts = append([]string(nil), d.Rcpts...)
	opts := make(map[string]smtp.RcptOptions, len(d.RcptOpts))
	for k, v := range d.RcptOpts {
		opts[k] = cloneRcptOpts(v)
	}
	d.RcptOpts = opts
	d.Header = d.Header.Copy()
	d.Body = append([]byte(nil), d.Body...)
	return d
}

func (r *AttemptRecord) clone() AttemptRecord {
	c := *r
	c.MsgMeta = cloneMeta(r.MsgMeta)
	c.Rcpts = make([]RcptRecord, len(r.Rcpts))
	for i, rr := range r.Rcpts {
		rr.Opts = cloneRcptOpts(rr.Opts)
		c.Rcpts[i] = rr
	}
	c.Header = r.Header.Copy()
	c.Body = append([]byte(nil), r.Body...)
	c.Status = maps.Clone(r.Status)
	return c
}
