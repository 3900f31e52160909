package testutils

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
)

// Stages passed to a SinkScript.
const (
	StageMAIL = "MAIL"
	StageRCPT = "RCPT"
	StageDATA = "DATA"
)

// SinkScript decides the SMTPSink's reply at one stage of a transaction; nil
// accepts.
//
//   - "MAIL": rcpt is empty; attempt counts MAIL commands with this sender.
//   - "RCPT": attempt counts RCPT commands for this recipient.
//   - "DATA": called once per accepted recipient after the body was read;
//     attempt counts DATA stages this recipient took part in. Over SMTP the
//     first non-nil reply answers the whole transaction; over LMTP each
//     recipient gets its own reply.
//
// Counts are 1-based, kept for the sink's lifetime, and compare addresses
// case-insensitively.
//
// A line break (LF, CRLF or CR) in a reply's Message makes it a multi-line
// reply, each line carrying the code and enhanced code.
type SinkScript func(stage, from, rcpt string, attempt int) *smtp.SMTPError

// SinkReply is shorthand for building a reply in scripts.
func SinkReply(code int, enh [3]int, msg string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode(enh), Message: msg}
}

// SinkRcptReplies returns a script giving fixed RCPT replies to the listed
// recipients (case-insensitive) and accepting everything else.
func SinkRcptReplies(replies map[string]*smtp.SMTPError) SinkScript {
	m := make(map[string]*smtp.SMTPError, len(replies))
	for k, v := range replies {
		m[strings.ToLower(k)] = v
	}
	return func(stage, _, rcpt string, _ int) *smtp.SMTPError {
		if stage != StageRCPT {
			return nil
		}
		return m[strings.ToLower(rcpt)]
	}
}

// SinkDeferFirst returns a script answering 451 4.4.1 to the first n RCPT
// commands for each listed recipient (every recipient if none are listed)
// and accepting afterwards, like a greylisting server.
func SinkDeferFirst(n int, rcpts ...string) SinkScript {
	var only map[string]bool
	if len(rcpts) > 0 {
		only = make(map[string]bool, len(rcpts))
		for _, r := range rcpts {
			only[strings.ToLower(r)] = true
		}
	}
	return func(stage, _, rcpt string, attempt int) *smtp.SMTPError {
		if stage != StageRCPT || attempt > n {
			return nil
		}
		if only != nil && !only[strings.ToLower(rcpt)] {
			return nil
		}
		return SinkReply(451, [3]int{4, 4, 1}, fmt.Sprintf("deferred by sink (attempt %d of %d)", attempt, n))
	}
}

// SinkChain combines scripts: the first non-nil reply wins. All scripts are
// evaluated.
func SinkChain(scripts ...SinkScript) SinkScript {
	scripts = append([]SinkScript(nil), scripts...)
	return func(stage, from, rcpt string, attempt int) *smtp.SMTPError {
		var first *smtp.SMTPError
		for _, s := range scripts {
			if s == nil {
				continue
			}
			if r := s(stage, from, rcpt, attempt); r != nil && first == nil {
				first = r
			}
		}
		return first
	}
}

// Message is one transaction accepted by an SMTPSink. Over LMTP Rcpts only
// holds the recipients whose DATA reply was a success.
type Message struct {
	From     string
	Rcpts    []string
	Data     []byte
	MailOpts smtp.MailOptions
	RcptOpts []smtp.RcptOptions // parallel to Rcpts
	Received time.Time
}

// Header parses the message header.
func (m *Message) Header() (textproto.Header, error) {
	return textproto.ReadHeader(bufio.NewReader(bytes.NewReader(m.Data)))
}

// MessageID returns the Message-ID header without angle brackets, or "" if
// there is none.
func (m *Message) MessageID() string {
	h, err := m.Header()
	if err != nil {
		return ""
	}
	return normalizeMsgID(h.Get("Message-Id"))
}

func normalizeMsgID(id string) string {
	id = strings.TrimSpace(id)
	id = strings.TrimPrefix(id, "<")
	id = strings.TrimSuffix(id, ">")
	return id
}

