// Package caddybin builds test/cmd/caddy-test (Caddy, the plugin and the
// test-only Redis storage module) for the multi-process tests.
package caddybin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// BuildFlags and CGO_ENABLED=0 are what ./xcaddy.sh builds with (the flags
// xcaddy v0.4.5 passes to go build), so that this build reuses the Caddy
// packages ./xcaddy.sh compiled into Go's build cache instead of compiling
// Caddy again. TestBuildFlagsAgree in the root package keeps them the same.
var BuildFlags = []string{"-ldflags", "-w -s", "-trimpath", "-tags", "nobadger,nomysql,nopgx"}

var (
	once sync.Once
	bin  string
	err  error
)

// Build builds the test binary into dir, once per test process, and
// returns its path. Multi-process tests are skipped with -short.
func Build(t testing.TB, dir string) string {
	t.Helper()
	if testing.Short() {
		t.Skip("multi-process tests are skipped with -short")
	}
	once.Do(func() {
		bin = filepath.Join(dir, "caddy-test")
		args := append(append([]string{"build"}, BuildFlags...), "-o", bin, "github.com/caddy-fortnox/caddy-fortnox/test/cmd/caddy-test")
		cmd := exec.Command("go", args...)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, cerr := cmd.CombinedOutput(); cerr != nil {
			err = fmt.Errorf("building caddy-test: %v: %s", cerr, out)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return bin
}
