// Package dsn generates delivery status notifications: RFC 3464 reports
// with RFC 3461 (SMTP DSN extension) semantics, packaged as an RFC 6522
// multipart/report, using the RFC 6533 internationalized forms when needed.
// It is a pure generator: no network or disk I/O; the returned original body
// is streamed, never held in memory whole.
//
// Generate writes the body and returns the top-level header. The output
// follows these rules:
//
//   - Line endings are CRLF everywhere, the returned original included
//     (bare LF and bare CR become CRLF while it is copied). Caller-supplied
//     text loses CR, LF and every other control character before it reaches
//     a header field or a report field.
//   - Top-level header, in this order: From, To, Subject, Date (RFC 5322
//     form with numeric zone), Message-ID, Auto-Submitted: auto-replied,
//     MIME-Version: 1.0, Content-Type: multipart/report;
//     report-type=delivery-status; boundary="..." (random, checked against
//     the content), Content-Transfer-Encoding (7bit, or 8bit when a part is
//     8bit). A non-ASCII display name is RFC 2047 Q-encoded unless the report
//     is internationalized (see below). Generated fields are folded at
//     spaces to 78 octets where possible.
//   - Parts, in order: text/plain; charset=utf-8 for people (7bit, or
//     quoted-printable when it has non-ASCII text; lines of at most 998
//     octets); message/delivery-status (7bit); the returned original.
//   - The delivery-status part holds the per-message fields
//     (Original-Envelope-Id iff an ENVID was given, xtext-decoded;
//     Reporting-MTA: dns; host; Received-From-MTA iff given; Arrival-Date
//     iff given), then for every recipient exactly one empty line and its
//     fields: Original-Recipient iff given, Final-Recipient, Action, Status,
//     Remote-MTA iff given, Diagnostic-Code: smtp; ... iff given,
//     Last-Attempt-Date iff given, Will-Retry-Until iff given and the action
//     is delayed. The part ends with the last field's CRLF: no empty trailing
//     group.
//   - Status must be class 2, 4 or 5 with 1-3 digit subject and detail;
//     anything else becomes 4.0.0 (delayed), 5.0.0 (failed) or 2.0.0
//     (delivered, relayed, expanded).
//   - Diagnostic-Code text is made one line (line breaks and control
//     characters become single spaces), bounded to 900 octets, and in a
//     7-bit part every non-ASCII character is replaced by "?".
//   - Address fields: "Original-Recipient: rfc822;addr" (the type from
//     ORCPT, lower-cased) and "Final-Recipient: rfc822; addr"; "utf-8"
//     instead of "rfc822" for non-ASCII addresses and ORCPT type utf-8.
//   - Returned content: with RET=HDRS (ReturnHeaders), or when no recipient
//     failed, text/rfc822-headers with the original header. With RET=FULL
//     (ReturnFull) and at least one failure, message/rfc822 with header and
//     body, unless they exceed MaxFullSize (default 10 MiB) or no body was
//     given: then the header only, and the text part says so. The returned
//     part is labelled 8bit when the header has 8-bit octets or the body is
//     not asserted 7-bit (Report.OriginalBody7Bit), 7bit otherwise; body
//     lines longer than 998 octets are broken.
//   - Internationalized reports (RFC 6533) are produced when the original
//     used SMTPUTF8 and an address (FinalRecipient, OriginalRecipient, To,
//     FromAddress) or an original header field is non-ASCII. They use
//     message/global-delivery-status (8bit), message/global-headers or
//     message/global, "utf-8" address types with raw UTF-8 for non-ASCII
//     addresses, raw UTF-8 Diagnostic-Code text, and raw UTF-8 display
//     names in the top-level header.
//   - In a 7-bit report a non-ASCII address is written with address type
//     "utf-8" in the utf-8-addr-xtext form of RFC 6533 section 3
//     (e.g. utf-8; j\x{F6}rg@example.org); raw 8-bit octets never appear
//     in the delivery-status part of a 7-bit report. A non-ASCII To or
//     FromAddress has no 7-bit form and is written raw in any report.
//
// Requirements tells the caller what the SMTP transport must offer
// (SMTPUTF8, BODY=8BITMIME) to send the report.
package dsn

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime/quotedprintable"
	"strings"
	"time"

	"github.com/emersion/go-message/textproto"
)

