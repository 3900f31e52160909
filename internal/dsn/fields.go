package dsn

import (
	"fmt"
	"regexp"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

const (
	// maxTextLen bounds free text taken from the caller (Diagnostic-Code
	// and the like), in octets of the final field value.
	maxTextLen = 900
	// maxAddrLen bounds an address as it is written into a field.
	maxAddrLen = 900
	// maxHostLen bounds an MTA name.
	maxHostLen = 255
	// maxNameLen bounds the From display name before encoding.
	maxNameLen = 200
	// foldWidth is the line length generated header fields are folded at
	// where a space allows it (RFC 5322 section 2.1.1 recommends 78).
	foldWidth = 78
	// textWidth is the width the human-readable part is wrapped at.
	textWidth = 76
	// dateLayout is the RFC 5322 date-time form with a numeric zone.
	dateLayout = "Mon, 02 Jan 2006 15:04:05 -0700"
)

var statusRE = regexp.MustCompile(`^[245]\.[0-9]{1,3}\.[0-9]{1,3}$`)

// normStatus returns s if it is a valid RFC 3463 status code, otherwise
// the generic code for the action.
func normStatus(s string, a Action) string {
	s = strings.TrimSpace(s)
	if statusRE.MatchString(s) {
		return s
	}
	switch a {
	case ActionDelayed:
		return "4.0.0"
	case ActionFailed:
		return "5.0.0"
	}
	return "2.0.0"
}

// usableDate reports whether t can be written as an RFC 5322 date; the zero
// time and years outside 1900..9999 cannot (and the zero time means "not
// given").
func usableDate(t time.Time) bool {
	return !t.IsZero() && t.Year() >= 1900 && t.Year() <= 9999
}

func formatDate(t time.Time) string {
	return t.Format(dateLayout)
}

// isControl reports whether r is a C0 or C1 control character or DEL, or
// one of the Unicode line/paragraph separators.
func isControl(r rune) bool {
	return r < 0x20 || (r >= 0x7F && r <= 0x9F) || r == '\u2028' || r == '\u2029'
}

// cleanText turns caller-supplied free text into one line: invalid UTF-8
// becomes U+FFFD, control characters (CR, LF, NUL, TAB, ...) and other
// white space become separators, format characters (bidi overrides,
// zero-width characters) are dropped, runs of separators collapse to one
// space, and leading and trailing space is removed.
func cleanText(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	var b strings.Builder
	b.Grow(len(s))
	sep := false
	for _, r := range s {
		switch {
		case isControl(r) || unicode.IsSpace(r):
			sep = true
			continue
		case unicode.Is(unicode.Cf, r):
			continue
		}
		if sep && b.Len() > 0 {
			b.WriteByte(' ')
		}
		sep = false
		b.WriteRune(r)
	}
	return b.String()
}

// cleanAddress removes control characters and surrounding white space from
// an address, and one pair of enclosing angle brackets. Interior spaces
// (quoted local parts) are kept.
func cleanAddress(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if isControl(r) {
			return -1
		}
		return r
	}, s)
	s = strings.TrimSpace(s)
	if len(s) >= 2 && s[0] == '<' && s[len(s)-1] == '>' {
		s = strings.TrimSpace(s[1 : len(s)-1])
	}
	return s
}

// cleanHost makes an MTA name safe: cleaned like text, with all spaces
// removed, and bounded in length.
func cleanHost(s string) string {
	// A host name has no spaces: whatever follows the first one (or the
	// first control character, which cleanText turns into one) is not
	// part of it.
	host, _, _ := strings.Cut(strings.TrimSpace(cleanText(s)), " ")
	return truncate(host, maxHostLen)
}

// asciiOnly replaces every non-ASCII character by "?".
func asciiOnly(s string) string {
	if isASCII(s) {
		return s
	}
	return strings.Map(func(r rune) rune {
		if r >= utf8.RuneSelf {
			return '?'
		}
		return r
	}, s)
}

// truncate shortens s to at most n octets, cutting at a character boundary
// and marking the cut with "...".
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n - 3
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return strings.TrimRight(s[:cut], " ") + "..."
}

// fold formats one header field "Name: value" with CRLF, folding at spaces
// (a space becomes CRLF followed by that space, so unfolding restores the
// value exactly) to keep lines within foldWidth where possible. value must
// not contain CR or LF. A word longer than the width is not split; callers
// bound their values so that no line reaches 998 octets.
func fold(name, value string) string {
	var b strings.Builder
	words := strings.Split(value, " ")
	line := name + ": " + words[0]
	for _, w := range words[1:] {
		if w != "" && len(line)+1+len(w) > foldWidth && strings.TrimLeft(line, " ") != "" {
			b.WriteString(line)
			b.WriteString("\r\n")
			line = " " + w
			continue
		}
		line += " " + w
	}
	b.WriteString(line)
	b.WriteString("\r\n")
	return b.String()
}