func (m Message) clone() Message {
	m.Rcpts = append([]string(nil), m.Rcpts...)
	opts := make([]smtp.RcptOptions, len(m.RcptOpts))
	for i, o := range m.RcptOpts {
		opts[i] = cloneRcptOpts(o)
	}
	m.RcptOpts = opts
	if m.MailOpts.Auth != nil {
		a := *m.MailOpts.Auth
		m.MailOpts.Auth = &a
	}
	return m
}

// Duplicate reports a (Message-ID, recipient) pair the sink accepted more
// than once.
type Duplicate struct {
	MessageID string
	Rcpt      string
	Count     int
}

// SinkOption configures StartSMTPSink and NewSMTPSink.
type SinkOption func(*sinkOptions)

type sinkOptions struct {
	addr      string
	script    SinkScript
	lmtp      bool
	onMessage func(*Message) error
	noRecord  bool
	errorLog  smtp.Logger
	debug     io.Writer
}

// WithListenAddr sets the listen address (default "127.0.0.1:0").
func WithListenAddr(addr string) SinkOption { return func(o *sinkOptions) { o.addr = addr } }

// WithScript sets the initial reply script (default: accept everything).
func WithScript(s SinkScript) SinkOption { return func(o *sinkOptions) { o.script = s } }

// WithLMTP makes the sink speak LMTP (LHLO, per-recipient DATA replies)
// over TCP instead of SMTP.
func WithLMTP(on bool) SinkOption { return func(o *sinkOptions) { o.lmtp = on } }

// WithOnMessage sets a hook called for every accepted message before the
// success reply is sent, so a message is durable in the hook's eyes before
// the client considers it delivered. A hook error turns the reply into
// 451 4.3.0 and the message is not recorded. The hook may run
// concurrently for different connections.
func WithOnMessage(fn func(*Message) error) SinkOption {
	return func(o *sinkOptions) { o.onMessage = fn }
}

// WithoutRecording stops the sink from keeping messages in memory
// (Messages stays empty; counters and duplicate detection still work).
// Meant for the long-running command.
func WithoutRecording() SinkOption { return func(o *sinkOptions) { o.noRecord = true } }

// WithErrorLog sets where go-smtp reports connection errors (default:
// discarded, or t.Logf for NewSMTPSink).
func WithErrorLog(l smtp.Logger) SinkOption { return func(o *sinkOptions) { o.errorLog = l } }

// WithDebug mirrors the raw protocol exchange to w.
func WithDebug(w io.Writer) SinkOption { return func(o *sinkOptions) { o.debug = w } }

// SMTPSink is an in-process SMTP/LMTP server that answers by script and
// records what it accepted. Create it with StartSMTPSink or NewSMTPSink.
type SMTPSink struct {
	srv       *smtp.Server
	ln        net.Listener
	lmtp      bool
	onMessage func(*Message) error
	record    bool
	log       *gatedLogger
	serveDone chan struct{}

	mu       sync.Mutex
	changed  notifier
	script   SinkScript
	counters map[string]int
	messages []Message
	accepted int
	perRcpt  map[[2]string]int // (Message-ID, lower(rcpt)) -> count
	// domainRules and domains are the per-domain behaviour and figures
	// (sinkdomains.go), keyed by lower-cased domain.
	domainRules map[string]DomainBehaviour
	domains     map[string]*DomainStats
	closed      bool
	// closing is closed by Close, ending the delays of DomainBehaviour.
	closing  chan struct{}
	draining bool
	active   int // session callbacks running
	inTx     int // sessions between MAIL and end of transaction
}