// Action is the action-value of a recipient's Action field (RFC 3464
// section 2.3.3).
type Action string

const (
	ActionFailed    Action = "failed"
	ActionDelayed   Action = "delayed"
	ActionDelivered Action = "delivered"
	ActionRelayed   Action = "relayed"
	ActionExpanded  Action = "expanded"
)

func (a Action) known() bool {
	switch a {
	case ActionFailed, ActionDelayed, ActionDelivered, ActionRelayed, ActionExpanded:
		return true
	}
	return false
}

// ReturnMode says what of the original message goes back to the sender
// (the RET parameter of RFC 3461).
type ReturnMode int

const (
	// ReturnHeaders returns the original header only, as
	// text/rfc822-headers (message/global-headers when internationalized).
	// It is the default when RET was absent.
	ReturnHeaders ReturnMode = iota
	// ReturnFull returns the whole original as message/rfc822
	// (message/global), or the header only when it is larger than
	// Report.MaxFullSize. Reports without a failed recipient always return
	// the header only.
	ReturnFull
)

// DefaultMaxFullSize is the size above which a ReturnFull report returns
// the original header only, when Report.MaxFullSize is 0.
const DefaultMaxFullSize = 10 << 20

// Recipient describes what happened to one recipient of the original
// message.
type Recipient struct {
	// OriginalRecipientType is the address type of the ORCPT parameter,
	// "rfc822" or "utf-8" in any letter case (go-smtp gives "RFC822" or
	// "UTF-8"). Empty with a non-empty OriginalRecipient means rfc822.
	OriginalRecipientType string
	// OriginalRecipient is the ORCPT address, already decoded from its
	// xtext (go-smtp decodes it). Empty: no Original-Recipient field.
	OriginalRecipient string
	// FinalRecipient is the recipient address as accepted. Required.
	FinalRecipient string
	// Action is what happened. Required; one of the Action constants.
	Action Action
	// Status is the RFC 3463 status code "x.y.z"; invalid or empty becomes
	// 4.0.0 (delayed), 5.0.0 (failed) or 2.0.0 (other actions).
	Status string
	// RemoteMTA is the host name of the MTA that answered; empty: omitted.
	RemoteMTA string
	// DiagnosticCode is the SMTP reply as text, e.g.
	// "550 5.1.1 No such user"; empty: omitted. It may span lines and
	// contain anything: it is cleaned and bounded.
	DiagnosticCode string
	// LastAttemptDate is the time of the last attempt; zero: omitted.
	LastAttemptDate time.Time
	// WillRetryUntil is when the delivery attempts will stop; written only
	// for ActionDelayed; zero: omitted.
	WillRetryUntil time.Time
	// Via says how the message was sent when it was not the usual way,
	// e.g. "fallback relay outbound_relay"; written as the extension field
	// X-Spool-Via (RFC 3464 section 3.3 allows X- fields) and in the text.
	// Empty: omitted.
	Via string
}

// Report is everything needed to generate one notification. All recipients
// given appear in the one report.
type Report struct {
	// ReportingMTA is our host name: "Reporting-MTA: dns; <host>". Required.
	ReportingMTA string
	// ReceivedFromMTA is the host the original came from; empty: omitted
	// (leave it empty when the sender asked not to be traced).
	ReceivedFromMTA string
	// EnvelopeID is the ENVID parameter as it appears on the wire, in
	// xtext; Original-Envelope-Id carries it decoded. Empty: omitted.
	// go-smtp hands servers the decoded value: re-encode it with
	// EncodeXtext. It must decode to printable ASCII.
	EnvelopeID string
	// ArrivalDate is when the original was received; zero: omitted.
	ArrivalDate time.Time
	// Recipients lists the recipients to report on; at least one.
	Recipients []Recipient

	// FromDisplayName is the display name of From, e.g. "Mail Delivery
	// System"; empty: the address alone.
	FromDisplayName string
	// FromAddress is the report's From address, e.g.
	// MAILER-DAEMON@example.org. Required.
	FromAddress string
	// To is the original sender, the address the report goes to. Required.
	To string
	// Date is the report's Date; zero: the current time.
	Date time.Time
	// MessageID is the report's Message-ID without angle brackets; empty:
	// a random one at the domain of FromAddress.
	MessageID string

	// SMTPUTF8 tells whether the original was sent with SMTPUTF8.
	SMTPUTF8 bool
	// OriginalHeader is the header of the original message.
	OriginalHeader textproto.Header
	// OriginalBody is the body of the original message, read only when the
	// full message is returned; nil: the body is not available.
	OriginalBody io.Reader
	// OriginalBodySize is the size of OriginalBody in octets, used to decide
	// whether the full message is returned. At most MaxFullSize octets of
	// original (header and body) are ever copied.
	OriginalBodySize int64
	// OriginalBody7Bit asserts that OriginalBody has only 7-bit data. Then
	// a returned message/rfc822 is labelled 7bit (and any 8-bit octet found
	// anyway is replaced by "?"); otherwise it is labelled 8bit.
	OriginalBody7Bit bool
	// Return is the RET parameter.
	Return ReturnMode
	// MaxFullSize bounds the returned original with ReturnFull; 0 means
	// DefaultMaxFullSize.
	MaxFullSize int64
}

