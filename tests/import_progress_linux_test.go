package tests

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// openPTY opens a pseudo-terminal pair: the controller, which reads what
// is written to the terminal, and the terminal itself.
func openPTY(t *testing.T) (controller, term *os.File) {
	t.Helper()
	controller, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	fd := int(controller.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		controller.Close()
		t.Fatalf("unlocking the pseudo-terminal: %v", err)
	}
	n, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN)
	if err != nil {
		controller.Close()
		t.Fatalf("naming the pseudo-terminal: %v", err)
	}
	term, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		controller.Close()
		t.Skipf("opening the pseudo-terminal: %v", err)
	}
	t.Cleanup(func() { controller.Close(); term.Close() })
	return controller, term
}

// TestImportProgressOnTerminal: with standard error a terminal, import
// shows its progress there on one line redrawn in place (no newlines), and
// erases it before the summary on standard output.
func TestImportProgressOnTerminal(t *testing.T) {
	t.Parallel()
	p := params{Dir: t.TempDir(), SMTPPort: 1, SinkPort: 2}
	cfg := writeConfig(t, p)
	src := filepath.Join(t.TempDir(), "remote_queue")
	writeMaddyQueue(t, src, 40)
	controller, term := openPTY(t)

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, maddyBin, "--config", cfg, "spool", "import", "--from", src)
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, term
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	term.Close() // the child has it; reads end once the child exits
	shown, _ := io.ReadAll(controller)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("import: %v\nstdout:\n%s\nterminal:\n%q", err, stdout.String(), shown)
	}

	screen := string(shown)
	for _, want := range []string{"\rreading metadata 1/40 (2%)", "\rreading metadata 40/40 (100%)", "\rimporting 1/40 (2%)", "\rimporting 40/40 (100%)"} {
		if !strings.Contains(screen, want) {
			t.Errorf("the terminal did not show %q:\n%q", want, screen)
		}
	}
	if strings.ContainsAny(screen, "\n") {
		t.Errorf("progress wrote a newline:\n%q", screen)
	}
	if !regexp.MustCompile("\r +\r$").MatchString(screen) {
		t.Errorf("the progress line was not erased at the end:\n%q", screen)
	}
	lines := nonEmptyLines(stdout.String())
	if m := importSummaryRe.FindStringSubmatch(lines[len(lines)-1]); m == nil || m[1] != "40" {
		t.Errorf("summary %q", lines[len(lines)-1])
	}
}
