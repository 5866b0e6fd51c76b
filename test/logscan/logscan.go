// Package logscan finds tokens and secrets in log files, for the tests
// that prove none is ever logged.
package logscan

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
)

// Patterns match what must never be logged: Fortnox access tokens (JWTs),
// refresh tokens (40 hex characters) and the given secrets.
func Patterns(secrets ...string) []*regexp.Regexp {
	ps := []*regexp.Regexp{
		regexp.MustCompile(`eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}`),
		regexp.MustCompile(`(^|[^0-9a-f])[0-9a-f]{40}([^0-9a-f]|$)`),
	}
	for _, s := range secrets {
		ps = append(ps, regexp.MustCompile(regexp.QuoteMeta(s)))
	}
	return ps
}

// Files reads every line of the files (missing files are skipped) and
// returns how many it read, or an error naming the first line that holds a
// token or one of the secrets.
func Files(paths []string, secrets ...string) (int, error) {
	patterns := Patterns(secrets...)
	lines := 0
	for _, path := range paths {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			lines++
			for _, p := range patterns {
				if p.MatchString(sc.Text()) {
					f.Close()
					return lines, fmt.Errorf("%s: a log line matches %s: %.300s", filepath.Base(path), p, sc.Text())
				}
			}
		}
		f.Close()
	}
	return lines, nil
}