// Requirements says what the SMTP transport must support to send a report.
type Requirements struct {
	// International is true when the report uses the RFC 6533 types.
	International bool
	// SMTPUTF8 is true when the top-level header has raw UTF-8 (a non-ASCII
	// From or To address or MessageID, or a non-ASCII display name in an
	// internationalized report): send with the SMTPUTF8 parameter. The
	// 8-bit parts of an internationalized report need only 8BITMIME.
	SMTPUTF8 bool
	// EightBitMIME is true when a part is labelled 8bit: send with
	// BODY=8BITMIME.
	EightBitMIME bool
}

// Requirements validates r like Generate and returns what sending the
// report Generate produces for r requires.
func (r *Report) Requirements() (Requirements, error) {
	p, err := prepare(r, time.Now)
	if err != nil {
		return Requirements{}, err
	}
	return Requirements{
		International: p.global,
		SMTPUTF8:      p.headerUTF8,
		EightBitMIME:  p.global || p.retCTE == "8bit",
	}, nil
}

// Generate validates r, writes the report's body (everything after the
// top-level header) to w, and returns the top-level message header, to be
// written before the body with textproto.WriteHeader. CRLF line endings
// throughout. OriginalBody is copied, not buffered whole.
//
// Invalid input is reported before anything is written. An error while
// copying the original body leaves a partial body in w.
func Generate(r Report, w io.Writer) (textproto.Header, error) {
	return generate(&r, w, rand.Reader, time.Now)
}

type rcptPlan struct {
	action      Action
	status      string
	final       string // cleaned address
	orig        string // cleaned original address, "" if none
	origUTF8    bool   // the original recipient's address type is utf-8
	finalField  string // value of Final-Recipient
	origField   string // value of Original-Recipient
	remoteMTA   string
	diag        string // cleaned, bounded, may be non-ASCII
	lastAttempt time.Time
	retryUntil  time.Time
	via         string // cleaned, bounded
}

// maxViaLen bounds Recipient.Via.
const maxViaLen = 200

// plan is a validated Report with every decision taken.
type plan struct {
	global bool

	reportingMTA string
	receivedFrom string
	envID        string
	arrival      time.Time
	rcpts        []rcptPlan

	fromField   string
	toField     string
	subject     string
	date        string
	msgID       string // "" -> random
	msgIDDomain string
	headerUTF8  bool

	origHeader []byte // the original header fields, CRLF, no empty line
	header8bit bool

	returnFull       bool
	truncatedForSize bool
	bodyUnavailable  bool
	originalSize     int64
	maxFullSize      int64
	body             io.Reader
	bodyLimit        int64
	retType          string
	retCTE           string

	text string
	ds   string
}