// isAtext reports whether r is an RFC 5322 atext character, or (when
// utf8OK) any non-ASCII character as RFC 6532 allows.
func isAtext(r rune, utf8OK bool) bool {
	switch {
	case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		return true
	case r >= utf8.RuneSelf:
		return utf8OK
	}
	return strings.ContainsRune("!#$%&'*+-/=?^_`{|}~", r)
}

// formatMailbox renders a From/To mailbox. The display name is written as
// atoms when it can be, as a quoted-string otherwise, and as RFC 2047
// encoded-words (Q encoding, UTF-8, see encodeWords) when it has non-ASCII
// characters and raw UTF-8 is not allowed. The address is written as given (already
// cleaned), in angle brackets.
func formatMailbox(name, addr string, utf8OK bool) string {
	name = truncate(cleanText(name), maxNameLen)
	if name == "" {
		return "<" + addr + ">"
	}
	if !utf8OK && !isASCII(name) {
		return encodeWords(name) + " <" + addr + ">"
	}
	atoms := !strings.Contains(name, "=?")
	for _, r := range name {
		if r != ' ' && !isAtext(r, utf8OK) {
			atoms = false
			break
		}
	}
	if atoms {
		return name + " <" + addr + ">"
	}
	q := strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(name)
	return `"` + q + `" <` + addr + ">"
}

