package metrics

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// series counts the series of each family in reg.
func series(t *testing.T, reg *prometheus.Registry) map[string]int {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := map[string]int{}
	for _, f := range families {
		n[f.GetName()] = len(f.GetMetric())
	}
	return n
}

func value(c prometheus.Counter) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}

// The series the dashboard and the alerts name exist at 0 from the start,
// and all are named caddy_fortnox_*.
func TestLabelSetsExistFromTheStart(t *testing.T) {
	KnowErrorCodes([]string{"missing_tenant"})
	KnowTokenOutcomes([]string{"refresh_token"}, []string{"ok", "token_endpoint_unavailable"})
	reg := prometheus.NewRegistry()
	for _, c := range Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	got := series(t, reg)
	for name, want := range map[string]int{
		"caddy_fortnox_requests_total":            12, // 2 answered_by × 6 classes
		"caddy_fortnox_refusals_total":            len(refusalKinds),
		"caddy_fortnox_error_answers_total":       1,
		"caddy_fortnox_token_requests_total":      2,
		"caddy_fortnox_replays_total":             4,
		"caddy_fortnox_token_cache_lookups_total": 2,
	} {
		if got[name] != want {
			t.Errorf("%s has %d series, want %d", name, got[name], want)
		}
	}
	before := value(ErrorAnswers.WithLabelValues("missing_tenant"))
	ErrorAnswered("missing_tenant")
	if got := value(ErrorAnswers.WithLabelValues("missing_tenant")); got != before+1 {
		t.Errorf("missing_tenant answers = %v, want %v", got, before+1)
	}
	before = value(Requests.WithLabelValues("sidecar", "5xx"))
	SidecarAnswered(503)
	if got := value(Requests.WithLabelValues("sidecar", "5xx")); got != before+1 {
		t.Errorf("sidecar 5xx = %v, want %v", got, before+1)
	}
}

func TestCountingAllocatesNothing(t *testing.T) {
	KnowErrorCodes([]string{"missing_tenant"})
	if n := testing.AllocsPerRun(100, func() {
		CacheHit.Inc()
		FortnoxAnswered(200)
		ErrorAnswered("missing_tenant")
	}); n != 0 {
		t.Fatalf("counting allocates %v times, want 0", n)
	}
}
