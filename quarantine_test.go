package fortnox

import (
	"bytes"
	"context"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// The quarantine is stored, not held in memory: it survives a Caddy stop
// and start on the same storage, is listed on its tenant's row by the admin
// API and `caddy fortnox tenants`, and is released after the restart.
func TestQuarantineSurvivesARestart(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	foreign := fake.IssueUserRefreshToken(testClientID, "7654321", annaUser)
	status, body := sc.admin(http.MethodPut, "/fortnox/tenants/1234567/accounts/anna/refresh_token", `{"refresh_token":"`+foreign+`"}`)
	if status != http.StatusConflict || !strings.Contains(body, `"tenant_mismatch"`) {
		t.Fatalf("PUT of 7654321's chain for anna of 1234567: %d %s", status, body)
	}
	q := sc.quarantine()
	if len(q) != 1 {
		t.Fatalf("quarantine: %+v", q)
	}
	id := q[0].ID

	caddyStop(t)
	advance(fake, time.Hour)
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	row := findTenant(sc.tenants(), "7654321")
	if row == nil || len(row.Quarantined) != 1 {
		t.Fatalf("after the restart, tenant 7654321's row: %+v", row)
	}
	if e := row.Quarantined[0]; e.ID != id || e.Account != "anna" || e.HandedOverFor != "1234567" || e.At.IsZero() {
		t.Errorf("after the restart: %+v", e)
	}

	// `caddy fortnox tenants`: a QUARANTINED section; --json the API's JSON.
	addr := strings.TrimPrefix(sc.adminURL, "http://")
	var out bytes.Buffer
	if err := runTenants(context.Background(), &out, tenantsFlags{address: addr}, clk.Now()); err != nil {
		t.Fatal(err)
	}
	table := out.String()
	at := row.Quarantined[0].At.UTC().Format(time.RFC3339)
	sections := strings.SplitN(table, "\nQUARANTINED: 1 refresh token(s)", 2)
	if len(sections) != 2 || !strings.Contains(sections[1], "\nID  ") ||
		!strings.Contains(sections[1], "\n"+id+"  7654321  anna     1234567          "+at+" (1h ago)\n") {
		t.Errorf("table:\n%s", table)
	}
	out.Reset()
	if err := runTenants(context.Background(), &out, tenantsFlags{address: addr, json: true}, clk.Now()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), `"quarantined":[{"id":"`+id+`","account":"anna","handed_over_for":"1234567","at":"`+at) {
		t.Errorf("--json: %s", out.String())
	}
	for _, text := range []string{table, out.String()} {
		if strings.Contains(text, foreign) || strings.Contains(text, "eyJ") || regexpHex40.MatchString(text) {
			t.Errorf("a token was printed: %s", text)
		}
	}

	status, body = sc.admin(http.MethodPost, "/fortnox/quarantine/"+id+"/release", "")
	if status != http.StatusOK || body != `{"account":"anna","tenant":"7654321"}`+"\n" {
		t.Fatalf("release after the restart: %d %s", status, body)
	}
	if status, body, _ := sc.asAccount(http.MethodGet, "/3/invoices", "7654321", "anna"); status != http.StatusOK || echoOf(t, body).UserID != annaUser {
		t.Errorf("anna of 7654321 after the release: %d %s", status, body)
	}
	if _, err := os.Stat(sc.accountRecordPath("1234567", "anna")); err == nil {
		t.Error("the chain was stored under the account it was handed over for")
	}
	if n := fake.TokenErrors("invalid_grant"); n != 0 {
		t.Errorf("%d invalid_grant", n)
	}
}

func TestPrintTenantsQuarantined(t *testing.T) {
	const body = `[
  {"tenant":"7654321","mode":"none","has_refresh_token":false,"accounts":[],
   "quarantined":[{"id":"20260301T080000-0123456789ab","account":"","handed_over_for":"1234567","at":"2026-03-01T08:00:00Z"},
                  {"id":"20260301T085000-ba9876543210","account":"bo","handed_over_for":"5550001","at":"2026-03-01T08:50:00Z"}]},
  {"tenant":"1234567","mode":"client_credentials","quarantined":[]}
]`
	var out bytes.Buffer
	if err := printTenants(&out, []byte(body), tenantsNow); err != nil {
		t.Fatal(err)
	}
	const want = `TENANT   MODE                EXPIRES  LAST ERROR  REFRESH TOKEN
1234567  client_credentials  -        -           -
7654321  none                -        -           no

QUARANTINED: 2 refresh token(s) handed over for another tenant or user than their own, served under no name.
Release one to its own tenant with POST /fortnox/quarantine/<id>/release, or delete it with DELETE /fortnox/quarantine/<id>.
ID                            TENANT   ACCOUNT            HANDED OVER FOR  AT
20260301T080000-0123456789ab  7654321  (service account)  1234567          2026-03-01T08:00:00Z (1h ago)
20260301T085000-ba9876543210  7654321  bo                 5550001          2026-03-01T08:50:00Z (10m ago)
`
	if got := out.String(); got != want {
		t.Errorf("table:\n%s\nwant:\n%s", got, want)
	}
	// Without quarantined tokens, no section.
	out.Reset()
	if err := printTenants(&out, []byte(`[{"tenant":"1","mode":"none","quarantined":[]}]`), tenantsNow); err != nil || strings.Contains(out.String(), "QUARANTINED") {
		t.Errorf("no quarantine: %v\n%s", err, out.String())
	}
}
