package tests

import (
	"os/exec"
	"syscall"
)

// setProcAttr makes the kernel kill maddy if the test process dies first
// (e.g. on a test timeout panic), so no server outlives its test run.
func setProcAttr(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
