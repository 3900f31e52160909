package attempt

import (
	"errors"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/exterrors"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

func TestStatus(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want store.SMTPStatus
	}{
		{"maddy SMTP error with remote server",
			&exterrors.SMTPError{Code: 550, EnhancedCode: exterrors.EnhancedCode{5, 1, 1}, Message: "mx.example.com said: no such user",
				Misc: map[string]interface{}{"remote_server": "mx.example.com"}},
			store.SMTPStatus{Code: 550, Enhanced: [3]int{5, 1, 1}, Message: "mx.example.com said: no such user", RemoteMTA: "mx.example.com"}},
		{"go-smtp error", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "greylisted"},
			store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 7, 0}, Message: "greylisted", Temporary: true}},
		{"plain error is temporary", errors.New("connection refused"),
			store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 0, 0}, Message: "connection refused", Temporary: true}},
		{"explicitly permanent plain error", exterrors.WithTemporary(errors.New("bad"), false),
			store.SMTPStatus{Code: 554, Enhanced: [3]int{5, 0, 0}, Message: "bad"}},
		{"enhanced code of the wrong class", &exterrors.SMTPError{Code: 451, EnhancedCode: exterrors.EnhancedCode{5, 1, 1}, Message: "x"},
			store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 0, 0}, Message: "x", Temporary: true}},
		{"hostile text is cleaned", &exterrors.SMTPError{Code: 550, EnhancedCode: exterrors.EnhancedCode{5, 0, 0}, Message: "bad\r\nBcc: victim@example.org\x00\tend"},
			store.SMTPStatus{Code: 550, Enhanced: [3]int{5, 0, 0}, Message: "bad Bcc: victim@example.org end"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Status(tc.err); got != tc.want {
				t.Fatalf("Status = %+v, want %+v", got, tc.want)
			}
		})
	}
}

// refusedDial returns the error of a TCP dial to a port nothing listens on,
// as the operating system reports it, and the address dialled.
func refusedDial(t *testing.T) (error, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	c, err := net.Dial("tcp", addr)
	if err == nil {
		c.Close()
		t.Skipf("something listens on %s again", addr)
	}
	return err, addr
}

// TestStatusNamesTheCause: maddy's targets put a generic text in Message
// and the error that happened in Err or Reason. The stored message says
// both, unless the cause is the remote server's own reply (already the
// message) or already in the message. The shapes are those of maddy
// 0.8.1's internal/smtpconn (target.smtp, target.remote) and
// internal/target/remote.
func TestStatusNamesTheCause(t *testing.T) {
	dialErr, addr := refusedDial(t)
	var opErr *net.OpError
	if !errors.As(dialErr, &opErr) {
		t.Fatalf("dial error %T, want *net.OpError", dialErr)
	}
	// smtpconn wraps a network error so, and target.smtp adds fields.
	networkIO := func(err error) error {
		return exterrors.WithFields(&exterrors.SMTPError{Code: 450, EnhancedCode: exterrors.EnhancedCode{4, 4, 2},
			Message: "Network I/O error", Err: err, Misc: map[string]interface{}{"io_op": "dial"}},
			map[string]interface{}{"target": "target.smtp"})
	}
	timeout := &net.OpError{Op: "read", Net: "tcp", Addr: &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 25}, Err: os.ErrDeadlineExceeded}
	remoteReply := &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "greylisted, try later"}
	for _, tc := range []struct {
		name string
		err  error
		want string // FormatStatus of the result
	}{
		{"connection refused (target.smtp)", networkIO(dialErr),
			"450 4.4.2 Network I/O error: dial tcp " + addr + ": connect: connection refused"},
		{"timeout (target.smtp)", networkIO(timeout),
			"450 4.4.2 Network I/O error: read tcp 192.0.2.1:25: i/o timeout"},
		{"DNS failure with a reason", &exterrors.SMTPError{Code: 451, EnhancedCode: exterrors.EnhancedCode{4, 4, 4},
			Message: "MX lookup error", Reason: "server misbehaving", Err: errors.New("lookup x.test: server misbehaving")},
			"451 4.4.4 MX lookup error: server misbehaving"},
		{"remote reply (target.smtp)", &exterrors.SMTPError{Code: 451, EnhancedCode: exterrors.EnhancedCode{4, 7, 1},
			Message: "greylisted, try later", Err: remoteReply},
			"451 4.7.1 greylisted, try later"},
		{"remote reply (target.remote)", &exterrors.SMTPError{Code: 451, EnhancedCode: exterrors.EnhancedCode{4, 7, 1},
			Message: "mx.x.test said: greylisted, try later", Err: remoteReply, Misc: map[string]interface{}{"remote_server": "mx.x.test"}},
			"451 4.7.1 mx.x.test said: greylisted, try later"},
		{"cause already in the message (target.remote)", &exterrors.SMTPError{Code: 451, EnhancedCode: exterrors.EnhancedCode{4, 4, 0},
			Message: "No usable MXs, last err: " + networkIO(dialErr).Error(), Err: networkIO(dialErr)},
			"451 4.4.0 No usable MXs, last err: dial tcp " + addr + ": connect: connection refused"},
		{"TLS failure (target.smtp, no SMTP code)", errors.New("smtpconn: tls: failed to verify certificate: x509: certificate signed by unknown authority"),
			"451 4.0.0 smtpconn: tls: failed to verify certificate: x509: certificate signed by unknown authority"},
		{"control characters in the cause", networkIO(errors.New("bad\r\nX-Injected: 1")),
			"450 4.4.2 Network I/O error: bad X-Injected: 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := FormatStatus(Status(tc.err)); got != tc.want {
				t.Fatalf("got  %q\nwant %q", got, tc.want)
			}
		})
	}

	// The bound holds with a long cause, and the generic text comes first.
	st := Status(networkIO(errors.New(strings.Repeat("x", 3*maxErrorText))))
	if len(st.Message) > maxErrorText || !strings.HasPrefix(st.Message, "Network I/O error: xxx") {
		t.Fatalf("%d bytes: %.40q", len(st.Message), st.Message)
	}
}

func TestCleanTextBoundsLength(t *testing.T) {
	long := strings.Repeat("é", 2000)
	got := CleanText(long, 1000)
	if len(got) > 1000 || !strings.HasPrefix(long, got) {
		t.Fatalf("CleanText gave %d bytes (valid prefix: %v)", len(got), strings.HasPrefix(long, got))
	}
}

func TestFormatStatus(t *testing.T) {
	got := FormatStatus(store.SMTPStatus{Code: 550, Enhanced: [3]int{5, 1, 1}, Message: "no such user"})
	if got != "550 5.1.1 no such user" {
		t.Fatal(got)
	}
}
