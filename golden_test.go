package fortnox

import (
	"bytes"
	"encoding/json"
	"os"
	"regexp"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// The README shows what each bundled Caddyfile adapts to; this keeps it true.
func TestGoldenAdapt(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, file := range []string{"Caddyfile.example", "demo/Caddyfile"} {
		t.Run(file, func(t *testing.T) {
			block := regexp.MustCompile("(?s)<!-- golden: " + regexp.QuoteMeta(file) + " -->\n```json\n(.*?)```").FindSubmatch(readme)
			if block == nil {
				t.Fatalf("README.md has no golden JSON block for %s", file)
			}
			input, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(input, map[string]any{"filename": file})
			if err != nil {
				t.Fatalf("adapt: %v", err)
			}
			for _, w := range warnings {
				t.Errorf("adapt warning: %s:%d: %s", w.File, w.Line, w.Message)
			}
			var pretty bytes.Buffer
			if err := json.Indent(&pretty, adapted, "", "\t"); err != nil {
				t.Fatal(err)
			}
			if got, want := pretty.String()+"\n", string(block[1]); got != want {
				t.Errorf("%s adapts to:\n%s\nbut README.md shows:\n%s", file, got, want)
			}
		})
	}
}
