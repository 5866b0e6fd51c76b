package fortnox

import (
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"testing"
)

// fakeJWT builds an unsigned JWT-shaped token with the given payload JSON.
func fakeJWT(payload string) string {
	enc := base64.RawURLEncoding
	return enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." + enc.EncodeToString([]byte(payload)) + ".c2lnbmF0dXJl"
}

func TestResolveTenant(t *testing.T) {
	aliases := map[string]string{"acme": "1234567", "7654321": "7654321"}
	tests := []struct {
		name       string
		onlyListed bool
		fromToken  bool
		headers    map[string][]string
		want       string
		wantStatus int
		wantCode   string
	}{
		{name: "tenant id", headers: map[string][]string{"X-Fortnox-Tenant": {"1234567"}}, want: "1234567"},
		{name: "tenant id with spaces", headers: map[string][]string{"X-Fortnox-Tenant": {" 1234567 "}}, want: "1234567"},
		{name: "alias", headers: map[string][]string{"X-Fortnox-Tenant": {"acme"}}, want: "1234567"},
		{name: "alias is case sensitive", headers: map[string][]string{"X-Fortnox-Tenant": {"ACME"}}, wantStatus: 400, wantCode: "invalid_tenant"},
		{name: "missing header", wantStatus: 400, wantCode: "missing_tenant"},
		{name: "empty header", headers: map[string][]string{"X-Fortnox-Tenant": {"  "}}, wantStatus: 400, wantCode: "missing_tenant"},
		{name: "two headers", headers: map[string][]string{"X-Fortnox-Tenant": {"1", "2"}}, wantStatus: 400, wantCode: "ambiguous_tenant"},
		{name: "leading zero", headers: map[string][]string{"X-Fortnox-Tenant": {"01234567"}}, wantStatus: 400, wantCode: "invalid_tenant"},
		{name: "too long", headers: map[string][]string{"X-Fortnox-Tenant": {"1234567890123456"}}, wantStatus: 400, wantCode: "invalid_tenant"},
		{name: "not digits", headers: map[string][]string{"X-Fortnox-Tenant": {"12a4"}}, wantStatus: 400, wantCode: "invalid_tenant"},
		{name: "negative", headers: map[string][]string{"X-Fortnox-Tenant": {"-1234"}}, wantStatus: 400, wantCode: "invalid_tenant"},
		{name: "listed id allowed", onlyListed: true, headers: map[string][]string{"X-Fortnox-Tenant": {"7654321"}}, want: "7654321"},
		{name: "listed alias allowed", onlyListed: true, headers: map[string][]string{"X-Fortnox-Tenant": {"acme"}}, want: "1234567"},
		{name: "listed alias's id allowed", onlyListed: true, headers: map[string][]string{"X-Fortnox-Tenant": {"1234567"}}, want: "1234567"},
		{name: "unlisted refused", onlyListed: true, headers: map[string][]string{"X-Fortnox-Tenant": {"1111111"}}, wantStatus: 403, wantCode: "tenant_not_allowed"},
		{name: "from token", fromToken: true, headers: map[string][]string{"Authorization": {"Bearer " + fakeJWT(`{"tenantId":5550001,"clientId":"c"}`)}}, want: "5550001"},
		{name: "from token, string claim", fromToken: true, headers: map[string][]string{"Authorization": {"bearer " + fakeJWT(`{"tenantId":"5550001"}`)}}, want: "5550001"},
		{name: "header wins over token", fromToken: true, headers: map[string][]string{"X-Fortnox-Tenant": {"acme"}, "Authorization": {"Bearer " + fakeJWT(`{"tenantId":5550001}`)}}, want: "1234567"},
		{name: "token off by default", headers: map[string][]string{"Authorization": {"Bearer " + fakeJWT(`{"tenantId":5550001}`)}}, wantStatus: 400, wantCode: "missing_tenant"},
		{name: "token without claim", fromToken: true, headers: map[string][]string{"Authorization": {"Bearer " + fakeJWT(`{"sub":"x"}`)}}, wantStatus: 400, wantCode: "missing_tenant"},
		{name: "token not a JWT", fromToken: true, headers: map[string][]string{"Authorization": {"Bearer abc"}}, wantStatus: 400, wantCode: "missing_tenant"},
		{name: "token with bad claim", fromToken: true, headers: map[string][]string{"Authorization": {"Bearer " + fakeJWT(`{"tenantId":1.5}`)}}, wantStatus: 400, wantCode: "missing_tenant"},
		{name: "basic auth is not a token", fromToken: true, headers: map[string][]string{"Authorization": {"Basic dXNlcjpwYXNz"}}, wantStatus: 400, wantCode: "missing_tenant"},
		{name: "token tenant still allowlisted", fromToken: true, onlyListed: true, headers: map[string][]string{"Authorization": {"Bearer " + fakeJWT(`{"tenantId":5550001}`)}}, wantStatus: 403, wantCode: "tenant_not_allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := newTenantResolver("x-fortnox-tenant", aliases, tt.onlyListed, tt.fromToken)
			r := httptest.NewRequest(http.MethodGet, "/3/companyinformation", nil)
			for k, vs := range tt.headers {
				for _, v := range vs {
					r.Header.Add(k, v)
				}
			}
			got, err := tr.resolve(r)
			if tt.wantStatus != 0 {
				if err == nil {
					t.Fatalf("resolved %q, want status %d", got, tt.wantStatus)
				}
				if err.status != tt.wantStatus || err.code != tt.wantCode {
					t.Fatalf("got %d %s, want %d %s", err.status, err.code, tt.wantStatus, tt.wantCode)
				}
				if err.message == "" {
					t.Error("empty message")
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected refusal: %+v", err)
			}
			if got != tt.want {
				t.Errorf("tenant = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestResolveTenantDoesNotAllocate(t *testing.T) {
	tr := newTenantResolver(DefaultTenantHeader, map[string]string{"acme": "1234567"}, true, false)
	r := httptest.NewRequest(http.MethodGet, "/3/x", nil)
	r.Header.Set(DefaultTenantHeader, "acme")
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := tr.resolve(r); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("resolve allocates %.0f times per request, want 0", allocs)
	}
}
