package testproc

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// debianPackage is the package that installs each binary the tests run
// (.ci/run installs them).
var debianPackage = map[string]string{
	"redis-server":   "redis-server",
	"redis-cli":      "redis-tools",
	"redis-sentinel": "redis-sentinel",
	"chromium":       "chromium",
}

func installHint(name string) string {
	pkg := debianPackage[name]
	if pkg == "" {
		pkg = name
	}
	return "apt-get install " + pkg
}

// Binary finds name on PATH, or skips the test (fails it in CI, see InCI).
func Binary(t testing.TB, name string) string {
	t.Helper()
	bin, err := exec.LookPath(name)
	if err != nil {
		if InCI() {
			t.Fatalf("%s is not on PATH, and CI must run every test: .ci/run installs it (%s)", name, installHint(name))
		}
		t.Skipf("%s is not on PATH (%s)", name, installHint(name))
	}
	return bin
}

// CheckBinaries is for a TestMain whose package has tests that need the
// named binaries (redis-server, redis-cli). With all of them on PATH it
// does nothing and returns true. Otherwise it announces that group's tests
// are skipped (see AnnounceSkip) and returns whether that is allowed:
// false in CI, and TestMain then exits with 1 before running anything.
func CheckBinaries(group string, names ...string) bool {
	var missing []string
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			missing = append(missing, fmt.Sprintf("%s is not on PATH (%s)", name, installHint(name)))
		}
	}
	if len(missing) == 0 {
		return true
	}
	return AnnounceSkip(group, strings.Join(missing, "; "))
}

// InCI reports whether the tests run in CI, where nothing may be skipped:
// CI set to anything but "" "0" or "false" (.ci/run sets CI=true).
func InCI() bool {
	v := strings.ToLower(strings.TrimSpace(os.Getenv("CI")))
	return v != "" && v != "0" && v != "false"
}

// AnnounceSkip prints one line saying that group's tests are skipped and
// why, and returns whether skipping is allowed. `go test ./...` shows
// nothing of a passing package's output, so a skip would look green: the
// line also goes to the terminal (/dev/tty) when there is one. In CI
// nothing may skip: the line says FAIL and AnnounceSkip returns false.
func AnnounceSkip(group, reason string) (allowed bool) {
	return announceSkip(os.Stdout, openTerminal, InCI(), group, reason)
}

func announceSkip(stdout io.Writer, terminal func() io.WriteCloser, ci bool, group, reason string) bool {
	if ci {
		fmt.Fprintf(stdout, "FAIL %s: %s, and CI must run every test (.ci/run installs what the tests need)\n", group, reason)
		return false
	}
	line := fmt.Sprintf("SKIP %s: %s\n", group, reason)
	fmt.Fprint(stdout, line)
	if tty := terminal(); tty != nil {
		fmt.Fprint(tty, line)
		tty.Close()
	}
	return true
}

// openTerminal opens the controlling terminal when the test binary's
// standard output is not already one (go test ./... reads the output
// through a pipe); nil when there is none, as in CI.
func openTerminal() io.WriteCloser {
	if fi, err := os.Stdout.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		return nil // the line on stdout is already on the terminal
	}
	tty, err := os.OpenFile("/dev/tty", os.O_WRONLY, 0)
	if err != nil {
		return nil
	}
	return tty
}