func prepare(r *Report, now func() time.Time) (*plan, error) {
	p := &plan{}

	to := cleanAddress(r.To)
	if to == "" {
		return nil, errors.New("dsn: To (the original sender) is empty")
	}
	from := cleanAddress(r.FromAddress)
	if from == "" {
		return nil, errors.New("dsn: FromAddress is empty")
	}
	at := strings.LastIndexByte(from, '@')
	if at <= 0 || at == len(from)-1 {
		return nil, fmt.Errorf("dsn: FromAddress %q is not a full address", from)
	}
	if len(to) > maxAddrLen || len(from) > maxAddrLen {
		return nil, errors.New("dsn: To or FromAddress is too long")
	}
	p.reportingMTA = cleanHost(r.ReportingMTA)
	if p.reportingMTA == "" {
		return nil, errors.New("dsn: ReportingMTA is empty")
	}
	p.receivedFrom = cleanHost(r.ReceivedFromMTA)
	if len(r.Recipients) == 0 {
		return nil, errors.New("dsn: no recipients")
	}
	if r.Return != ReturnHeaders && r.Return != ReturnFull {
		return nil, fmt.Errorf("dsn: unknown ReturnMode %d", r.Return)
	}
	if r.OriginalBodySize < 0 {
		return nil, errors.New("dsn: OriginalBodySize is negative")
	}

	p.origHeader = serializeHeader(r.OriginalHeader)
	p.header8bit = !isASCII(string(p.origHeader))

	nonASCIIAddr := !isASCII(to) || !isASCII(from)
	anyFailed, anyDelayed := false, false
	p.rcpts = make([]rcptPlan, len(r.Recipients))
	for i, in := range r.Recipients {
		rc := &p.rcpts[i]
		rc.final = cleanAddress(in.FinalRecipient)
		if rc.final == "" {
			return nil, fmt.Errorf("dsn: recipient %d: FinalRecipient is empty", i)
		}
		rc.action = Action(strings.ToLower(strings.TrimSpace(string(in.Action))))
		if !rc.action.known() {
			return nil, fmt.Errorf("dsn: recipient %d (%s): unknown Action %q", i, rc.final, in.Action)
		}
		rc.orig = cleanAddress(in.OriginalRecipient)
		if rc.orig != "" {
			switch strings.ToLower(strings.TrimSpace(in.OriginalRecipientType)) {
			case "", "rfc822":
			case "utf-8":
				rc.origUTF8 = true
			default:
				return nil, fmt.Errorf("dsn: recipient %d (%s): unsupported OriginalRecipientType %q", i, rc.final, in.OriginalRecipientType)
			}
		}
		nonASCIIAddr = nonASCIIAddr || !isASCII(rc.final) || !isASCII(rc.orig)
		switch rc.action {
		case ActionFailed:
			anyFailed = true
		case ActionDelayed:
			anyDelayed = true
		}
	}
	p.global = r.SMTPUTF8 && (nonASCIIAddr || p.header8bit)

	for i := range p.rcpts {
		rc := &p.rcpts[i]
		in := &r.Recipients[i]
		rc.finalField = typedAddress(rc.final, false, p.global, "; ")
		if rc.orig != "" {
			rc.origField = typedAddress(rc.orig, rc.origUTF8, p.global, ";")
		}
		if len(rc.finalField) > maxAddrLen || len(rc.origField) > maxAddrLen {
			return nil, fmt.Errorf("dsn: recipient %d: address too long", i)
		}
		rc.status = normStatus(in.Status, rc.action)
		rc.remoteMTA = cleanHost(in.RemoteMTA)
		rc.diag = truncate(cleanText(in.DiagnosticCode), maxTextLen)
		rc.via = truncate(cleanText(in.Via), maxViaLen)
		if usableDate(in.LastAttemptDate) {
			rc.lastAttempt = in.LastAttemptDate
		}
		if usableDate(in.WillRetryUntil) {
			rc.retryUntil = in.WillRetryUntil
		}
	}

	if r.EnvelopeID != "" {
		id, err := DecodeXtext(r.EnvelopeID)
		if err != nil {
			return nil, fmt.Errorf("dsn: EnvelopeID: %w", err)
		}
		for j := 0; j < len(id); j++ {
			if id[j] < ' ' || id[j] > '~' {
				return nil, fmt.Errorf("dsn: EnvelopeID decodes to a non-printable or non-ASCII octet 0x%02X", id[j])
			}
		}
		if len(id) > maxTextLen {
			return nil, errors.New("dsn: EnvelopeID is too long")
		}
		p.envID = strings.TrimSpace(id)
	}
	if usableDate(r.ArrivalDate) {
		p.arrival = r.ArrivalDate
	}

	// Top-level header values.
	p.fromField = formatMailbox(r.FromDisplayName, from, p.global)
	p.toField = "<" + to + ">"
	p.headerUTF8 = !isASCII(p.fromField) || !isASCII(p.toField)
	switch {
	case anyFailed && anyDelayed:
		p.subject = "Delivery Status Notification (Failure and Delay)"
	case anyFailed:
		p.subject = "Undelivered Mail Returned to Sender"
	case anyDelayed:
		p.subject = "Delivery Status Notification (Delay)"
	default:
		p.subject = "Delivery Status Notification (Success)"
	}
	date := r.Date
	if !usableDate(date) {
		date = now()
	}
	p.date = formatDate(date)
	if r.MessageID != "" {
		id := cleanAddress(r.MessageID)
		if !validMsgID(id, p.global) {
			return nil, fmt.Errorf("dsn: MessageID %q is not a valid msg-id (id-left@id-right)", r.MessageID)
		}
		p.msgID = id
		p.headerUTF8 = p.headerUTF8 || !isASCII(id)
	}
	p.msgIDDomain = "localhost"
	for _, d := range []string{from[at+1:], p.reportingMTA} {
		if validDotAtom(d, false) {
			p.msgIDDomain = d
			break
		}
	}

	// What of the original goes back.
	p.maxFullSize = r.MaxFullSize
	if p.maxFullSize <= 0 {
		p.maxFullSize = DefaultMaxFullSize
	}
	hdrSize := int64(len(p.origHeader)) + 2
	p.originalSize = hdrSize + r.OriginalBodySize
	switch {
	case !anyFailed || r.Return == ReturnHeaders:
	case r.OriginalBody == nil:
		p.bodyUnavailable = true
	case p.originalSize > p.maxFullSize:
		p.truncatedForSize = true
	default:
		p.returnFull = true
		p.body = r.OriginalBody
		p.bodyLimit = p.maxFullSize - hdrSize
	}
	switch {
	case p.returnFull && p.global:
		p.retType = "message/global"
	case p.returnFull:
		p.retType = "message/rfc822"
	case p.global:
		p.retType = "message/global-headers"
	default:
		p.retType = "text/rfc822-headers"
	}
	p.retCTE = "7bit"
	if p.header8bit || (p.returnFull && !r.OriginalBody7Bit) {
		p.retCTE = "8bit"
	}

	p.text = p.humanText()
	p.ds = p.deliveryStatus()
	return p, nil
}

