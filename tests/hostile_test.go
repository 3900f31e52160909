//go:build linux

package tests

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/testutils"
)

// oddRcpts are valid but unusual envelope addresses; the sink rejects each
// with its own hostile reply once released.
var oddRcpts = []string{
	"user+tag@remote.test",
	"o'brien@remote.test",
	`"john doe"@remote.test`,
	`"Bcc: victim@evil.test"@remote.test`,
	`"quoted\"escape"@remote.test`,
	"x=y&z!#$%*/?^{|}~@remote.test",
	strings.Repeat("l", 64) + "@" + strings.Repeat("sub.", 20) + "remote.test",
}

// hostileText is 100 KB of reply text in 100 lines: maddy's SMTP client
// (go-smtp) refuses reply lines over 2000 octets, so longer text only
// arrives as a multi-line reply.
var hostileText = strings.TrimSuffix(strings.Repeat(strings.Repeat("enormous error text ", 50)+"\n", 100), "\n")

// oddReply is the permanent reply the sink gives odd recipient i: line
// breaks (LF and CRLF, sent as a multi-line reply), non-ASCII, 100 KB.
func oddReply(i int) *smtp.SMTPError {
	texts := []string{
		"no such user\r\nBcc: injected@evil.test\r\nSubject: injected",
		"Почтовый ящик переполнен ✉ — boîte pleine",
		hostileText,
		"line one\nline two\n\nline four after an empty one",
		"tab\there and a NUL-free control \x01 char",
		"mixed ✉\r\n" + strings.Repeat("ü", 800), // within the client's 2000-octet line limit,
		"plain rejection",
	}
	return testutils.SinkReply(550, [3]int{5, 1, 1}, texts[i%len(texts)])
}

// checkDSNShape checks what every DSN must satisfy however hostile its
// inputs: lines of at most 998 octets, a 7-bit delivery-status part unless
// it is the global type, no header injected at the top level.
func checkDSNShape(t *testing.T, data []byte, r *dsnReport) {
	t.Helper()
	for i, l := range bytes.Split(data, []byte("\r\n")) {
		if len(l) > 998 {
			t.Errorf("DSN line %d is %d octets long (limit 998): %.80q...", i+1, len(l), l)
		}
		if bytes.ContainsRune(l, '\n') || bytes.ContainsRune(l, '\r') {
			t.Errorf("DSN line %d has a bare line break: %.80q", i+1, l)
		}
	}
	for _, k := range []string{"Bcc", "Cc", "Subject"} {
		if v := r.Header.Get(k); k != "Subject" && v != "" || strings.Contains(strings.ToLower(v), "injected") {
			t.Errorf("DSN header %s: %q", k, v)
		}
	}
	global := false
	for _, p := range r.Parts {
		global = global || strings.HasPrefix(p, "message/global")
	}
	if !global {
		mime := bytes.Index(data, []byte("message/delivery-status"))
		if mime >= 0 && !isASCIIBytes(data[mime:]) {
			// The returned header part may be 8-bit only if the original
			// was; our originals are ASCII.
			t.Errorf("7-bit DSN holds non-ASCII octets after its delivery-status part")
		}
	}
}

