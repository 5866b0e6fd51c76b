//go:build !linux

package testproc

import (
	"errors"
	"os/exec"
)

// dieWithParent does nothing off Linux: an interrupted run may leave its
// processes running there.
func dieWithParent(cmd *exec.Cmd) {}

// pause is not done off Linux.
func pause(p *exec.Cmd, stop bool) error {
	return errors.New("pausing a process is done on Linux only")
}
