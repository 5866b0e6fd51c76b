//go:build !linux

package redisstorage

import "os/exec"

// dieWithParent does nothing off Linux: an interrupted test run may leave
// its redis-server running there.
func dieWithParent(cmd *exec.Cmd) {}
