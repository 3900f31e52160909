package attempt

import (
	"errors"
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