// StartSMTPSink starts a sink listening on 127.0.0.1 with a random port
// unless WithListenAddr says otherwise. Close it when done.
func StartSMTPSink(opts ...SinkOption) (*SMTPSink, error) {
	o := sinkOptions{addr: "127.0.0.1:0"}
	for _, opt := range opts {
		opt(&o)
	}

	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return nil, fmt.Errorf("testutils: sink listen: %w", err)
	}

	s := &SMTPSink{
		ln:        ln,
		lmtp:      o.lmtp,
		onMessage: o.onMessage,
		record:    !o.noRecord,
		log:       &gatedLogger{l: o.errorLog},
		serveDone: make(chan struct{}),
		script:    o.script,
		counters:  make(map[string]int),
		perRcpt:   make(map[[2]string]int),

		domainRules: make(map[string]DomainBehaviour),
		domains:     make(map[string]*DomainStats),
		closing:     make(chan struct{}),
	}

	srv := smtp.NewServer(smtp.BackendFunc(s.newSession))
	srv.Network = "tcp"
	srv.LMTP = o.lmtp
	srv.Domain = "localhost"
	srv.MaxMessageBytes = 64 << 20
	srv.MaxRecipients = 2000
	srv.AllowInsecureAuth = true
	srv.EnableSMTPUTF8 = true
	srv.EnableDSN = true
	srv.EnableBINARYMIME = true
	// REQUIRETLS is only advertised over TLS, which the sink does not
	// offer, but accepting the parameter costs nothing.
	srv.EnableREQUIRETLS = true
	srv.ErrorLog = s.log
	if o.debug != nil {
		srv.Debug = o.debug
	}
	s.srv = srv

	go func() {
		defer close(s.serveDone)
		_ = srv.Serve(multilineListener{ln})
	}()
	return s, nil
}

// NewSMTPSink starts a sink for a test, logs its connection errors via
// t.Logf, and closes it in t.Cleanup. It calls t.Fatal if it cannot start.
func NewSMTPSink(t testing.TB, opts ...SinkOption) *SMTPSink {
	t.Helper()
	opts = append([]SinkOption{WithErrorLog(tbLogger{t})}, opts...)
	s, err := StartSMTPSink(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// Addr returns the listening address, e.g. "127.0.0.1:34567".
func (s *SMTPSink) Addr() string { return s.ln.Addr().String() }

// Port returns the listening TCP port.
func (s *SMTPSink) Port() int {
	if a, ok := s.ln.Addr().(*net.TCPAddr); ok {
		return a.Port
	}
	return 0
}

// SetScript replaces the reply script; it takes effect for the next
// command of every connection.
func (s *SMTPSink) SetScript(script SinkScript) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.script = script
}

// Messages returns a copy of the recorded messages in acceptance order.
// Data is shared with the sink and must not be modified.
func (s *SMTPSink) Messages() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.messagesLocked()
}

func (s *SMTPSink) messagesLocked() []Message {
	out := make([]Message, len(s.messages))
	for i, m := range s.messages {
		out[i] = m.clone()
	}
	return out
}

// Accepted returns how many messages were accepted, recorded or not.
func (s *SMTPSink) Accepted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted
}

// WaitMessages blocks until at least n messages were accepted and returns
// the recorded ones. On ctx expiry it returns what it has with an error.
func (s *SMTPSink) WaitMessages(ctx context.Context, n int) ([]Message, error) {
	err := waitUntil(ctx, &s.mu, &s.changed, func() bool { return s.accepted >= n })
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		return s.messagesLocked(), fmt.Errorf("testutils: waiting for %d messages, have %d: %w", n, s.accepted, err)
	}
	return s.messagesLocked(), nil
}

// Attempts returns how many times stage ran for addr (the sender for
// "MAIL", the recipient otherwise); it is the attempt number the script
// last saw.
func (s *SMTPSink) Attempts(stage, addr string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counters[counterKey(stage, addr)]
}

// RcptAttempts is Attempts(StageRCPT, rcpt).
func (s *SMTPSink) RcptAttempts(rcpt string) int { return s.Attempts(StageRCPT, rcpt) }

// WaitRcptAttempts blocks until rcpt was offered in at least n RCPT
// commands, e.g. to see that a deferred recipient was retried.
func (s *SMTPSink) WaitRcptAttempts(ctx context.Context, rcpt string, n int) error {
	key := counterKey(StageRCPT, rcpt)
	err := waitUntil(ctx, &s.mu, &s.changed, func() bool { return s.counters[key] >= n })
	if err != nil {
		return fmt.Errorf("testutils: waiting for %d RCPT attempts for %s, have %d: %w", n, rcpt, s.RcptAttempts(rcpt), err)
	}
	return nil
}

