package testutils

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

func TestParseSinkFlags(t *testing.T) {
	defaults := SinkFlags{
		Listen:          "127.0.0.1:2525",
		ShutdownTimeout: 10 * time.Second,
		Rules:           SinkRules{Mode: SinkAccept},
	}
	cases := []struct {
		name    string
		args    []string
		want    *SinkFlags // nil: expect an error
		wantErr error      // checked with errors.Is when set
	}{
		{name: "defaults", args: nil, want: &defaults},
		{
			name: "everything",
			args: []string{
				"-listen", "127.0.0.1:0", "-dir", "/tmp/out", "-addr-file", "/tmp/addr", "-lmtp", "-envelope",
				"-shutdown-timeout", "3s", "-defer-first", "2", "-reject-rcpt", "a@x,b@x", "-reject-rcpt", "c@x",
				"-mode-file", "/tmp/mode", "-mode", "reject",
			},
			want: &SinkFlags{
				Listen: "127.0.0.1:0", Dir: "/tmp/out", AddrFile: "/tmp/addr", LMTP: true, Envelope: true,
				ShutdownTimeout: 3 * time.Second,
				Rules: SinkRules{
					Mode: SinkReject, ModeFile: "/tmp/mode", DeferFirst: 2,
					RejectRcpts: []string{"a@x", "b@x", "c@x"},
				},
			},
		},
		{
			name: "defer-all",
			args: []string{"-defer-all"},
			want: &SinkFlags{Listen: defaults.Listen, ShutdownTimeout: defaults.ShutdownTimeout, Rules: SinkRules{Mode: SinkDefer}},
		},
		{name: "defer-all conflicts with reject", args: []string{"-defer-all", "-mode", "reject"}},
		{name: "bad mode", args: []string{"-mode", "maybe"}},
		{name: "negative defer-first", args: []string{"-defer-first", "-1"}},
		{name: "not a number", args: []string{"-defer-first", "x"}},
		{name: "positional args", args: []string{"extra"}},
		{name: "unknown flag", args: []string{"-nope"}},
		{name: "help", args: []string{"-h"}, wantErr: flag.ErrHelp},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseSinkFlags(tc.args, io.Discard)
			if tc.want == nil {
				if err == nil {
					t.Fatalf("got %+v, want error", got)
				}
				if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
					t.Fatalf("error %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestParseSinkMode(t *testing.T) {
	for in, want := range map[string]SinkMode{"accept": SinkAccept, " Defer\n": SinkDefer, "REJECT": SinkReject} {
		if got, err := ParseSinkMode(in); err != nil || got != want {
			t.Errorf("ParseSinkMode(%q) = %q, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "bounce"} {
		if _, err := ParseSinkMode(in); err == nil {
			t.Errorf("ParseSinkMode(%q) succeeded", in)
		}
	}
}

func replyCode(r *smtp.SMTPError) string {
	if r == nil {
		return "ok"
	}
	e := r.EnhancedCode
	return fmt.Sprintf("%d %d.%d.%d", r.Code, e[0], e[1], e[2])
}

func TestSinkRulesScript(t *testing.T) {
	dir := t.TempDir()
	modeFile := func(content string) string {
		p := filepath.Join(dir, "mode-"+strings.TrimSpace(content))
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}

	type call struct {
		stage, rcpt string
		attempt     int
		want        string // "ok" or "code x.y.z"
	}
	cases := []struct {
		name  string
		rules SinkRules
		calls []call
	}{
		{
			name:  "accept mode accepts all stages",
			rules: SinkRules{Mode: SinkAccept},
			calls: []call{{StageMAIL, "", 1, "ok"}, {StageRCPT, "a@x", 1, "ok"}, {StageDATA, "a@x", 1, "ok"}},
		},
		{
			name:  "zero mode behaves as accept",
			rules: SinkRules{},
			calls: []call{{StageRCPT, "a@x", 1, "ok"}},
		},
		{
			name:  "defer-first",
			rules: SinkRules{Mode: SinkAccept, DeferFirst: 2},
			calls: []call{{StageRCPT, "a@x", 1, "451 4.4.1"}, {StageRCPT, "a@x", 2, "451 4.4.1"}, {StageRCPT, "a@x", 3, "ok"}, {StageMAIL, "", 1, "ok"}},
		},
		{
			name:  "reject-rcpt beats everything",
			rules: SinkRules{Mode: SinkDefer, RejectRcpts: []string{"Bad@X"}},
			calls: []call{{StageRCPT, "bad@x", 9, "550 5.1.1"}, {StageRCPT, "good@x", 9, "451 4.4.1"}},
		},
		{
			name:  "defer mode",
			rules: SinkRules{Mode: SinkDefer},
			calls: []call{{StageRCPT, "a@x", 100, "451 4.4.1"}, {StageDATA, "a@x", 1, "ok"}},
		},
		{
			name:  "reject mode",
			rules: SinkRules{Mode: SinkReject},
			calls: []call{{StageRCPT, "a@x", 1, "550 5.7.1"}},
		},
		{
			name:  "mode file overrides flag mode",
			rules: SinkRules{Mode: SinkDefer, ModeFile: modeFile("accept\n")},
			calls: []call{{StageRCPT, "a@x", 1, "ok"}},
		},
		{
			name:  "mode file defer",
			rules: SinkRules{Mode: SinkAccept, ModeFile: modeFile("defer")},
			calls: []call{{StageRCPT, "a@x", 1, "451 4.4.1"}},
		},
		{
			name:  "missing mode file keeps flag mode",
			rules: SinkRules{Mode: SinkReject, ModeFile: filepath.Join(dir, "absent")},
			calls: []call{{StageRCPT, "a@x", 1, "550 5.7.1"}},
		},
		{
			name:  "blank mode file keeps flag mode",
			rules: SinkRules{Mode: SinkAccept, ModeFile: modeFile(" \n")},
			calls: []call{{StageRCPT, "a@x", 1, "ok"}},
		},
		{
			name:  "invalid mode file defers",
			rules: SinkRules{Mode: SinkAccept, ModeFile: modeFile("bogus")},
			calls: []call{{StageRCPT, "a@x", 1, "451 4.3.0"}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			script := tc.rules.Script()
			for _, c := range tc.calls {
				if got := replyCode(script(c.stage, "f@x", c.rcpt, c.attempt)); got != c.want {
					t.Errorf("%s %s attempt %d: %s, want %s", c.stage, c.rcpt, c.attempt, got, c.want)
				}
			}
		})
	}
}

// TestSinkRulesModeFileSwitch checks that the mode file is re-read on
// every recipient, so a running sink can be switched.
func TestSinkRulesModeFileSwitch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mode")
	script := SinkRules{ModeFile: path}.Script()
	for _, step := range []struct{ content, want string }{
		{"defer", "451 4.4.1"},
		{"reject", "550 5.7.1"},
		{"accept", "ok"},
	} {
		if err := WriteFileAtomic(path, []byte(step.content)); err != nil {
			t.Fatal(err)
		}
		if got := replyCode(script(StageRCPT, "f@x", "a@x", 1)); got != step.want {
			t.Errorf("mode %s: %s, want %s", step.content, got, step.want)
		}
	}
}

func TestSaveSinkMessage(t *testing.T) {
	dir := t.TempDir()
	m := &Message{
		From:     "f@x",
		Rcpts:    []string{"a@x", "b@x"},
		Data:     []byte(testMsg("save@x")),
		RcptOpts: []smtp.RcptOptions{{}, {Notify: []smtp.DSNNotify{smtp.DSNNotifyNever}}},
		Received: time.Unix(1700000000, 123),
	}
	p1, err := SaveSinkMessage(dir, 7, m, false)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(p1) != "1700000000000000123-7.eml" {
		t.Errorf("name = %s", p1)
	}
	if b, err := os.ReadFile(p1); err != nil || string(b) != string(m.Data) {
		t.Errorf("content = %q, %v", b, err)
	}

	p2, err := SaveSinkMessage(dir, 8, m, true)
	if err != nil {
		t.Fatal(err)
	}
	var env struct {
		From  string   `json:"from"`
		Rcpts []string `json:"rcpts"`
		Size  int      `json:"size"`
	}
	b, err := os.ReadFile(strings.TrimSuffix(p2, ".eml") + ".json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &env); err != nil || env.From != "f@x" || len(env.Rcpts) != 2 || env.Size != len(m.Data) {
		t.Errorf("envelope %s: %+v %v", b, env, err)
	}

	// Only the final files remain: no temp files are left behind.
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	want := []string{"1700000000000000123-7.eml", "1700000000000000123-8.eml", "1700000000000000123-8.json"}
	if !reflect.DeepEqual(names, want) {
		t.Errorf("dir = %v, want %v", names, want)
	}

	if _, err := SaveSinkMessage(filepath.Join(dir, "missing"), 1, m, false); err == nil {
		t.Errorf("saving into a missing directory succeeded")
	}
}

func TestSinkLogLine(t *testing.T) {
	m := &Message{From: "f@x", Rcpts: []string{"a@x", "b@x"}, Data: []byte(testMsg("log@x"))}
	got := SinkLogLine(m, "/d/1-1.eml")
	want := "smtpsink: accepted from=<f@x> rcpts=<a@x>,<b@x> message-id=<log@x> size=" + strconv.Itoa(len(m.Data)) + " file=/d/1-1.eml"
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	noID := SinkLogLine(&Message{Rcpts: []string{"a@x"}, Data: []byte("\r\nbody")}, "")
	if !regexp.MustCompile(`from=<> rcpts=<a@x> message-id=<-> size=6 file=-$`).MatchString(noID) {
		t.Errorf("no-id line: %s", noID)
	}
}
