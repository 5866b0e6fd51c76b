package fortnox

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/prometheus/client_golang/prometheus"
)

// docs/configuration.md shows what each bundled Caddyfile adapts to; this
// keeps it true.
func TestGoldenAdapt(t *testing.T) {
	const doc = "docs/configuration.md"
	unsetEnv(t, "CADDY_ADMIN", "FORTNOX_DEMO_PORT", "FORTNOX_FAKE_PORT", "FORTNOX_CONNECT_PORT") // the Caddyfiles' {$…} defaults
	page, err := os.ReadFile(doc)
	if err != nil {
		t.Fatal(err)
	}
	for _, file := range []string{"Caddyfile.example", "demo/Caddyfile"} {
		t.Run(file, func(t *testing.T) {
			block := regexp.MustCompile("(?s)<!-- golden: " + regexp.QuoteMeta(file) + " -->\n```json\n(.*?)```").FindSubmatch(page)
			if block == nil {
				t.Fatalf("%s has no golden JSON block for %s", doc, file)
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
				t.Errorf("%s adapts to:\n%s\nbut %s shows:\n%s", file, got, doc, want)
			}
		})
	}
}

// The figures the docs repeat must agree (issue 11 found 3.2 KB against
// 3.3 KB per tenant, and "about a minute" against "about 80 s" for the load
// comparison). Each figure is read from every place that states it.
func TestDocsAgree(t *testing.T) {
	files := []string{"README.md", "deploy/kubernetes/sidecar.yaml"}
	docs, err := filepath.Glob("docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, docs...)
	text := map[string]string{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		text[f] = string(b)
	}

	// found collects each distinct value of a figure and where it is.
	type figure struct {
		name      string
		re        *regexp.Regexp
		minPlaces int
	}
	agree := func(fig figure) string {
		where := map[string][]string{}
		places := 0
		for _, f := range files {
			for _, m := range fig.re.FindAllStringSubmatch(text[f], -1) {
				where[m[1]] = append(where[m[1]], f)
				places++
			}
		}
		if places < fig.minPlaces {
			t.Errorf("%s: found in %d places, want at least %d: the pattern %q no longer finds it", fig.name, places, fig.minPlaces, fig.re)
		}
		if len(where) > 1 {
			t.Errorf("%s disagrees: %v", fig.name, where)
		}
		for v := range where {
			return v
		}
		return ""
	}

	// Memory per cached tenant: every "N.N KB" (the token itself is "3 KB").
	kb := agree(figure{"memory per cached tenant", regexp.MustCompile(`(\d+\.\d+) KB`), 4})
	// ... and what 10,000 tenants take.
	mb := agree(figure{"memory of 10,000 tenants", regexp.MustCompile(`10,000 tenants(?:[^.]|\.\d)*?about (\d+) MB`), 2})
	if k, err := strconv.ParseFloat(kb, 64); err == nil {
		if m, err := strconv.Atoi(mb); err == nil && int(k*10+0.5) != m {
			t.Errorf("10,000 tenants at %s KB take about %d MB, but the docs say %s MB", kb, int(k*10+0.5), mb)
		}
	}
	// How long the load comparison runs.
	agree(figure{"the load comparison's duration", regexp.MustCompile(`(?m)test/bench\b.*?\babout (a minute|\d+ ?s|\d+ minutes?)\b`), 3})
}

// Every option of the four handlers has its JSON name in
// docs/configuration.md, and every metric is in docs/operations.md: a new
// option or metric is not done until it is documented.
func TestDocsCoverEveryOptionAndMetric(t *testing.T) {
	config, err := os.ReadFile("docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []any{Handler{}, Connect{}, Webhook{}, Handover{}} {
		typ := reflect.TypeOf(v)
		for i := 0; i < typ.NumField(); i++ {
			name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
			if name == "" || name == "-" || !typ.Field(i).IsExported() {
				continue
			}
			if !bytes.Contains(config, []byte("`"+name+"`")) {
				t.Errorf("docs/configuration.md does not document %s's JSON field `%s`", typ.Name(), name)
			}
		}
	}

	ops, err := os.ReadFile("docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	if err := registerMetrics(reg); err != nil {
		t.Fatal(err)
	}
	descs := make(chan *prometheus.Desc, 100)
	go func() {
		reg.Describe(descs)
		close(descs)
	}()
	fqName := regexp.MustCompile(`fqName: "([^"]+)"`)
	n := 0
	for d := range descs {
		m := fqName.FindStringSubmatch(d.String())
		if m == nil {
			t.Fatalf("no name in %s", d)
		}
		n++
		if !bytes.Contains(ops, []byte("`"+m[1]+"`")) {
			t.Errorf("docs/operations.md does not document the metric `%s`", m[1])
		}
	}
	if n < 5 {
		t.Errorf("only %d metrics registered: the test proves little", n)
	}
}