// FindByMessageID returns the recorded messages whose Message-ID equals id
// (angle brackets optional).
func (s *SMTPSink) FindByMessageID(id string) []Message {
	id = normalizeMsgID(id)
	var out []Message
	for _, m := range s.Messages() {
		if m.MessageID() == id {
			out = append(out, m)
		}
	}
	return out
}

// DeliveryCount returns how many times the message with Message-ID id was
// accepted for rcpt. Anything above 1 is a duplicate delivery.
func (s *SMTPSink) DeliveryCount(id, rcpt string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.perRcpt[[2]string{normalizeMsgID(id), strings.ToLower(rcpt)}]
}

// Duplicates lists every (Message-ID, recipient) pair accepted more than
// once. Messages without a Message-ID are not tracked.
func (s *SMTPSink) Duplicates() []Duplicate {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Duplicate
	for k, n := range s.perRcpt {
		if n > 1 {
			out = append(out, Duplicate{MessageID: k[0], Rcpt: k[1], Count: n})
		}
	}
	return out
}

// Close stops the sink immediately, dropping open connections. It returns
// after every in-progress session callback (including OnMessage hooks) has
// finished, so nothing is recorded after Close returns.
func (s *SMTPSink) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.closing)
	s.changed.broadcast()
	s.mu.Unlock()

	err := s.srv.Close()
	// srv.Close only knows the listener once Serve has registered it, which
	// may not have happened yet; closing it ourselves ends Serve either way.
	_ = s.ln.Close()
	<-s.serveDone
	// Callbacks end promptly: their connections are closed, so body reads
	// fail. Only a blocking OnMessage hook could delay this.
	_ = waitUntil(context.Background(), &s.mu, &s.changed, func() bool { return s.active == 0 })
	s.log.stop()
	if errors.Is(err, smtp.ErrServerClosed) {
		err = nil
	}
	return err
}

// Shutdown stops the sink gracefully: new transactions get 421 4.3.2, the
// ones in progress may finish until ctx expires, then Close is called.
func (s *SMTPSink) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.draining = true
	s.changed.broadcast()
	s.mu.Unlock()

	werr := waitUntil(ctx, &s.mu, &s.changed, func() bool { return s.inTx == 0 })
	if err := s.Close(); err != nil {
		return err
	}
	return werr
}

var (
	errSinkClosed   = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "sink is closed"}
	errSinkDraining = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "sink is shutting down"}
)

func counterKey(stage, addr string) string {
	return stage + "\x00" + strings.ToLower(addr)
}

// enter registers a running callback so Close can wait for it.
func (s *SMTPSink) enter() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errSinkClosed
	}
	s.active++
	return nil
}

func (s *SMTPSink) leave() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.active--
	s.changed.broadcast()
}

// reply bumps the attempt counter and consults the script. The script runs
// unlocked because it is user code.
func (s *SMTPSink) reply(stage, from, rcpt string) *smtp.SMTPError {
	addr := rcpt
	if stage == StageMAIL {
		addr = from
	}
	key := counterKey(stage, addr)
	s.mu.Lock()
	s.counters[key]++
	attempt := s.counters[key]
	script := s.script
	s.changed.broadcast()
	s.mu.Unlock()
	if script == nil {
		return nil
	}
	return replyText(script(stage, from, rcpt, attempt))
}

// accept runs the hook and records m; a non-nil result is the reply for
// all of m's recipients.
func (s *SMTPSink) accept(m *Message) error {
	if s.onMessage != nil {
		if err := s.onMessage(m); err != nil {
			s.log.Printf("sink: OnMessage hook failed: %v", err)
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "sink could not store the message"}
		}
	}
	id := m.MessageID()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.accepted++
	s.countAcceptedLocked(m.Rcpts)
	if s.record {
		s.messages = append(s.messages, m.clone())
	}
	if id != "" {
		for _, r := range m.Rcpts {
			s.perRcpt[[2]string{id, strings.ToLower(r)}]++
		}
	}
	s.changed.broadcast()
	return nil
}

