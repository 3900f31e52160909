package tests

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/testutils"
)

// Helpers shared by the fault tests (crash_test.go, fulldisk_test.go,
// hostile_test.go).

// txResult is how one SMTP transaction ended for the client.
type txResult struct {
	Accepted bool   // the reply to the end of DATA was 250
	Stage    string // the step that failed, if any
	Err      error
}

// code returns the SMTP reply code of the failure, or 0 if it was not an
// SMTP reply (e.g. a dropped connection).
func (r txResult) code() int {
	var se *smtp.SMTPError
	if errors.As(r.Err, &se) {
		return se.Code
	}
	return 0
}

// enhanced returns the enhanced status code of the failure as "x.y.z", or
// "" if there was none.
func (r txResult) enhanced() string {
	var se *smtp.SMTPError
	if errors.As(r.Err, &se) && se.EnhancedCode != smtp.NoEnhancedCode && se.EnhancedCode != (smtp.EnhancedCode{}) {
		return fmt.Sprintf("%d.%d.%d", se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])
	}
	return ""
}

// submitTx runs one SMTP transaction like submitData, but tells apart a
// message the server accepted (250 after DATA) from one it did not: a
// failure after that reply (QUIT) does not un-accept it.
func submitTx(addr, from string, to []string, data []byte, timeout time.Duration) txResult {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return txResult{Stage: "connect", Err: err}
	}
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		conn.Close()
		return txResult{Stage: "connect", Err: err}
	}
	c := smtp.NewClient(conn)
	defer c.Close()
	if err := c.Hello("client.e2e.test"); err != nil {
		return txResult{Stage: "EHLO", Err: err}
	}
	if err := c.Mail(from, nil); err != nil {
		return txResult{Stage: "MAIL", Err: err}
	}
	for _, r := range to {
		if err := c.Rcpt(r, nil); err != nil {
			return txResult{Stage: "RCPT", Err: fmt.Errorf("RCPT TO:<%s>: %w", r, err)}
		}
	}
	w, err := c.Data()
	if err != nil {
		return txResult{Stage: "DATA", Err: err}
	}
	if _, err := w.Write(data); err != nil {
		_ = w.Close()
		return txResult{Stage: "DATA", Err: err}
	}
	if err := w.Close(); err != nil {
		return txResult{Stage: "end of DATA", Err: err}
	}
	_ = c.Quit()
	return txResult{Accepted: true}
}

// dsnFailures parses the DSNs among msgs and returns, for every recipient
// (lower-cased) named with Action: failed, how many DSNs named it. A DSN that
// does not parse is an error.
func dsnFailures(msgs []testutils.Message) (map[string]int, int, error) {
	failed := make(map[string]int)
	n := 0
	for _, m := range dsns(msgs) {
		n++
		r, err := parseDSN(m.Data)
		if err != nil {
			return nil, n, fmt.Errorf("DSN %s: %w", m.MessageID(), err)
		}
		if r.ReportType != "delivery-status" {
			return nil, n, fmt.Errorf("DSN %s: report-type %q", m.MessageID(), r.ReportType)
		}
		for _, h := range r.Recipients {
			if !strings.EqualFold(strings.TrimSpace(h.Get("Action")), "failed") {
				continue
			}
			fr := strings.TrimSpace(h.Get("Final-Recipient"))
			addr := strings.TrimSpace(fr[strings.IndexByte(fr, ';')+1:])
			failed[strings.ToLower(addr)]++
		}
	}
	return failed, n, nil
}

// procStatusKB reads a "Key: N kB" field of /proc/PID/status.
func procStatusKB(pid int, key string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || k != key {
			continue
		}
		fields := strings.Fields(v)
		if len(fields) == 0 {
			break
		}
		return strconv.ParseInt(fields[0], 10, 64)
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, key)
}

// patchConfig rewrites the configuration file at path: every replacement
// pair old→new must match exactly once.
func patchConfig(t *testing.T, path string, pairs ...string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for i := 0; i+1 < len(pairs); i += 2 {
		if n := strings.Count(s, pairs[i]); n != 1 {
			t.Fatalf("patchConfig: %q occurs %d times in %s", pairs[i], n, path)
		}
		s = strings.Replace(s, pairs[i], pairs[i+1], 1)
	}
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// smtpEndpointBlock is the start of the smtp endpoint's default_source in
// writeConfig's output; patching it adds endpoint directives.
const smtpEndpointBlock = "    default_source {\n        deliver_to &outq"
