package testproc

import (
	"os/exec"
	"syscall"
)

// dieWithParent makes the kernel kill cmd if the test process dies first
// (a test timeout), so that no process is left running.
func dieWithParent(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
}

// pause stops (SIGSTOP) or continues (SIGCONT) a process.
func pause(p *exec.Cmd, stop bool) error {
	if stop {
		return p.Process.Signal(syscall.SIGSTOP)
	}
	return p.Process.Signal(syscall.SIGCONT)
}
