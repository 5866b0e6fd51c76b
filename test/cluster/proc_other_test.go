//go:build !linux

package cluster

import "os/exec"

// dieWithParent does nothing off Linux: an interrupted run may leave its
// sidecars running there.
func dieWithParent(cmd *exec.Cmd) {}
