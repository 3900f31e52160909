package testutils

import (
	"net/textproto"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
)

// TestSMTPSinkMultilineReplies: line breaks in a scripted reply become
// continuation lines on the wire; other replies are untouched.
func TestSMTPSinkMultilineReplies(t *testing.T) {
	long := strings.Repeat("x", 100<<10)
	replies := map[string]*smtp.SMTPError{
		"lf@example.org":       SinkReply(550, [3]int{5, 1, 1}, "no such user\nsee https://help.test/550"),
		"crlf@example.org":     SinkReply(451, [3]int{4, 4, 1}, "one\r\ntwo\rthree"),
		"utf8@example.org":     SinkReply(550, [3]int{5, 2, 2}, "Почтовый ящик переполнен ✉\nboîte pleine"),
		"long@example.org":     SinkReply(550, [3]int{5, 7, 1}, long+"\nend"),
		"single@example.org":   SinkReply(550, [3]int{5, 1, 1}, "plain reply"),
		"noenh@example.org":    {Code: 550, EnhancedCode: smtp.NoEnhancedCode, Message: "a\nb"},
		"trailing@example.org": SinkReply(550, [3]int{5, 1, 1}, "text\n"),
	}
	sink := NewSMTPSink(t, WithScript(SinkRcptReplies(replies)))

	conn, err := textproto.Dial("tcp", sink.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	readLines := func() []string {
		t.Helper()
		var lines []string
		for {
			l, err := conn.ReadLine()
			if err != nil {
				t.Fatalf("after %q: %v", lines, err)
			}
			lines = append(lines, l)
			if len(l) < 4 || l[3] != '-' {
				return lines
			}
		}
	}
	cmd := func(format string, args ...any) []string {
		t.Helper()
		if err := conn.PrintfLine(format, args...); err != nil {
			t.Fatal(err)
		}
		return readLines()
	}
	readLines() // greeting
	if ehlo := cmd("EHLO client.test"); len(ehlo) < 2 || !strings.HasPrefix(ehlo[0], "250-") {
		t.Fatalf("EHLO reply %q: want a multi-line 250", ehlo)
	}
	if got := cmd("MAIL FROM:<a@example.org>"); len(got) != 1 || !strings.HasPrefix(got[0], "250 ") {
		t.Fatalf("MAIL reply %q", got)
	}

	tests := []struct {
		rcpt string
		want []string
	}{
		{"lf@example.org", []string{"550-5.1.1 no such user", "550 5.1.1 see https://help.test/550"}},
		{"crlf@example.org", []string{"451-4.4.1 one", "451-4.4.1 two", "451 4.4.1 three"}},
		{"utf8@example.org", []string{"550-5.2.2 Почтовый ящик переполнен ✉", "550 5.2.2 boîte pleine"}},
		{"long@example.org", []string{"550-5.7.1 " + long, "550 5.7.1 end"}},
		{"single@example.org", []string{"550 5.1.1 plain reply"}},
		{"noenh@example.org", []string{"550-a", "550 b"}},
		{"trailing@example.org", []string{"550-5.1.1 text", "550 5.1.1 "}},
		{"accepted@example.org", nil},
	}
	for _, tt := range tests {
		got := cmd("RCPT TO:<%s>", tt.rcpt)
		if tt.want == nil {
			if len(got) != 1 || !strings.HasPrefix(got[0], "250 ") {
				t.Errorf("RCPT %s: got %q, want one 250 line", tt.rcpt, got)
			}
			continue
		}
		if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
			t.Errorf("RCPT %s:\n got %.200q\nwant %.200q", tt.rcpt, got, tt.want)
		}
	}
	// The connection is still in sync: the next command gets its own reply.
	if got := cmd("QUIT"); len(got) != 1 || !strings.HasPrefix(got[0], "221 ") {
		t.Errorf("QUIT reply %q", got)
	}
}

func TestAppendReplyLines(t *testing.T) {
	tests := []struct{ in, want string }{
		{"250 OK", "250 OK\r\n"},
		{"250-PIPELINING", "250-PIPELINING\r\n"},
		{"550 5.1.1 a\nb", "550-5.1.1 a\r\n550 5.1.1 b\r\n"},
		{"550-5.1.1 a\nb", "550-5.1.1 a\r\n550-5.1.1 b\r\n"},
		{"550 not.an.enh.code a\nb", "550-not.an.enh.code a\r\n550 b\r\n"},
		{"garbage\nline", "garbage\nline\r\n"},
	}
	for _, tt := range tests {
		if got := string(appendReplyLines(nil, []byte(tt.in))); got != tt.want {
			t.Errorf("appendReplyLines(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
