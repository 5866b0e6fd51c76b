//go:build !linux

package testproc

import "os/exec"

// dieWithParent does nothing off Linux: an interrupted run may leave its
// processes running there.
func dieWithParent(cmd *exec.Cmd) {}
