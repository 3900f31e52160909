package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// TestMain lets the signal test re-execute this test binary as the real
// command, avoiding a separate go build.
func TestMain(m *testing.M) {
	if os.Getenv("SMTPSINK_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// lineReader delivers stdout lines through a channel so tests can wait
// for specific output without sleeping.
func lineReader(r io.Reader) <-chan string {
	ch := make(chan string, 64)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			ch <- sc.Text()
		}
	}()
	return ch
}

func nextLine(t *testing.T, ctx context.Context, lines <-chan string, prefix string) string {
	t.Helper()
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("output ended while waiting for %q", prefix)
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %q", prefix)
		}
	}
}

// transact sends one message and returns the RCPT replies (nil = accepted)
// and the DATA error.
func transact(t *testing.T, addr string, rcpts []string, id string) (map[string]error, error) {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("sender@x", nil); err != nil {
		t.Fatal(err)
	}
	res := make(map[string]error)
	ok := 0
	for _, r := range rcpts {
		res[r] = c.Rcpt(r, nil)
		if res[r] == nil {
			ok++
		}
	}
	if ok == 0 {
		return res, nil
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(w, "Message-Id: <"+id+">\r\nSubject: x\r\n\r\nhello\r\n"); err != nil {
		t.Fatal(err)
	}
	return res, w.Close()
}

func code(err error) int {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

func TestRun(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	modeFile := filepath.Join(dir, "mode")
	addrFile := filepath.Join(dir, "addr")

	pr, pw := io.Pipe()
	lines := lineReader(pr)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- run(runCtx, []string{
			"-listen", "127.0.0.1:0", "-dir", out, "-addr-file", addrFile,
			"-defer-first", "1", "-reject-rcpt", "bad@x", "-mode-file", modeFile,
		}, pw, io.Discard)
		pw.Close()
	}()

	addr := strings.TrimPrefix(nextLine(t, ctx, lines, "smtpsink: listening on "), "smtpsink: listening on ")
	if b, err := os.ReadFile(addrFile); err != nil || strings.TrimSpace(string(b)) != addr {
		t.Errorf("addr file = %q, %v; want %q", b, err, addr)
	}

	// First attempt: good@x deferred by -defer-first, bad@x rejected.
	res, _ := transact(t, addr, []string{"good@x", "bad@x"}, "m1@x")
	if code(res["good@x"]) != 451 || code(res["bad@x"]) != 550 {
		t.Errorf("first attempt: %v", res)
	}
	// Retry is accepted and stored before the 250 reply.
	res, dataErr := transact(t, addr, []string{"good@x"}, "m2@x")
	if res["good@x"] != nil || dataErr != nil {
		t.Fatalf("retry: %v %v", res, dataErr)
	}
	line := nextLine(t, ctx, lines, "smtpsink: accepted ")
	if !strings.Contains(line, "rcpts=<good@x>") || !strings.Contains(line, "message-id=<m2@x>") {
		t.Errorf("log line: %s", line)
	}
	path := line[strings.LastIndex(line, "file=")+len("file="):]
	if b, err := os.ReadFile(path); err != nil || !strings.Contains(string(b), "Message-Id: <m2@x>") {
		t.Errorf("stored file %s: %q %v", path, b, err)
	}

	// Switching the mode file at runtime.
	if err := os.WriteFile(modeFile, []byte("defer\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if res, _ := transact(t, addr, []string{"good@x"}, "m3@x"); code(res["good@x"]) != 451 {
		t.Errorf("mode defer: %v", res)
	}
	if err := os.WriteFile(modeFile, []byte("accept\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if res, dataErr := transact(t, addr, []string{"good@x"}, "m4@x"); res["good@x"] != nil || dataErr != nil {
		t.Errorf("mode accept: %v %v", res, dataErr)
	}
	nextLine(t, ctx, lines, "smtpsink: accepted ")

	stop()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	nextLine(t, ctx, lines, "smtpsink: stopped")

	ents, _ := filepath.Glob(filepath.Join(out, "*"))
	if len(ents) != 2 {
		t.Errorf("stored files: %v", ents)
	}
}

func TestRunUsageErrors(t *testing.T) {
	for _, args := range [][]string{{"-mode", "nope"}, {"stray"}, {"-defer-first", "-3"}} {
		if err := run(context.Background(), args, io.Discard, io.Discard); !errors.Is(err, errUsage) {
			t.Errorf("run(%q) = %v, want usage error", args, err)
		}
	}
}

// TestSignal runs the command as a process and stops it with SIGTERM.
func TestSignal(t *testing.T) {
	ctx := testCtx(t)
	cmd := exec.CommandContext(ctx, os.Args[0], "-listen", "127.0.0.1:0", "-dir", t.TempDir())
	cmd.Env = append(os.Environ(), "SMTPSINK_RUN_MAIN=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := lineReader(stdout)
	addr := strings.TrimPrefix(nextLine(t, ctx, lines, "smtpsink: listening on "), "smtpsink: listening on ")
	if res, dataErr := transact(t, addr, []string{"a@x"}, "sig@x"); res["a@x"] != nil || dataErr != nil {
		t.Fatalf("send: %v %v", res, dataErr)
	}
	nextLine(t, ctx, lines, "smtpsink: accepted ")

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	nextLine(t, ctx, lines, "smtpsink: stopped")
	for range lines {
		// Drain so Wait is not racing the reader.
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("exit: %v", err)
	}
}