// encodeWords encodes s as RFC 2047 "Q" encoded-words in UTF-8 for use in
// a phrase: letters, digits and "!*+-/" stay, space becomes "_", all else
// "=XX". Every character is encoded (no mix of encoded and plain words,
// whose spacing rules differ), a character is never split across words,
// and each word is at most 66 octets, so "From: " and the first word fit in
// 78 octets. Decoders join adjacent encoded-words, dropping the space
// between them.
func encodeWords(s string) string {
	const maxPayload = 66 - len("=?utf-8?q??=")
	var words []string
	var cur strings.Builder
	flush := func() {
		if cur.Len() > 0 {
			words = append(words, "=?utf-8?q?"+cur.String()+"?=")
			cur.Reset()
		}
	}
	var buf [utf8.UTFMax]byte
	for _, r := range s {
		var enc string
		switch {
		case r == ' ':
			enc = "_"
		case r < utf8.RuneSelf && (isAlnum(byte(r)) || strings.ContainsRune("!*+-/", r)):
			enc = string(r)
		default:
			n := utf8.EncodeRune(buf[:], r)
			for _, c := range buf[:n] {
				enc += fmt.Sprintf("=%02X", c)
			}
		}
		if cur.Len()+len(enc) > maxPayload {
			flush()
		}
		cur.WriteString(enc)
	}
	flush()
	return strings.Join(words, " ")
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// typedAddress renders an address with its address type for the
// delivery-status part: "rfc822" + sep + addr for ASCII addresses of type
// rfc822; "utf-8" + sep + addr for the rest, with addr raw in a global
// (8-bit) part and in utf-8-addr-xtext form in a 7-bit part.
func typedAddress(addr string, utf8Type, global bool, sep string) string {
	if !utf8Type && isASCII(addr) {
		return "rfc822" + sep + addr
	}
	if global {
		return "utf-8" + sep + addr
	}
	return "utf-8" + sep + encodeUTF8AddrXtext(addr)
}

// wrap breaks text into lines of at most width octets (where words allow),
// the first starting with indent, the others with cont.
func wrap(indent, cont, text string, width int) []string {
	var lines []string
	prefix, line := indent, ""
	for _, w := range strings.Fields(text) {
		switch {
		case line == "":
			line = prefix + w
		case len(line)+1+len(w) > width:
			lines = append(lines, line)
			prefix = cont
			line = prefix + w
		default:
			line += " " + w
		}
	}
	if line != "" {
		lines = append(lines, line)
	}
	return lines
}

// plural returns singular or plural depending on n.
func plural(n int, singular, pluralForm string) string {
	if n == 1 {
		return singular
	}
	return pluralForm
}

// humanText composes the text/plain part: who got what, the last error,
// what happens next, and what of the original is attached. Lines are
// separated by CRLF and the text ends with CRLF.
func (p *plan) humanText() string {
	var lines []string
	add := func(ls ...string) { lines = append(lines, ls...) }
	item := func(s string) { add(wrap("    ", "      ", s, textWidth)...) }
	para := func(s string) { add(wrap("", "", s, textWidth)...) }

	para("This is an automatically generated delivery status notification from the mail system at " + p.reportingMTA + ".")
	add("")
	if !p.arrival.IsZero() {
		para("Your message was received on " + formatDate(p.arrival) + ".")
		add("")
	}

	groups := []struct {
		action Action
		intro  string
	}{
		{ActionFailed, "Your message could not be delivered to the following %s. This is a permanent failure; no further delivery attempts will be made."},
		{ActionDelayed, "Delivery of your message to the following %s has been delayed. You do not need to do anything yet: delivery attempts continue, and you will be notified if they finally fail."},
		{ActionDelivered, "Your message was delivered to the following %s."},
		{ActionRelayed, "Your message was passed on to the following %s. The next mail system may not send further notifications."},
		{ActionExpanded, "Your message was delivered to the following %s and forwarded from there to further addresses."},
	}
	for _, g := range groups {
		var rs []*rcptPlan
		for i := range p.rcpts {
			if p.rcpts[i].action == g.action {
				rs = append(rs, &p.rcpts[i])
			}
		}
		if len(rs) == 0 {
			continue
		}
		para(fmt.Sprintf(g.intro, plural(len(rs), "recipient", "recipients")))
		add("")
		for _, rc := range rs {
			add(wrap("  ", "    ", rc.final, textWidth)...)
			if rc.orig != "" && rc.orig != rc.final {
				item("Originally addressed to: " + rc.orig)
			}
			item("Status: " + rc.status)
			if rc.remoteMTA != "" {
				item("Remote server: " + rc.remoteMTA)
			}
			if rc.diag != "" {
				label := "Last error: "
				if rc.action != ActionFailed && rc.action != ActionDelayed {
					label = "Server reply: "
				}
				item(label + rc.diag)
			}
			if rc.via != "" {
				item("Sent through: " + rc.via)
			}
			if !rc.lastAttempt.IsZero() {
				item("Last attempt: " + formatDate(rc.lastAttempt))
			}
			if rc.action == ActionDelayed {
				if rc.retryUntil.IsZero() {
					item("The mail system will keep trying to deliver it.")
				} else {
					item("The mail system will keep trying until " + formatDate(rc.retryUntil) + ".")
				}
			}
			add("")
		}
	}

	switch {
	case p.returnFull:
		para("Your original message is attached below.")
	case p.truncatedForSize:
		para(fmt.Sprintf("Your original message (%d octets) is larger than the %d octets this mail system returns in full, so only its headers are attached below.", p.originalSize, p.maxFullSize))
	case p.bodyUnavailable:
		para("The body of your original message is not available, so only its headers are attached below.")
	default:
		para("The headers of your original message are attached below.")
	}
	return strings.Join(lines, "\r\n") + "\r\n"
}

// deliveryStatus composes the message/delivery-status (or
// message/global-delivery-status) content: the per-message fields, then
// one group per recipient, each preceded by one empty line. Every field
// ends with CRLF and nothing follows the last field.
func (p *plan) deliveryStatus() string {
	var b strings.Builder
	text := func(s string) string {
		if !p.global {
			s = asciiOnly(s)
		}
		return s
	}
	if p.envID != "" {
		b.WriteString(fold("Original-Envelope-Id", p.envID))
	}
	b.WriteString(fold("Reporting-MTA", "dns; "+text(p.reportingMTA)))
	if p.receivedFrom != "" {
		b.WriteString(fold("Received-From-MTA", "dns; "+text(p.receivedFrom)))
	}
	if !p.arrival.IsZero() {
		b.WriteString(fold("Arrival-Date", formatDate(p.arrival)))
	}
	for _, rc := range p.rcpts {
		b.WriteString("\r\n")
		if rc.orig != "" {
			b.WriteString(fold("Original-Recipient", rc.origField))
		}
		b.WriteString(fold("Final-Recipient", rc.finalField))
		b.WriteString(fold("Action", string(rc.action)))
		b.WriteString(fold("Status", rc.status))
		if rc.remoteMTA != "" {
			b.WriteString(fold("Remote-MTA", "dns; "+text(rc.remoteMTA)))
		}
		if rc.diag != "" {
			b.WriteString(fold("Diagnostic-Code", "smtp; "+truncate(text(rc.diag), maxTextLen)))
		}
		if !rc.lastAttempt.IsZero() {
			b.WriteString(fold("Last-Attempt-Date", formatDate(rc.lastAttempt)))
		}
		if rc.via != "" {
			b.WriteString(fold("X-Spool-Via", text(rc.via)))
		}
		if rc.action == ActionDelayed && !rc.retryUntil.IsZero() {
			b.WriteString(fold("Will-Retry-Until", formatDate(rc.retryUntil)))
		}
	}
	return b.String()
}
