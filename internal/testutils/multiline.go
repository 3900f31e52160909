package testutils

import (
	"bytes"
	"net"
	"strings"
	"sync"

	"github.com/emersion/go-smtp"
)

// go-smtp writes an *smtp.SMTPError as one reply line, so a script could not
// produce the multi-line replies real servers send (RFC 5321 section 4.2.1)
// and a message holding a line break would corrupt the stream. The sink
// therefore wraps its connections in multilineConn, which turns every line
// break inside a reply's text into a continuation line: a script replying
// with SinkReply(550, [3]int{5, 1, 1}, "no such user\nsee https://x") sends
//
//	550-5.1.1 no such user
//	550 5.1.1 see https://x
//
// The sink turns CRLF and lone CR in a script's reply text into LF before
// go-smtp sees it (see replyText), so all three count as line breaks.
// Replies without a line break pass through unchanged.

// multilineListener wraps every accepted connection in a multilineConn.
type multilineListener struct{ net.Listener }

func (l multilineListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &multilineConn{Conn: c}, nil
}

// multilineConn rewrites the server's outgoing lines; see above. Output is
// held back only until the CRLF that ends the current line.
type multilineConn struct {
	net.Conn

	mu      sync.Mutex
	pending []byte // start of a line whose CRLF has not been written yet
}

func (c *multilineConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending = append(c.pending, p...)
	var out []byte
	for {
		i := bytes.Index(c.pending, []byte("\r\n"))
		if i < 0 {
			break
		}
		line := c.pending[:i]
		out = appendReplyLines(out, line)
		c.pending = c.pending[i+2:]
	}
	if len(c.pending) == 0 {
		c.pending = nil // let a large reply's buffer go
	}
	if len(out) > 0 {
		if _, err := c.Conn.Write(out); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// startsReply reports whether b begins like a reply line: three digits and
// a space or hyphen.
func startsReply(b []byte) bool {
	if len(b) < 4 {
		return false
	}
	for i := 0; i < 4; i++ {
		switch {
		case i < 3 && (b[i] < '0' || b[i] > '9'):
			return false
		case i == 3 && b[i] != ' ' && b[i] != '-':
			return false
		}
	}
	return true
}

// appendReplyLines appends line, split at LFs into continuation lines
// sharing its code and enhanced code, each ended by CRLF.
func appendReplyLines(out, line []byte) []byte {
	if !bytes.ContainsRune(line, '\n') || !startsReply(line) {
		out = append(out, line...)
		return append(out, '\r', '\n')
	}
	code, sep, text := line[:3], line[3], line[4:]
	var enh []byte
	if sp := bytes.IndexByte(text, ' '); sp > 0 && isEnhancedCode(text[:sp]) {
		enh, text = text[:sp+1], text[sp+1:]
	}
	parts := bytes.Split(text, []byte("\n"))
	for i, part := range parts {
		out = append(out, code...)
		if i == len(parts)-1 {
			out = append(out, sep)
		} else {
			out = append(out, '-')
		}
		out = append(out, enh...)
		out = append(out, part...)
		out = append(out, '\r', '\n')
	}
	return out
}

// isEnhancedCode matches "d.d{1,3}.d{1,3}".
func isEnhancedCode(b []byte) bool {
	parts := bytes.Split(b, []byte("."))
	if len(parts) != 3 {
		return false
	}
	for _, p := range parts {
		if len(p) == 0 || len(p) > 3 {
			return false
		}
		for _, ch := range p {
			if ch < '0' || ch > '9' {
				return false
			}
		}
	}
	return true
}

// replyText normalizes the line breaks in a script's reply to LF, which
// multilineConn turns into continuation lines.
func replyText(e *smtp.SMTPError) *smtp.SMTPError {
	if e == nil || !strings.ContainsRune(e.Message, '\r') {
		return e
	}
	c := *e
	c.Message = strings.ReplaceAll(strings.ReplaceAll(e.Message, "\r\n", "\n"), "\r", "\n")
	return &c
}