func (s *SMTPSink) newSession(*smtp.Conn) (smtp.Session, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	return &sinkSession{s: s}, nil
}

// sinkSession holds one connection's transaction. go-smtp calls a
// session's methods from a single goroutine, except Logout, which Close may
// call concurrently; hence the small lock.
type sinkSession struct {
	s *SMTPSink

	mu       sync.Mutex
	inTx     bool
	domains  []string // recipient domains of the transaction, once each
	from     string
	mailOpts smtp.MailOptions
	rcpts    []string
	rcptOpts []smtp.RcptOptions
}

var _ smtp.LMTPSession = (*sinkSession)(nil)

func (ss *sinkSession) endTx() {
	ss.leaveDomains()
	ss.mu.Lock()
	was := ss.inTx
	ss.inTx = false
	ss.from = ""
	ss.mailOpts = smtp.MailOptions{}
	ss.rcpts = nil
	ss.rcptOpts = nil
	ss.mu.Unlock()
	if was {
		ss.s.mu.Lock()
		ss.s.inTx--
		ss.s.changed.broadcast()
		ss.s.mu.Unlock()
	}
}

// leaveDomains ends the transaction's part in the per-domain figures. It
// runs before the reply to DATA is sent, rather than in endTx (after it),
// so a client that starts its next transaction as soon as it has the
// reply never sees two at once.
func (ss *sinkSession) leaveDomains() {
	ss.mu.Lock()
	domains := ss.domains
	ss.domains = nil
	ss.mu.Unlock()
	ss.s.domainsLeft(domains)
}

func (ss *sinkSession) Reset() { ss.endTx() }

func (ss *sinkSession) Logout() error {
	ss.endTx()
	return nil
}

func (ss *sinkSession) Mail(from string, opts *smtp.MailOptions) error {
	if err := ss.s.enter(); err != nil {
		return err
	}
	defer ss.s.leave()
	ss.endTx()

	// Checking draining and counting the transaction under one lock lets
	// Shutdown rely on inTx.
	ss.s.mu.Lock()
	if ss.s.draining {
		ss.s.mu.Unlock()
		return errSinkDraining
	}
	ss.s.inTx++
	ss.s.mu.Unlock()
	ss.mu.Lock()
	ss.inTx = true
	ss.mu.Unlock()

	if r := ss.s.reply(StageMAIL, from, ""); r != nil {
		ss.endTx()
		return r
	}

	ss.mu.Lock()
	ss.from = from
	if opts != nil {
		ss.mailOpts = *opts
		if opts.Auth != nil {
			a := *opts.Auth
			ss.mailOpts.Auth = &a
		}
	}
	ss.mu.Unlock()
	return nil
}

func (ss *sinkSession) Rcpt(to string, opts *smtp.RcptOptions) error {
	if err := ss.s.enter(); err != nil {
		return err
	}
	defer ss.s.leave()

	// A domain's transaction starts with its first RCPT; endTx ends it.
	// Registering under ss.mu keeps a concurrent endTx (Close calling
	// Logout) from missing it.
	domain := AddrDomain(to)
	ss.mu.Lock()
	from := ss.from
	newTx := ss.inTx && !slices.Contains(ss.domains, domain)
	if newTx {
		ss.domains = append(ss.domains, domain)
	}
	b := ss.s.rcptArrived(domain, newTx)
	ss.mu.Unlock()
	if err := ss.s.pause(b.RcptDelay); err != nil {
		return err
	}
	r := ss.s.reply(StageRCPT, from, to)
	if b.RcptReply != nil {
		r = replyText(b.RcptReply)
	}
	if r != nil {
		ss.s.rcptRefused(domain)
		return r
	}

	var o smtp.RcptOptions
	if opts != nil {
		o = cloneRcptOpts(*opts)
	}
	ss.mu.Lock()
	ss.rcpts = append(ss.rcpts, to)
	ss.rcptOpts = append(ss.rcptOpts, o)
	ss.mu.Unlock()
	return nil
}

