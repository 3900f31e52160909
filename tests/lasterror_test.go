//go:build unix

package tests

import (
	"fmt"
	"strings"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
)

// TestRefusedNextHopIsNamed: when nothing listens on the next hop, the
// recipient's last error says so, not just "Network I/O error": operators
// read it in `spool ls` and senders in the delay report.
func TestRefusedNextHopIsNamed(t *testing.T) {
	t.Parallel()
	closed := freePorts(t, 1)[0] // nothing listens there
	e := newEnv(t, newSink(t), func(p *params) { p.SinkPort, p.Retry = closed, "1h" })
	if err := submit(t, e.smtpAddr(), "me@origin.test", []string{"you@example.org"}, msgID(t, 1)); err != nil {
		t.Fatal(err)
	}
	q := e.waitQueue("the first attempt", func(q map[string]admin.MessageInfo) bool {
		for id := range q {
			return settled(q, id, 1)
		}
		return false
	})
	want := fmt.Sprintf("450 4.4.2 Network I/O error: dial tcp 127.0.0.1:%d: connect: connection refused", closed)
	for _, mi := range q {
		if len(mi.Pending) != 1 || mi.Pending[0].LastError != want {
			t.Errorf("pending %+v, want last error %q", mi.Pending, want)
		}
	}
	ls := e.spoolOK("ls")
	if !strings.Contains(ls.stdout, "you@example.org  (1 tries)  "+want) {
		t.Errorf("spool ls does not show %q:\n%s", want, ls.stdout)
	}
}
