package fortnox

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"gopkg.in/yaml.v3"
)

const (
	dashboardFile  = "deploy/grafana/caddy-fortnox.json"
	alertsFile     = "deploy/prometheus/alerts.yml"
	alertTestsFile = "deploy/prometheus/alerts_test.yml"
	// metricsAtStartEnv names the file TestMetricsAtStartChild writes the
	// series of a freshly started sidecar to.
	metricsAtStartEnv = "FORTNOX_TEST_METRICS_AT_START"
)

// TestMetricsAtStartChild is the child half of
// TestDashboardAndAlertsNameExportedSeries: run in a fresh test process, it
// starts a sidecar, scrapes it before any request, and writes the series
// it found. Run in the suite, it does nothing.
func TestMetricsAtStartChild(t *testing.T) {
	out := os.Getenv(metricsAtStartEnv)
	if out == "" {
		return // only the parent test runs this, in its own process
	}
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	var lines []string
	for series := range scrape(t, sc) {
		lines = append(lines, series)
	}
	sort.Strings(lines)
	if err := os.WriteFile(out, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// seriesAtStart runs TestMetricsAtStartChild in a new process (the metrics
// are process-wide: in this one, other tests have made series already) and
// returns the series a sidecar exports from its start.
func seriesAtStart(t *testing.T) []exportedSeries {
	t.Helper()
	out := filepath.Join(t.TempDir(), "series.txt")
	cmd := exec.Command(os.Args[0], "-test.run=^TestMetricsAtStartChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), metricsAtStartEnv+"="+out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the child sidecar failed: %v\n%s", err, b)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var all []exportedSeries
	s := bufio.NewScanner(f)
	for s.Scan() {
		if line := strings.TrimSpace(s.Text()); line != "" {
			all = append(all, parseSeries(line))
		}
	}
	if len(all) < 20 {
		t.Fatalf("only %d series at start: the scrape is broken", len(all))
	}
	return all
}

type exportedSeries struct {
	name   string
	labels map[string]string
}

var labelPair = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

func parseSeries(s string) exportedSeries {
	name, rest, _ := strings.Cut(s, "{")
	es := exportedSeries{name: name, labels: map[string]string{}}
	for _, m := range labelPair.FindAllStringSubmatch(rest, -1) {
		es.labels[m[1]] = m[2]
	}
	return es
}

// selector is a vector selector in a PromQL expression: a metric name and
// its label matchers.
type selector struct {
	name     string
	matchers [][3]string // label, operator, value
}

var (
	promqlMatcher = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"`)
	grafanaVar    = regexp.MustCompile(`\$\{[^}]*\}|\$__[a-z_]+|\$[a-zA-Z_]+`)
	// Aggregations may be followed by `by (...)` rather than "(": they are
	// never metric names. Keywords neither.
	promqlWords = map[string]bool{
		"sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true, "stdvar": true,
		"count": true, "count_values": true, "bottomk": true, "topk": true, "quantile": true,
		"and": true, "or": true, "unless": true, "bool": true, "offset": true, "inf": true, "nan": true,
	}
	promqlLabelLists = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true}
)

// grafanaToPromQL replaces Grafana's variables by values PromQL accepts.
func grafanaToPromQL(expr string) string {
	return grafanaVar.ReplaceAllString(expr, "5m")
}

// selectors finds the vector selectors of a PromQL expression: every
// identifier that is not a function, an aggregation, a keyword or a label
// list, with the matchers in the braces after it.
func selectors(t *testing.T, expr string) []selector {
	t.Helper()
	src := []rune(grafanaToPromQL(expr))
	var out []selector
	skipTo := func(i int, end rune) int {
		for i < len(src) && src[i] != end {
			if src[i] == '"' {
				i++
				for i < len(src) && src[i] != '"' {
					if src[i] == '\\' {
						i++
					}
					i++
				}
			}
			i++
		}
		return i
	}
	nextNonSpace := func(i int) int {
		for i < len(src) && unicode.IsSpace(src[i]) {
			i++
		}
		return i
	}
	isIdent := func(r rune, first bool) bool {
		return r == '_' || r == ':' || unicode.IsLetter(r) || (!first && unicode.IsDigit(r))
	}
	for i := 0; i < len(src); {
		r := src[i]
		switch {
		case r == '"' || r == '\'' || r == '`':
			end := r
			i++
			for i < len(src) && src[i] != end {
				if src[i] == '\\' {
					i++
				}
				i++
			}
			i++
		case r == '[':
			i = skipTo(i, ']') + 1
		case r == '{':
			t.Errorf("a selector without a metric name in %q", expr)
			i = skipTo(i, '}') + 1
		case unicode.IsDigit(r) || r == '.':
			for i < len(src) && (isIdent(src[i], false) || src[i] == '.') {
				i++ // a number or a duration (5m, 1e3)
			}
		case isIdent(r, true):
			start := i
			for i < len(src) && isIdent(src[i], false) {
				i++
			}
			word := string(src[start:i])
			j := nextNonSpace(i)
			switch {
			case promqlLabelLists[word]:
				if j < len(src) && src[j] == '(' {
					i = skipTo(j, ')') + 1
				}
			case promqlWords[strings.ToLower(word)]:
			case j < len(src) && src[j] == '(':
				// a function
			default:
				sel := selector{name: word}
				if j < len(src) && src[j] == '{' {
					end := skipTo(j, '}')
					for _, m := range promqlMatcher.FindAllStringSubmatch(string(src[j+1:end]), -1) {
						sel.matchers = append(sel.matchers, [3]string{m[1], m[2], m[3]})
					}
					i = end + 1
				}
				out = append(out, sel)
			}
		default:
			i++
		}
	}
	return out
}

// dashboardExprs returns the expressions of the dashboard's panels, by
// panel title.
func dashboardExprs(t *testing.T) map[string][]string {
	t.Helper()
	var d struct {
		UID    string `json:"uid"`
		Panels []struct {
			ID         int    `json:"id"`
			Type       string `json:"type"`
			Title      string `json:"title"`
			Datasource *struct {
				UID string `json:"uid"`
			} `json:"datasource"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(readFileBytes(t, dashboardFile), &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if d.UID == "" {
		t.Errorf("%s has no uid", dashboardFile)
	}
	exprs := map[string][]string{}
	ids := map[int]bool{}
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("%s: panel id %d twice", dashboardFile, p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("%s: panel %q does not use the datasource variable", dashboardFile, p.Title)
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: panel %q has no query", dashboardFile, p.Title)
		}
		for _, tg := range p.Targets {
			exprs[p.Title] = append(exprs[p.Title], tg.Expr)
		}
	}
	return exprs
}

type alertRule struct {
	Alert       string            `yaml:"alert"`
	Expr        string            `yaml:"expr"`
	Annotations map[string]string `yaml:"annotations"`
}

func alertRules(t *testing.T) []alertRule {
	t.Helper()
	var f struct {
		Groups []struct {
			Rules []alertRule `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(readFileBytes(t, alertsFile), &f); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	var rules []alertRule
	for _, g := range f.Groups {
		rules = append(rules, g.Rules...)
	}
	return rules
}

func readFileBytes(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Every series the dashboard and the alert rules name is exported by a
// sidecar from its start, with the label values they match on; the rules
// pass `promtool check rules` and their unit tests (`promtool test
// rules`), and the dashboard's queries parse.
func TestDashboardAndAlertsNameExportedSeries(t *testing.T) {
	exprs := map[string]string{} // where -> expression
	for title, es := range dashboardExprs(t) {
		for i, e := range es {
			exprs[fmt.Sprintf("dashboard panel %q query %d", title, i+1)] = e
		}
	}
	rules := alertRules(t)
	for _, r := range rules {
		exprs["alert "+r.Alert] = r.Expr
	}
	if len(rules) < 5 || len(exprs) < 20 {
		t.Fatalf("%d alerts and %d expressions: the files were not read", len(rules), len(exprs))
	}

	exported := seriesAtStart(t)
	names := map[string]int{}
	for where, expr := range exprs {
		sels := selectors(t, expr)
		if len(sels) == 0 {
			t.Errorf("%s names no series: %s", where, expr)
		}
		for _, sel := range sels {
			names[sel.name]++
			checkExported(t, where, sel, exported)
		}
	}
	for _, want := range []string{"caddy_fortnox_requests_total", "caddy_fortnox_chains_needing_reconnect",
		"caddy_fortnox_redis_call_duration_seconds_bucket", "caddy_fortnox_upstream_429_total", "caddy_fortnox_rate_limit_wait_seconds_bucket"} {
		if names[want] == 0 {
			t.Errorf("neither the dashboard nor the alerts use %s: the extraction is broken", want)
		}
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool is not on PATH: install it (Debian/Ubuntu: apt-get install prometheus; or a Prometheus release's promtool) to check deploy/prometheus/alerts.yml and its unit tests")
	}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(promtool, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("check", "rules", alertsFile)
	run("test", "rules", alertTestsFile)

	// The dashboard's queries, as recording rules, so that promtool parses them.
	type recording struct {
		Record string `yaml:"record"`
		Expr   string `yaml:"expr"`
	}
	var recs []recording
	var wheres []string
	for where := range exprs {
		if strings.HasPrefix(where, "dashboard") {
			wheres = append(wheres, where)
		}
	}
	sort.Strings(wheres)
	for i, where := range wheres {
		recs = append(recs, recording{Record: fmt.Sprintf("dashboard:query_%d", i), Expr: grafanaToPromQL(exprs[where])})
	}
	b, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": recs}}})
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "dashboard-rules.yml")
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
	run("check", "rules", file)
}

// checkExported fails unless some series at start has sel's name and each
// of its = and =~ matchers (each alternative of a=~"x|y" on its own).
func checkExported(t *testing.T, where string, sel selector, exported []exportedSeries) {
	t.Helper()
	has := func(label, value string, re *regexp.Regexp) bool {
		for _, s := range exported {
			if s.name != sel.name {
				continue
			}
			v, ok := s.labels[label]
			if label == "" || (ok && ((re == nil && v == value) || (re != nil && re.MatchString(v)))) {
				return true
			}
		}
		return false
	}
	if !has("", "", nil) {
		t.Errorf("%s names %s, which a sidecar does not export at start", where, sel.name)
		return
	}
	for _, m := range sel.matchers {
		label, op, value := m[0], m[1], m[2]
		switch {
		case op == "=":
			if !has(label, value, nil) {
				t.Errorf("%s names %s{%s=%q}, which a sidecar does not export at start", where, sel.name, label, value)
			}
		case op == "=~" && regexp.MustCompile(`^[A-Za-z0-9_|]+$`).MatchString(value):
			for _, alt := range strings.Split(value, "|") {
				if !has(label, alt, nil) {
					t.Errorf("%s names %s{%s=~%q}, but %s=%q is not exported at start", where, sel.name, label, value, label, alt)
				}
			}
		case op == "=~":
			if !has(label, "", regexp.MustCompile("^(?:"+value+")$")) {
				t.Errorf("%s names %s{%s=~%q}, which matches no series at start", where, sel.name, label, value)
			}
		}
	}
}

// The extraction of series from PromQL finds selectors and their matchers,
// and nothing else.
func TestPromQLSelectors(t *testing.T) {
	for expr, want := range map[string]string{
		`sum by (le, grant) (rate(a_bucket{x="1",y=~"p|q"}[$__rate_interval]))`:              `a_bucket{x="1",y=~"p|q"}`,
		`histogram_quantile(0.9, sum without (i) (rate(b[5m]))) > 0.5 * scalar(max(c))`:      `b c`,
		"(sum(rate(d[5m])) > 0)\nor\n(sum(rate(e{error=~\"f|g\"}[5m])) > 0) unless on (x) h": `d e{error=~"f|g"} h`,
		`max by (account_type) (i) > 0 and bool 1e3`:                                         `i`,
		`sum(increase(j{k="a}b"}[1h] offset 5m))`:                                            `j{k="a}b"}`,
	} {
		var got []string
		for _, s := range selectors(t, expr) {
			g := s.name
			if len(s.matchers) > 0 {
				var ms []string
				for _, m := range s.matchers {
					ms = append(ms, fmt.Sprintf("%s%s%q", m[0], m[1], m[2]))
				}
				g += "{" + strings.Join(ms, ",") + "}"
			}
			got = append(got, g)
		}
		if strings.Join(got, " ") != want {
			t.Errorf("%s: got %q, want %q", expr, strings.Join(got, " "), want)
		}
	}
}

// Every alert links a runbook section of docs/operations.md, and its unit
// tests see it both fire and stay quiet.
func TestAlertRunbooksAndTests(t *testing.T) {
	ops := string(readFileBytes(t, "docs/operations.md"))
	anchors := map[string]bool{}
	for _, line := range strings.Split(ops, "\n") {
		if strings.HasPrefix(line, "#") {
			anchors[githubAnchor(strings.TrimLeft(line, "# "))] = true
		}
	}
	var tests struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `yaml:"alertname"`
				ExpAlerts []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	if err := yaml.Unmarshal(readFileBytes(t, alertTestsFile), &tests); err != nil {
		t.Fatal(err)
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	for _, tc := range tests.Tests {
		for _, at := range tc.AlertRuleTest {
			if len(at.ExpAlerts) > 0 {
				fires[at.Alertname] = true
			} else {
				quiet[at.Alertname] = true
			}
		}
	}
	const prefix = "https://github.com/caddy-fortnox/caddy-fortnox/blob/main/docs/operations.md#"
	for _, r := range alertRules(t) {
		url := r.Annotations["runbook_url"]
		if !strings.HasPrefix(url, prefix) || !anchors[strings.TrimPrefix(url, prefix)] {
			t.Errorf("alert %s: runbook_url %q is not a section of docs/operations.md", r.Alert, url)
		}
		if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
			t.Errorf("alert %s lacks a summary or description", r.Alert)
		}
		if !fires[r.Alert] || !quiet[r.Alert] {
			t.Errorf("alert %s: %s tests it firing: %v, staying quiet: %v", r.Alert, alertTestsFile, fires[r.Alert], quiet[r.Alert])
		}
	}
}

// githubAnchor is the anchor GitHub gives a heading.
func githubAnchor(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(strings.TrimSpace(heading)) {
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r) || r == '-' || r == '_':
			b.WriteRune(r)
		case r == ' ':
			b.WriteRune('-')
		}
	}
	return b.String()
}

// The series the dashboard and the alerts read count what happened over
// real HTTP: answers by who gave them and class, the sidecar's error
// answers by code, a chain that needs reconnecting (and no longer does
// once a new refresh token is stored), max_wait.
func TestOpsMetrics(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc := startSidecar(t, fake, "max_wait 3s")
	before := scrape(t, sc)

	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	if status, body, _ := sc.get("/nothing", "1234567"); status != http.StatusNotFound {
		t.Fatalf("Fortnox's 404: %d %s", status, body)
	}
	if status, body, _ := sc.get("/3/companyinformation", ""); status != http.StatusBadRequest {
		t.Fatalf("no tenant: %d %s", status, body)
	}
	// A refresh-token chain someone else spent: its tenant must reconnect.
	sc.putRefreshToken("5550003", fake.IssueRefreshToken(testClientID, "5550003"))
	useRefreshToken(t, fake, sc.storedRecord("5550003").RefreshToken)
	advance(fake, time.Hour)
	if status, body, _ := sc.get("/3/companyinformation", "5550003"); status != http.StatusForbidden {
		t.Fatalf("rejected chain: %d %s", status, body)
	}
	after := scrape(t, sc)
	for series, want := range map[string]float64{
		`caddy_fortnox_requests_total{answered_by="fortnox",class="2xx"}`:                            1,
		`caddy_fortnox_requests_total{answered_by="fortnox",class="4xx"}`:                            1,
		`caddy_fortnox_requests_total{answered_by="sidecar",class="4xx"}`:                            2,
		`caddy_fortnox_requests_total{answered_by="sidecar",class="5xx"}`:                            0,
		`caddy_fortnox_error_answers_total{error="missing_tenant"}`:                                  1,
		`caddy_fortnox_error_answers_total{error="refresh_token_rejected"}`:                          1,
		`caddy_fortnox_chains_needing_reconnect{account_type="service"}`:                             1,
		`caddy_fortnox_chains_needing_reconnect{account_type="user"}`:                                0,
		`caddy_fortnox_token_requests_total{grant="refresh_token",outcome="refresh_token_rejected"}`: 1,
	} {
		if got := after[series] - before[series]; got != want {
			t.Errorf("%s went up by %v, want %v", series, got, want)
		}
	}
	if got := after["caddy_fortnox_rate_limit_max_wait_seconds"]; got != 3 {
		t.Errorf("rate_limit_max_wait_seconds = %v, want 3", got)
	}

	// A new refresh token: the chain is whole again.
	sc.putRefreshToken("5550003", fake.IssueRefreshToken(testClientID, "5550003"))
	if status, body, _ := sc.get("/3/companyinformation", "5550003"); status != http.StatusOK {
		t.Fatalf("after a new refresh token: %d %s", status, body)
	}
	if got := scrape(t, sc)[`caddy_fortnox_chains_needing_reconnect{account_type="service"}`]; got != before[`caddy_fortnox_chains_needing_reconnect{account_type="service"}`] {
		t.Errorf("chains_needing_reconnect = %v after the new refresh token", got)
	}

	// Fortnox cannot be reached: reverse_proxy's 502 is the sidecar's answer.
	sc.upstream = fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	const proxyErrors = `caddy_fortnox_requests_total{answered_by="sidecar",class="5xx"}`
	before = scrape(t, sc)
	if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusBadGateway {
		t.Fatalf("Fortnox unreachable: %d %s", status, body)
	}
	if got := scrape(t, sc)[proxyErrors] - before[proxyErrors]; got != 1 {
		t.Errorf("%s went up by %v for reverse_proxy's 502, want 1", proxyErrors, got)
	}
}

// In cluster mode, the Redis calls a request makes are timed.
func TestRedisCallDurations(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "1234567")
	sc, _ := redisSidecar(t, fake, "")
	before := scrape(t, sc)
	for range 3 {
		if status, body, _ := sc.get("/3/companyinformation", "1234567"); status != http.StatusOK {
			t.Fatalf("%d %s", status, body)
		}
	}
	after := scrape(t, sc)
	// A turn in the shared limiter per request, and the token shared once.
	if got := after["caddy_fortnox_redis_call_duration_seconds_count"] - before["caddy_fortnox_redis_call_duration_seconds_count"]; got < 3 {
		t.Errorf("%v Redis calls timed for 3 requests", got)
	}
	if got := after["caddy_fortnox_redis_errors_total"] - before["caddy_fortnox_redis_errors_total"]; got != 0 {
		t.Errorf("%v Redis errors", got)
	}
}