// validDotAtom reports whether s is an RFC 5322 dot-atom-text (with UTF-8
// allowed when utf8OK).
func validDotAtom(s string, utf8OK bool) bool {
	if s == "" || s[0] == '.' || s[len(s)-1] == '.' || strings.Contains(s, "..") {
		return false
	}
	for _, r := range s {
		if r != '.' && !isAtext(r, utf8OK) {
			return false
		}
	}
	return true
}

// validMsgID reports whether id is id-left "@" id-right of RFC 5322 (dot-atom
// on the left, dot-atom or a bracketed literal on the right).
func validMsgID(id string, utf8OK bool) bool {
	at := strings.LastIndexByte(id, '@')
	if at < 0 || len(id) > maxAddrLen || !validDotAtom(id[:at], utf8OK) {
		return false
	}
	right := id[at+1:]
	if len(right) >= 2 && right[0] == '[' && right[len(right)-1] == ']' {
		for _, c := range []byte(right[1 : len(right)-1]) {
			if c < '!' || c > '~' || c == '[' || c == ']' || c == '\\' {
				return false
			}
		}
		return true
	}
	return validDotAtom(right, utf8OK)
}

// serializeHeader writes the original header fields as they were received,
// with every line ending in CRLF, empty lines (which would end the header
// block early) dropped, and continuation lines made to start with white
// space. A field that cannot be written raw is rebuilt from its cleaned
// value.
func serializeHeader(h textproto.Header) []byte {
	var b bytes.Buffer
	fs := h.Fields()
	for fs.Next() {
		raw, err := fs.Raw()
		if err != nil {
			key := strings.Map(func(r rune) rune {
				if r < '!' || r > '~' || r == ':' {
					return -1
				}
				return r
			}, fs.Key())
			if key == "" {
				continue
			}
			raw = []byte(key + ": " + cleanText(fs.Value()) + "\r\n")
		}
		first := true
		for len(raw) > 0 {
			var line []byte
			i := bytes.IndexAny(raw, "\r\n")
			switch {
			case i < 0:
				line, raw = raw, nil
			case raw[i] == '\r' && i+1 < len(raw) && raw[i+1] == '\n':
				line, raw = raw[:i], raw[i+2:]
			default:
				line, raw = raw[:i], raw[i+1:]
			}
			if len(bytes.Trim(line, " \t")) == 0 {
				continue
			}
			if first {
				line = bytes.TrimLeft(line, " \t")
			} else if line[0] != ' ' && line[0] != '\t' {
				b.WriteByte(' ')
			}
			b.Write(line)
			b.WriteString("\r\n")
			first = false
		}
	}
	return b.Bytes()
}

