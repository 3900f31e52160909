//go:build unix

package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// writeMaddyQueue writes n entries in the format of maddy 0.8.1's
// target.queue (ID.meta, ID.header, ID.body), each one message from
// sender@origin.test to rcpt@x.test that was never attempted, into dir.
func writeMaddyQueue(t *testing.T, dir string, n int) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	arrival := time.Now().Add(-time.Hour).UTC()
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("%08x", i+1)
		at := arrival.Add(time.Duration(i) * time.Millisecond).Format(time.RFC3339Nano)
		files := map[string]string{
			".meta": fmt.Sprintf(`{"MsgMeta":{"ID":%q,"SMTPOpts":{},"Conn":null},"From":"sender@origin.test",`+
				`"To":["rcpt@x.test"],"RcptErrs":{},"TriesCount":{},"FirstAttempt":%q,"LastAttempt":%q}`, name, at, at),
			".header": fmt.Sprintf("Message-ID: <%s@origin.test>\r\nSubject: imported %d\r\n\r\n", name, i),
			".body":   "hello\r\n",
		}
		for suf, data := range files {
			if err := os.WriteFile(filepath.Join(dir, name+suf), []byte(data), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// importSummaryRe is the last line `maddy spool import` prints.
var importSummaryRe = regexp.MustCompile(`^(\d+) imported, (\d+) skipped, (\d+) not imported, (\d+) stray file\(s\) in [0-9.]+(ms|s|m[0-9.]+s)$`)

// TestImportSummaryWithoutTerminal: with standard error not a terminal
// (a log file, a pipe), import shows no progress and ends with a summary
// that says how long it took.
func TestImportSummaryWithoutTerminal(t *testing.T) {
	t.Parallel()
	p := params{Dir: t.TempDir(), SMTPPort: 1, SinkPort: 2}
	e := &env{t: t, p: p, cfg: writeConfig(t, p)}
	src := filepath.Join(t.TempDir(), "remote_queue")
	writeMaddyQueue(t, src, 40)

	r := e.spoolOK("import", "--from", src)
	if r.stderr != "" {
		t.Errorf("import wrote to a standard error that is not a terminal: %q", r.stderr)
	}
	lines := nonEmptyLines(r.stdout)
	m := importSummaryRe.FindStringSubmatch(lines[len(lines)-1])
	if m == nil || m[1] != "40" || m[2] != "0" || m[3] != "0" {
		t.Fatalf("last line %q is not the summary of 40 imported entries:\n%s", lines[len(lines)-1], r.stdout)
	}
	if n := len(e.listJSON()); n != 40 {
		t.Errorf("%d messages queued after the import, want 40", n)
	}
	if strings.Contains(r.stdout, "\r") {
		t.Errorf("progress in the output: %q", r.stdout)
	}
}
