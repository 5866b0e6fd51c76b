//go:build ignore

// testsummary reads `go test -json` on standard input and prints what a
// person needs: each package's result lines (and what its TestMain printed,
// such as SKIP lines), the full output of every failed test, the skipped
// tests with their reasons, and a closing line
//
//	tests: 412 passed, 0 failed, 0 skipped
//
// With -no-skips (CI), a skipped test is a failure: CI must run every test.
// It exits 1 when a test or package failed, or when a test skipped under
// -no-skips.
//
//	go test -json ./... | go run .ci/testsummary.go -no-skips
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
)

type event struct {
	Action     string
	Package    string
	Test       string
	Output     string
	ImportPath string // build-output, build-fail
}

func main() {
	noSkips := flag.Bool("no-skips", false, "count a skipped test as a failure (CI)")
	flag.Parse()

	var (
		passed, failed, skipped int
		failedPackages          []string
		skips                   []string
		// Output of each running top-level test (with its subtests), kept
		// until it passes (dropped) or fails (printed).
		running = map[string]*strings.Builder{}
		// The last output line of each (sub)test, for a skip's reason.
		lastLine = map[string]string{}
	)
	key := func(e event) string { return e.Package + " " + topLevel(e.Test) }

	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 64<<20)
	for in.Scan() {
		line := in.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			fmt.Printf("%s\n", line) // not an event: pass it on
			continue
		}
		switch {
		case e.Action == "build-output":
			fmt.Print(e.Output)
		case e.Action == "build-fail":
			failedPackages = append(failedPackages, e.ImportPath+" (build failed)")
		case e.Test == "":
			// The package's own lines: TestMain's output, ok/FAIL.
			switch e.Action {
			case "output":
				if e.Output != "PASS\n" {
					fmt.Print(e.Output)
				}
			case "fail":
				failedPackages = append(failedPackages, e.Package)
				// A test still running when the package died (a panic,
				// a timeout) never reported: show what it printed.
				for k, b := range running {
					if strings.HasPrefix(k, e.Package+" ") {
						fmt.Print(b.String())
						delete(running, k)
					}
				}
			}
		default:
			k := key(e)
			switch e.Action {
			case "run":
				if running[k] == nil {
					running[k] = &strings.Builder{}
				}
			case "output":
				if b := running[k]; b != nil {
					b.WriteString(e.Output)
				}
				if t := strings.TrimSpace(e.Output); t != "" && !strings.HasPrefix(t, "--- SKIP") && !strings.HasPrefix(t, "=== ") {
					lastLine[e.Package+" "+e.Test] = t
				}
			case "pass":
				passed++
			case "fail":
				failed++
			case "skip":
				skipped++
				skips = append(skips, fmt.Sprintf("%s %s: %s", e.Package, e.Test, lastLine[e.Package+" "+e.Test]))
			}
			if e.Test == topLevel(e.Test) {
				switch e.Action {
				case "pass", "skip":
					delete(running, k)
				case "fail":
					if b := running[k]; b != nil {
						fmt.Print(b.String())
					}
					delete(running, k)
				}
			}
		}
	}
	if err := in.Err(); err != nil {
		fmt.Println("testsummary: reading go test -json:", err)
		os.Exit(1)
	}

	if len(skips) > 0 {
		sort.Strings(skips)
		if *noSkips {
			fmt.Printf("\n%d skipped tests, and CI must run every test:\n", len(skips))
		} else {
			fmt.Printf("\n%d skipped tests:\n", len(skips))
		}
		for _, s := range skips {
			fmt.Println("  SKIP", s)
		}
	}
	if len(failedPackages) > 0 {
		fmt.Printf("\nfailed packages: %s\n", strings.Join(failedPackages, ", "))
	}
	fmt.Printf("\ntests: %d passed, %d failed, %d skipped\n", passed, failed, skipped)
	if failed > 0 || len(failedPackages) > 0 || (*noSkips && skipped > 0) {
		os.Exit(1)
	}
}

// topLevel is the top-level test of a (sub)test name.
func topLevel(test string) string {
	if i := strings.IndexByte(test, '/'); i >= 0 {
		return test[:i]
	}
	return test
}