var errBoundaryInContent = errors.New("dsn: returned content contains the MIME boundary")

func randomHex(rnd io.Reader, n int) (string, error) {
	b := make([]byte, n)
	if _, err := io.ReadFull(rnd, b); err != nil {
		return "", fmt.Errorf("dsn: reading random bytes: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// generate is Generate with the sources of randomness and time injected.
func generate(r *Report, w io.Writer, rnd io.Reader, now func() time.Time) (textproto.Header, error) {
	p, err := prepare(r, now)
	if err != nil {
		return textproto.Header{}, err
	}

	text, textCTE := p.text, "7bit"
	if !isASCII(text) {
		var qb strings.Builder
		qw := quotedprintable.NewWriter(&qb)
		if _, err := qw.Write([]byte(text)); err != nil {
			return textproto.Header{}, err
		}
		if err := qw.Close(); err != nil {
			return textproto.Header{}, err
		}
		text, textCTE = qb.String(), "quoted-printable"
	}

	// The boundary contains "=_", which quoted-printable cannot produce, and
	// 160 random bits; it is checked against all content held in memory,
	// and against the streamed body while it is copied.
	var boundary string
	for i := 0; ; i++ {
		if i == 8 {
			return textproto.Header{}, errors.New("dsn: cannot find a boundary absent from the content")
		}
		h, err := randomHex(rnd, 20)
		if err != nil {
			return textproto.Header{}, err
		}
		boundary = "=_dsn_" + h
		if !strings.Contains(text, boundary) && !strings.Contains(p.ds, boundary) &&
			!bytes.Contains(p.origHeader, []byte(boundary)) {
			break
		}
	}
	msgID := p.msgID
	if msgID == "" {
		h, err := randomHex(rnd, 16)
		if err != nil {
			return textproto.Header{}, err
		}
		msgID = h + "@" + p.msgIDDomain
	}

	dsType, dsCTE, topCTE := "message/delivery-status", "7bit", "7bit"
	if p.global {
		dsType, dsCTE = "message/global-delivery-status", "8bit"
	}
	if dsCTE == "8bit" || p.retCTE == "8bit" {
		topCTE = "8bit"
	}

	fields := []string{
		fold("From", p.fromField),
		fold("To", p.toField),
		fold("Subject", p.subject),
		fold("Date", p.date),
		fold("Message-ID", "<"+msgID+">"),
		fold("Auto-Submitted", "auto-replied"),
		fold("MIME-Version", "1.0"),
		fold("Content-Type", `multipart/report; report-type=delivery-status; boundary="`+boundary+`"`),
		fold("Content-Transfer-Encoding", topCTE),
	}
	var hdr textproto.Header
	// AddRaw puts a field on top of the others: add them last to first.
	for i := len(fields) - 1; i >= 0; i-- {
		hdr.AddRaw([]byte(fields[i]))
	}

	bw := bufio.NewWriter(w)
	pw := &partWriter{w: bw, delim: "--" + boundary}
	startPart := func(ctype, cte, desc string) error {
		if err := pw.finish(); err != nil {
			return err
		}
		_, err := bw.WriteString("\r\n--" + boundary + "\r\n" +
			fold("Content-Type", ctype) +
			fold("Content-Transfer-Encoding", cte) +
			fold("Content-Description", desc) + "\r\n")
		pw.reset(0)
		return err
	}
	fail := func(err error) (textproto.Header, error) {
		return textproto.Header{}, fmt.Errorf("dsn: writing report: %w", err)
	}

	if _, err := bw.WriteString("This is a delivery status notification in MIME format.\r\n"); err != nil {
		return fail(err)
	}
	if err := startPart("text/plain; charset=utf-8", textCTE, "Notification"); err != nil {
		return fail(err)
	}
	pw.maxLine = 998
	if _, err := io.WriteString(pw, text); err != nil {
		return fail(err)
	}
	if err := startPart(dsType, dsCTE, "Delivery report"); err != nil {
		return fail(err)
	}
	if _, err := io.WriteString(pw, p.ds); err != nil {
		return fail(err)
	}
	desc := "Original message headers"
	if p.returnFull {
		desc = "Original message"
	}
	if err := startPart(p.retType, p.retCTE, desc); err != nil {
		return fail(err)
	}
	pw.strip8 = p.retCTE == "7bit"
	if _, err := pw.Write(p.origHeader); err != nil {
		return fail(err)
	}
	if p.returnFull {
		if _, err := io.WriteString(pw, "\r\n"); err != nil {
			return fail(err)
		}
		pw.maxLine = 998
		if _, err := io.Copy(pw, io.LimitReader(p.body, p.bodyLimit)); err != nil {
			return textproto.Header{}, fmt.Errorf("dsn: copying original message: %w", err)
		}
	}
	if err := pw.finish(); err != nil {
		return fail(err)
	}
	if _, err := bw.WriteString("\r\n--" + boundary + "--\r\n"); err != nil {
		return fail(err)
	}
	if err := bw.Flush(); err != nil {
		return fail(err)
	}
	return hdr, nil
}

// partWriter copies part content: it turns bare LF and bare CR into CRLF,
// breaks lines longer than maxLine octets (when maxLine > 0), replaces
// 8-bit octets by "?" when strip8 is set, and fails if a line starts with
// the boundary delimiter.
type partWriter struct {
	w       *bufio.Writer
	delim   string
	match   int // octets of delim matched at the start of this line; -1: none
	col     int
	cr      bool
	maxLine int
	strip8  bool
}

func (pw *partWriter) reset(maxLine int) {
	pw.match, pw.col, pw.cr, pw.maxLine, pw.strip8 = 0, 0, false, maxLine, false
}

func (pw *partWriter) newline() error {
	pw.match, pw.col = 0, 0
	_, err := pw.w.WriteString("\r\n")
	return err
}

func (pw *partWriter) Write(p []byte) (int, error) {
	for n := 0; n < len(p); {
		if run := pw.plainRun(p[n:]); len(run) > 0 {
			if _, err := pw.w.Write(run); err != nil {
				return n, err
			}
			pw.col += len(run)
			n += len(run)
			continue
		}
		if err := pw.writeByte(p[n]); err != nil {
			return n, err
		}
		n++
	}
	return len(p), nil
}

// plainRun returns the longest prefix of p that can be copied as it is:
// no line break in it, no boundary match under way, no line to break, no
// octets to replace.
func (pw *partWriter) plainRun(p []byte) []byte {
	if pw.match >= 0 || pw.cr || pw.strip8 {
		return nil
	}
	if i := bytes.IndexAny(p, "\r\n"); i >= 0 {
		p = p[:i]
	}
	if pw.maxLine > 0 {
		p = p[:max(0, min(len(p), pw.maxLine-pw.col))]
	}
	return p
}

// writeByte handles one octet with all the rules.
func (pw *partWriter) writeByte(c byte) error {
	if pw.cr {
		pw.cr = false
		if err := pw.newline(); err != nil {
			return err
		}
		if c == '\n' {
			return nil
		}
	}
	switch c {
	case '\r':
		pw.cr = true
		return nil
	case '\n':
		return pw.newline()
	}
	if pw.maxLine > 0 && pw.col >= pw.maxLine {
		if err := pw.newline(); err != nil {
			return err
		}
	}
	if pw.strip8 && c >= 0x80 {
		c = '?'
	}
	if pw.match >= 0 {
		if c == pw.delim[pw.match] {
			pw.match++
			if pw.match == len(pw.delim) {
				return errBoundaryInContent
			}
		} else {
			pw.match = -1
		}
	}
	pw.col++
	return pw.w.WriteByte(c)
}

// finish ends a pending bare CR.
func (pw *partWriter) finish() error {
	if pw.cr {
		pw.cr = false
		return pw.newline()
	}
	return nil
}
