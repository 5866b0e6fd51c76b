package fortnox

import (
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The walls of ARCHITECTURE.md hold: the root (Caddy glue) imports no Redis
// client, only internal/redisstate; internal/tokens imports neither Caddy
// nor a Redis client; internal/redisstate never imports the glue.
func TestPackagesKeepTheirWalls(t *testing.T) {
	const module = "github.com/caddy-fortnox/caddy-fortnox"
	for _, wall := range []struct {
		dir       string
		forbidden []string
	}{
		{".", []string{"github.com/redis/", "github.com/bsm/redislock"}},
		{"internal/tokens", []string{"github.com/caddyserver/caddy", "github.com/redis/", "github.com/bsm/redislock", module + "/internal/redisstate"}},
		// rueidis is measured by test/bench only (docs/cluster.md, "Which Redis client").
		{"internal/redisstate", []string{"github.com/caddyserver/caddy", "github.com/redis/rueidis"}},
	} {
		files, err := filepath.Glob(filepath.Join(wall.dir, "*.go"))
		if err != nil || len(files) == 0 {
			t.Fatalf("%s: no Go files (%v)", wall.dir, err)
		}
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			file, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
			if err != nil {
				t.Fatal(err)
			}
			for _, imp := range file.Imports {
				path, _ := strconv.Unquote(imp.Path.Value)
				for _, bad := range wall.forbidden {
					if path == module || strings.HasPrefix(path, bad) {
						t.Errorf("%s imports %s: see ARCHITECTURE.md for what each package may import", f, path)
					}
				}
			}
		}
	}
}