func isASCIIBytes(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

// finalRecipient returns the address of a per-recipient block.
func finalRecipient(h map[string][]string) string {
	v := ""
	if l := h["Final-Recipient"]; len(l) > 0 {
		v = l[0]
	}
	return strings.TrimSpace(v[strings.IndexByte(v, ';')+1:])
}

// pythonParseDSN parses data with Python's email package (an independent
// parser) and returns the defects it found and the parts' content types.
// ok is false when python3 is missing.
func pythonParseDSN(t *testing.T, data []byte) (defects []string, types []string, ok bool) {
	t.Helper()
	py, err := exec.LookPath("python3")
	if err != nil {
		return nil, nil, false
	}
	const script = `
import email, email.policy, json, sys
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)
defects, types = [], []
for part in msg.walk():
    types.append(part.get_content_type())
    defects += [type(d).__name__ + ": " + str(d) for d in part.defects]
    for k, v in part.items():
        defects += [k + ": " + type(d).__name__ for d in getattr(v, "defects", ())]
json.dump({"defects": defects, "types": types}, sys.stdout)
`
	cmd := exec.Command(py, "-c", script)
	cmd.Stdin = bytes.NewReader(data)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("python3 email parser: %v", err)
	}
	var res struct {
		Defects []string `json:"defects"`
		Types   []string `json:"types"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("python3 output %q: %v", out, err)
	}
	return res.Defects, res.Types, true
}

// rssSampler records the largest VmRSS of a process seen while it runs.
type rssSampler struct {
	stop chan struct{}
	done chan struct{}
	max  atomic.Int64
}

func sampleRSS(pid int) *rssSampler {
	s := &rssSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			if kb, err := procStatusKB(pid, "VmRSS"); err == nil && kb > s.max.Load() {
				s.max.Store(kb)
			}
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

func (s *rssSampler) finish() int64 {
	close(s.stop)
	<-s.done
	return s.max.Load()
}

// listedMessage is the part of `maddy spool list --json` output the test
// looks at.
type listedMessage struct {
	ID      string `json:"id"`
	MsgID   string `json:"msg_id"`
	Size    int64  `json:"size"`
	Rcpts   int    `json:"rcpts"`
	Pending []struct {
		Addr      string `json:"addr"`
		LastError string `json:"last_error"`
	} `json:"pending"`
}

// TestHostileInput queues a message to odd but valid addresses whose
// rejections carry line breaks, non-ASCII and 100 KB of text, a message with
// 1000 recipients, and a 50 MB message. `maddy spool list --json` must stay
// valid JSON while they are queued, every DSN must be well-formed (Go's
// net/mail and mime/multipart, and Python's email package when present),
// and the server's RSS must not grow by anything near the 50 MB.
func TestHostileInput(t *testing.T) {
	t.Parallel()
	const (
		from      = "sender@origin.test"
		bulkCount = 1000
		bigSize   = 50 << 20
		bigOK     = "big@remote.test"
		bigReject = "big-reject@remote.test"
	)
	var holding atomic.Bool
	holding.Store(true)
	// go-smtp servers (maddy's endpoint and the sink) unquote a quoted
	// local part, so that is the form the sink sees and counts.
	odd := make(map[string]int)
	for i, r := range oddRcpts {
		odd[strings.ToLower(unquoteLocal(r))] = i
	}
	script := func(stage, _, rcpt string, _ int) *smtp.SMTPError {
		if stage != testutils.StageRCPT || strings.EqualFold(rcpt, from) {
			return nil
		}
		lrcpt := strings.ToLower(rcpt)
		i, isOdd := odd[lrcpt]
		if holding.Load() {
			if isOdd {
				return testutils.SinkReply(451, [3]int{4, 2, 2}, "held ✉ Почтовый ящик\r\n"+hostileText)
			}
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "held by sink ✉\nsecond line")
		}
		switch {
		case isOdd:
			return oddReply(i)
		case lrcpt == bigReject:
			return testutils.SinkReply(550, [3]int{5, 2, 2}, "too big ✉\n"+hostileText)
		case strings.HasPrefix(lrcpt, "bulk"):
			if n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(lrcpt, "bulk"), "@remote.test")); n%10 == 0 {
				return testutils.SinkReply(550, [3]int{5, 1, 1}, fmt.Sprintf("bulk %d rejected ✉\nsecond line", n))
			}
		}
		return nil
	}
	sink := newSink(t, testutils.WithScript(script))
	e := newEnv(t, sink, func(p *params) { p.MaxTries = "100" })
	// The endpoint's limits: 32 MiB messages and 20000 recipients by default.
	// The exit status is not checked: a SIGTERM this soon after start-up
	// can arrive before maddy installs its signal handler.
	e.srv.stop()
	patchConfig(t, e.cfg, smtpEndpointBlock, "    max_message_size 64M\n    max_recipients "+strconv.Itoa(bulkCount)+"\n"+smtpEndpointBlock)
	e.restart()
	pid := e.srv.cmd.Process.Pid

	// The 50 MB message first, measured against the fresh server's RSS.
	rssBefore, err := procStatusKB(pid, "VmRSS")
	if err != nil {
		t.Fatal(err)
	}
	sampler := sampleRSS(pid)
	bigID := msgID(t, 3)
	var big bytes.Buffer
	line := []byte("0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 012345\r\n")
	for big.Len() < bigSize {
		big.Write(line)
	}
	bigRcpts := []string{bigOK, bigReject}
	bigMsg := newMessage(from, bigRcpts, bigID, big.String())
	bigSum := sha256.Sum256(bigMsg[bytes.Index(bigMsg, []byte("\r\n\r\n"))+4:])
	big = bytes.Buffer{}
	if res := submitTx(e.smtpAddr(), from, bigRcpts, bigMsg, 2*waitTimeout); !res.Accepted {
		t.Fatalf("50 MB message: %s: %v", res.Stage, res.Err)
	}
	bigMsg = nil

	oddID := msgID(t, 1)
	if res := submitTx(e.smtpAddr(), from, oddRcpts, newMessage(from, []string{"undisclosed@remote.test"}, oddID, testBody(oddID)), waitTimeout); !res.Accepted {
		t.Fatalf("odd recipients: %s: %v", res.Stage, res.Err)
	}
	bulkID := msgID(t, 2)
	bulk := make([]string, bulkCount)
	for i := range bulk {
		bulk[i] = fmt.Sprintf("bulk%04d@remote.test", i)
	}
	if res := submitTx(e.smtpAddr(), from, bulk, newMessage(from, []string{"list@remote.test"}, bulkID, testBody(bulkID)), waitTimeout); !res.Accepted {
		t.Fatalf("%d recipients: %s: %v", bulkCount, res.Stage, res.Err)
	}

	// While all three are queued with hostile deferral texts, the admin
	// output stays valid JSON and round-trips the addresses and texts.
	e.waitMetric("maddy_spool_messages_queued", eq(3))
	ctxRcpt := oddRcpts[0]
	eventually(t, waitTimeout, func() bool {
		return sink.RcptAttempts(ctxRcpt) >= 1 && sink.RcptAttempts(bigOK) >= 1 && sink.RcptAttempts(bulk[bulkCount-1]) >= 1
	})
	var listed []listedMessage
	var out []byte
	eventually(t, waitTimeout, func() bool {
		out, err = exec.Command(maddyBin, "--config", e.cfg, "spool", "list", "--json").Output()
		if err != nil {
			t.Fatalf("maddy spool list --json: %v", err)
		}
		listed = nil
		for i, l := range bytes.Split(bytes.TrimSpace(out), []byte("\n")) {
			if !json.Valid(l) || !utf8.Valid(l) {
				t.Fatalf("spool list --json line %d is not valid JSON: %.200q", i+1, l)
			}
			var m listedMessage
			if err := json.Unmarshal(l, &m); err != nil {
				t.Fatalf("spool list --json line %d: %v", i+1, err)
			}
			listed = append(listed, m)
		}
		// Wait until the deferral of the odd recipients is recorded.
		for _, m := range listed {
			if m.Rcpts == len(oddRcpts) {
				for _, p := range m.Pending {
					if p.LastError != "" {
						return true
					}
				}
			}
		}
		return false
	})
	t.Logf("spool list --json: %d lines, %d bytes", len(listed), len(out))
	// msg_id is maddy's internal ID; tell the three apart by shape.
	var bulkListed, bigListed, oddListed listedMessage
	for _, m := range listed {
		switch {
		case m.Size >= bigSize:
			bigListed = m
		case m.Rcpts == bulkCount:
			bulkListed = m
		case m.Rcpts == len(oddRcpts):
			oddListed = m
		}
	}
	if len(listed) != 3 || bigListed.ID == "" || bulkListed.ID == "" || oddListed.ID == "" {
		t.Errorf("spool list: want the 50 MB, the %d-recipient and the odd-recipient message, got %d lines:\n%.2000s", bulkCount, len(listed), out)
	}
	if len(bulkListed.Pending) != bulkCount {
		t.Errorf("spool list: the %d-recipient message lists %d pending recipients", bulkCount, len(bulkListed.Pending))
	}
	addrs := make(map[string]string)
	for _, p := range oddListed.Pending {
		addrs[p.Addr] = p.LastError
	}
	for _, r := range oddRcpts {
		if needsQuoting(r) {
			// maddy's endpoint unquotes the local part and its SMTP client
			// sends it bare, which the sink rejects as a syntax error
			// (501): these fail for good on the first try.
			continue
		}
		le, ok := addrs[r]
		if !ok {
			t.Errorf("spool list: pending recipient %q missing; have %q", r, keys(addrs))
			continue
		}
		if le != "" && !strings.Contains(le, "Почтовый ящик") {
			t.Errorf("spool list: last error of %q lost its non-ASCII text: %.120q", r, le)
		}
	}

	// Release: every recipient is now delivered or rejected for good.
	holding.Store(false)
	wantFailed := map[string]bool{strings.ToLower(bigReject): true}
	for _, r := range oddRcpts {
		wantFailed[strings.ToLower(unquoteLocal(r))] = true
	}
	var bulkOK []string
	for i, r := range bulk {
		if i%10 == 0 {
			wantFailed[r] = true
		} else {
			bulkOK = append(bulkOK, r)
		}
	}
	msgs := waitSink(t, sink, "every delivery and DSN", func(msgs []testutils.Message) bool {
		if !delivered(msgs, []string{bigID}, []string{bigOK}) || !delivered(msgs, []string{bulkID}, bulkOK) {
			return false
		}
		failed, _, err := dsnFailures(msgs)
		if err != nil {
			t.Fatal(err)
		}
		for r := range wantFailed {
			if failed[r] == 0 {
				return false
			}
		}
		return true
	})
	e.waitMetric("maddy_spool_messages_queued", eq(0))
	rssMax := sampler.finish()
	hwm, err := procStatusKB(pid, "VmHWM")
	if err != nil {
		t.Fatal(err)
	}
	growth := max(rssMax, hwm) - rssBefore
	t.Logf("RSS: %d KiB before the 50 MB message, peak %d KiB sampled, VmHWM %d KiB: growth %.1f MiB",
		rssBefore, rssMax, hwm, float64(growth)/1024)
	if growth > 24<<10 {
		t.Errorf("RSS grew by %.1f MiB while a 50 MB message was queued and delivered; it should be streamed", float64(growth)/1024)
	}

	for _, m := range sink.FindByMessageID(bigID) {
		body := m.Data[bytes.Index(m.Data, []byte("\r\n\r\n"))+4:]
		if sha256.Sum256(body) != bigSum {
			t.Errorf("the 50 MB body arrived changed (%d bytes)", len(body))
		}
	}

	// Every DSN is well-formed and names exactly the rejected recipients.
	named := make(map[string]int)
	var once sync.Once
	for _, m := range dsns(msgs) {
		r, err := parseDSN(m.Data)
		if err != nil {
			t.Errorf("DSN %s does not parse: %v", m.MessageID(), err)
			continue
		}
		checkDSNShape(t, m.Data, r)
		if len(m.Data) > 1<<20 {
			t.Errorf("DSN %s is %d bytes; it should carry headers, not the 50 MB body", m.MessageID(), len(m.Data))
		}
		for _, h := range r.Recipients {
			named[strings.ToLower(finalRecipient(h))]++
			if d := h.Get("Diagnostic-Code"); d == "" {
				t.Errorf("DSN %s: recipient %s has no Diagnostic-Code", m.MessageID(), finalRecipient(h))
			}
		}
		defects, types, ok := pythonParseDSN(t, m.Data)
		if !ok {
			once.Do(func() { t.Log("python3 not found: DSNs checked with Go's parsers only") })
			continue
		}
		if len(defects) > 0 {
			t.Errorf("DSN %s: Python's email package found defects: %q", m.MessageID(), defects)
		}
		if len(types) < 3 || types[0] != "multipart/report" {
			t.Errorf("DSN %s: Python sees parts %q", m.MessageID(), types)
		}
	}
	for r := range wantFailed {
		if named[r] != 1 {
			t.Errorf("rejected recipient %q named in %d DSNs, want 1", r, named[r])
		}
	}
	for r, n := range named {
		if !wantFailed[r] {
			t.Errorf("DSN names %q (%d times), which was not rejected", r, n)
		}
	}
	t.Logf("%d DSNs naming %d rejected recipients; the odd-recipient DSN is %d bytes",
		len(dsns(msgs)), len(named), dsnSizeFor(msgs, oddRcpts[0]))
	if e.srv.exited() {
		t.Fatalf("server exited: %v", e.srv.exitErr)
	}
}

// unquoteLocal undoes the quoting of a quoted-string local part the way
// go-smtp's server does.
func unquoteLocal(addr string) string {
	if !strings.HasPrefix(addr, `"`) {
		return addr
	}
	var b strings.Builder
	for i := 1; i < len(addr); i++ {
		switch c := addr[i]; c {
		case '\\':
			i++
			b.WriteByte(addr[i])
		case '"':
			return b.String() + addr[i+1:]
		default:
			b.WriteByte(c)
		}
	}
	return addr
}

func needsQuoting(addr string) bool { return strings.HasPrefix(addr, `"`) }

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// dsnSizeFor returns the size of the DSN naming rcpt, or 0.
func dsnSizeFor(msgs []testutils.Message, rcpt string) int {
	for _, m := range dsns(msgs) {
		if r, err := parseDSN(m.Data); err == nil {
			for _, h := range r.Recipients {
				if strings.EqualFold(finalRecipient(h), rcpt) {
					return len(m.Data)
				}
			}
		}
	}
	return 0
}