// readTx snapshots the envelope, then reads the body. The snapshot comes
// first because with BDAT a concurrent RSET may clear the session while the
// body is still being read (the read then fails).
func (ss *sinkSession) readTx(r io.Reader) (*Message, error) {
	ss.mu.Lock()
	m := &Message{
		From:     ss.from,
		Rcpts:    append([]string(nil), ss.rcpts...),
		MailOpts: ss.mailOpts,
		RcptOpts: append([]smtp.RcptOptions(nil), ss.rcptOpts...),
	}
	ss.mu.Unlock()
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	m.Data = data
	m.Received = time.Now()
	return m, nil
}

func (ss *sinkSession) Data(r io.Reader) error {
	if err := ss.s.enter(); err != nil {
		return err
	}
	defer ss.s.leave()
	// The transaction ends in Reset, which go-smtp calls after it has
	// written the reply: ending it here would let Shutdown close the
	// connection before the client has its answer.

	m, err := ss.readTx(r)
	if err != nil {
		return err
	}
	delay, domainReplies := ss.s.dataBehaviour(m.Rcpts)
	if err := ss.s.pause(delay); err != nil {
		return err
	}
	// Ask about every recipient so DATA attempt counters stay meaningful,
	// then answer with the first objection.
	var first *smtp.SMTPError
	for i, rcpt := range m.Rcpts {
		rep := ss.s.reply(StageDATA, m.From, rcpt)
		if domainReplies[i] != nil {
			rep = replyText(domainReplies[i])
		}
		if rep != nil && first == nil {
			first = rep
		}
	}
	defer ss.leaveDomains()
	if first != nil {
		return first
	}
	return ss.s.accept(m)
}

func (ss *sinkSession) LMTPData(r io.Reader, status smtp.StatusCollector) error {
	if err := ss.s.enter(); err != nil {
		return err
	}
	defer ss.s.leave()
	// The transaction ends in Reset, which go-smtp calls after it has
	// written the reply: ending it here would let Shutdown close the
	// connection before the client has its answer.

	m, err := ss.readTx(r)
	if err != nil {
		return err
	}
	delay, domainReplies := ss.s.dataBehaviour(m.Rcpts)
	if err := ss.s.pause(delay); err != nil {
		return err
	}
	replies := make([]*smtp.SMTPError, len(m.Rcpts))
	ok := *m
	ok.Rcpts, ok.RcptOpts = nil, nil
	for i, rcpt := range m.Rcpts {
		replies[i] = ss.s.reply(StageDATA, m.From, rcpt)
		if domainReplies[i] != nil {
			replies[i] = replyText(domainReplies[i])
		}
		if replies[i] == nil {
			ok.Rcpts = append(ok.Rcpts, rcpt)
			ok.RcptOpts = append(ok.RcptOpts, m.RcptOpts[i])
		}
	}
	var acceptErr error
	if len(ok.Rcpts) > 0 {
		acceptErr = ss.s.accept(&ok)
	}
	ss.leaveDomains()
	// One SetStatus per RCPT, duplicates included, as go-smtp requires.
	for i, rcpt := range m.Rcpts {
		switch {
		case replies[i] != nil:
			status.SetStatus(rcpt, replies[i])
		default:
			status.SetStatus(rcpt, acceptErr)
		}
	}
	return nil
}

// gatedLogger forwards go-smtp's error log until the sink is closed, since
// go-smtp goroutines may still log after Close and t.Logf must not be used
// after a test ends.
type gatedLogger struct {
	mu      sync.Mutex
	l       smtp.Logger
	stopped bool
}

func (g *gatedLogger) stop() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.stopped = true
}

func (g *gatedLogger) Printf(format string, v ...interface{}) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.l != nil && !g.stopped {
		g.l.Printf(format, v...)
	}
}

func (g *gatedLogger) Println(v ...interface{}) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.l != nil && !g.stopped {
		g.l.Println(v...)
	}
}

// tbLogger adapts testing.TB to smtp.Logger.
type tbLogger struct{ t testing.TB }

func (l tbLogger) Printf(format string, v ...interface{}) { l.t.Logf(format, v...) }
func (l tbLogger) Println(v ...interface{})               { l.t.Log(v...) }
