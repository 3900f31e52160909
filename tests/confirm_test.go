//go:build unix

package tests

import (
	"strings"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/testutils"
)

// TestBulkConfirmation: a change of several messages selected without IDs
// needs --yes only when it cannot be undone (delete, bounce). Flushing the
// queue, holding and releasing lose nothing and ask nothing, like
// Postfix's postqueue -f.
func TestBulkConfirmation(t *testing.T) {
	t.Parallel()
	sink := newSink(t, testutils.WithScript(deferRemote))
	e := newAdminEnv(t, sink)
	rcpts := []string{"a@x.test", "b@x.test", "c@x.test"}
	for i, r := range rcpts {
		if err := submit(t, e.smtpAddr(), "me@origin.test", []string{r}, msgID(t, i)); err != nil {
			t.Fatal(err)
		}
	}
	// allSettled waits until every message was attempted n times.
	allSettled := func(what string, n int) {
		t.Helper()
		e.waitQueue(what, func(q map[string]admin.MessageInfo) bool {
			for id := range q {
				if !settled(q, id, n) {
					return false
				}
			}
			return len(q) == len(rcpts)
		})
	}
	allSettled("the first attempts", 1)

	r := e.spoolOK("retry", "--all")
	mustContain(t, "retry --all", r.stdout, "retry (outq): 3 matched, 3 changed")
	allSettled("the retried messages to be attempted", 2)

	r = e.spoolOK("hold", "--to", "@x.test")
	mustContain(t, "hold --to", r.stdout, "hold (outq): 3 matched, 3 changed")
	r = e.spoolOK("release", "--all")
	mustContain(t, "release --all", r.stdout, "release (outq): 3 matched, 3 changed")
	allSettled("the released messages to be attempted", 3)

	for _, verb := range []string{"delete", "bounce"} {
		r := e.spool(verb, "--all")
		if r.code != 1 || !strings.Contains(r.stderr, verb+" would change 3 messages: run again with --yes to confirm") {
			t.Errorf("%s --all without --yes: %v", verb, r)
		}
	}
	if n := len(e.listJSON()); n != 3 {
		t.Fatalf("%d messages queued after the refused changes, want 3", n)
	}
	r = e.spoolOK("delete", "--all", "--yes")
	mustContain(t, "delete --all --yes", r.stdout, "delete (outq): 3 matched, 3 changed")
	if d := dsns(sink.Messages()); len(d) != 0 {
		t.Errorf("DSNs sent: %s", describe(d))
	}
}
