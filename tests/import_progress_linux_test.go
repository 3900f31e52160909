package tests

import (
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
// erases it before it prints its report. Standard output is the same
// terminal, as for someone running the command by hand.
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
	cmd.Stdout, cmd.Stderr = term, term
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	term.Close() // the child has it; reads end once the child exits
	shown, _ := io.ReadAll(controller)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("import: %v\nterminal:\n%q", err, shown)
	}

	screen := string(shown)
	report := strings.Index(screen, "imported 00000001 as ")
	if report < 0 {
		t.Fatalf("no report on the terminal:\n%q", screen)
	}
	progress := screen[:report]
	for _, want := range []string{"\rreading metadata 1/40 (2%)", "\rreading metadata 40/40 (100%)", "\rimporting 1/40 (2%)", "\rimporting 40/40 (100%)"} {
		if !strings.Contains(progress, want) {
			t.Errorf("the terminal did not show %q:\n%q", want, progress)
		}
	}
	if strings.Contains(progress, "\n") {
		t.Errorf("progress wrote a newline:\n%q", progress)
	}
	if !regexp.MustCompile("\r +\r$").MatchString(progress) {
		t.Errorf("the progress line was not erased before the report:\n%q", progress)
	}
	lines := nonEmptyLines(strings.ReplaceAll(screen[report:], "\r\n", "\n"))
	if m := importSummaryRe.FindStringSubmatch(lines[len(lines)-1]); m == nil || m[1] != "40" {
		t.Errorf("summary %q", lines[len(lines)-1])
	}
}
