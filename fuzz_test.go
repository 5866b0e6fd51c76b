package fortnox

import (
	"bytes"
	"context"
	"crypto/cipher"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
)

// Tenant resolution never panics; what it accepts is a TenantId (a listed
// one with only_listed_tenants); an alias the config accepts resolves to
// its TenantId; two tenant headers are refused.
func FuzzResolveTenant(f *testing.F) {
	for _, seed := range []string{"1234567", "acme", " 1234567 ", "", "0", "01", "-1", "١٢٣", "1234567\x00", strings.Repeat("9", 40), "acme\n", "ACME"} {
		f.Add(seed, "acme", false, false)
		f.Add(seed, "beta", true, false)
	}
	for _, alias := range []string{"5555555", "1234567", "7654321", " x", "x ", "", "kund ett", "\x00", "acme"} {
		f.Add(alias, alias, true, false)
		f.Add(alias, alias, false, true)
	}
	f.Fuzz(func(t *testing.T, value, alias string, onlyListed, twice bool) {
		tenants := map[string]string{"acme": "1234567", "7654321": "7654321"}
		aliasAccepted := tokens.ValidateTenantNames(map[string]string{alias: "5555555"}) == nil && tenants[alias] == ""
		if aliasAccepted {
			tenants[alias] = "5555555"
		}
		if err := tokens.ValidateTenantNames(tenants); err != nil {
			t.Fatalf("the config's own names are refused: %v", err)
		}
		tr := newTenantResolver(DefaultTenantHeader, tenants, onlyListed, true)
		r := httptest.NewRequest(http.MethodGet, "/3/x", nil)
		r.Header[DefaultTenantHeader] = []string{value}
		if twice {
			r.Header[DefaultTenantHeader] = append(r.Header[DefaultTenantHeader], value)
		}
		r.Header["Authorization"] = []string{"Bearer " + value}
		tenant, err := tr.resolve(r)
		if twice {
			if err == nil || err.status != http.StatusBadRequest {
				t.Fatalf("two tenant headers gave %q, %v; want 400", tenant, err)
			}
			return
		}
		if err != nil {
			if err.status != http.StatusBadRequest && err.status != http.StatusForbidden {
				t.Fatalf("status %d", err.status)
			}
			if aliasAccepted && value == alias {
				t.Fatalf("alias %q is refused: %s", alias, err.code)
			}
			return
		}
		if !tokens.ValidTenantID(tenant) {
			t.Fatalf("resolved %q from %q: not a TenantId", tenant, value)
		}
		if _, listed := tr.listed[tenant]; onlyListed && !listed {
			t.Fatalf("resolved unlisted %q from %q with only_listed_tenants", tenant, value)
		}
		if aliasAccepted && value == alias && tenant != "5555555" {
			t.Fatalf("alias %q resolved to %q, want 5555555", alias, tenant)
		}
	})
}

// The JWT payload decoder never panics; a tenant it returns is a TenantId.
func FuzzTenantFromToken(f *testing.F) {
	for _, seed := range []string{
		fakeJWT(`{"tenantId":1234567}`), fakeJWT(`{"tenantId":"1234567"}`), fakeJWT(`{"tenantId":1e3}`),
		fakeJWT(`{"tenantId":-5}`), fakeJWT(`{"tenantId":null}`), fakeJWT(`[]`), fakeJWT(`{"tenantId":12345678901234567890}`),
		"a.b.c", "..", ".", "", "eyJ.eyJ.", "x.eyJ0ZW5hbnRJZCI6MX0=.y", "x.eyJ0ZW5hbnRJZCI6MX0.y",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, token string) {
		tenant, err := tokens.TenantFromToken(token)
		if err == nil && !tokens.ValidTenantID(tenant) {
			t.Fatalf("tenant %q from %q", tenant, token)
		}
		if _, err := tokens.TenantFromBearer("Bearer " + token); err == nil && len(token) > tokens.MaxJWTLength {
			t.Fatal("decoded a token over the length limit")
		}
	})
}

// cannedAnswer is a RoundTripper that answers every request the same way
// without a network, so the fuzzer runs the whole client (x/oauth2 and our
// checks around it) at full speed.
type cannedAnswer struct {
	status   int
	header   http.Header
	body     []byte
	requests int
}

func (c *cannedAnswer) RoundTrip(r *http.Request) (*http.Response, error) {
	c.requests++
	if r.Body != nil {
		r.Body.Close()
	}
	return &http.Response{StatusCode: c.status, Header: c.header.Clone(), Body: io.NopCloser(bytes.NewReader(c.body)), Request: r}, nil
}

// Token endpoint answers, through x/oauth2: never a panic; one request
// each; a success comes from a 2xx and has a usable token and a sane
// lifetime; a failure is classified (5xx and 429 as unavailable) and
// repeats no body.
func FuzzParseTokenAnswer(f *testing.F) {
	for _, seed := range []struct {
		status int
		body   string
	}{
		{200, `{"access_token":"abc","token_type":"bearer","expires_in":3600}`},
		{200, `{"access_token":"abc","expires_in":"3600"}`},
		{200, `{"access_token":"abc","expires_in":-1}`},
		{200, `{"access_token":"abc","expires_in":1e308}`},
		{200, `{"access_token":"abc","expires_in":"NaN"}`},
		{200, `{"access_token":"abc","expires_in":null}`},
		{200, `{"access_token":"abc","expires_in":99999999999}`},
		{200, `{"access_token":"","token_type":"bearer"}`},
		{200, `{"access_token":"a b"}`},
		{200, `<html></html>`},
		{200, `access_token=abc&expires_in=3600`},
		{400, `{"error":"invalid_grant","error_description":"Invalid refresh token"}`},
		{401, `{"error":"invalid_client","error_description":"The client credentials are invalid"}`},
		{503, ``},
		{429, `{}`},
		{302, `{"access_token":"abc"}`},
		{200, `{"access_token":"abc","error":"x"}`},
		{400, `{"error":"` + strings.Repeat("x", 500) + `","error_description":"` + strings.Repeat("\x01", 300) + `"}`},
		// Bodies at the size limit (the transport reads at most maxTokenAnswer+1 bytes).
		{200, `{"access_token":"` + strings.Repeat("a", tokens.MaxTokenAnswer) + `"}`},
		{503, `<html>` + strings.Repeat("x", tokens.MaxTokenAnswer) + `</html>`},
		{429, strings.Repeat(" ", tokens.MaxTokenAnswer+1)},
		{400, `{"error":"invalid_grant","error_description":"` + strings.Repeat("y", tokens.MaxTokenAnswer) + `"}`},
	} {
		for _, ct := range []string{"application/json", "text/plain", "text/html"} {
			f.Add(seed.status, []byte(seed.body), "120", ct)
		}
	}
	f.Fuzz(func(t *testing.T, status int, body []byte, retryAfter, contentType string) {
		status = 100 + int(uint(status)%900) // what a server can send: three digits
		canned := &cannedAnswer{status: status, body: body, header: http.Header{}}
		canned.header.Set("Retry-After", retryAfter)
		canned.header.Set("Content-Type", contentType)
		c := tokens.NewTokenClient("https://apps.fortnox.example/oauth-v1/token", clk)
		c.Transport = canned
		a, err := c.Refresh(context.Background(), tokens.Credentials{ClientID: "id", ClientSecret: "secret"}, "sent-refresh-token")
		if canned.requests != 1 {
			t.Fatalf("%d requests, want 1", canned.requests)
		}
		if err != nil {
			terr, ok := err.(*tokens.Error)
			if !ok {
				t.Fatalf("not a tokenError: %v", err)
			}
			if terr.Failure < tokens.FailNoConsent || terr.Failure > tokens.FailStorage {
				t.Fatalf("unclassified failure %d", terr.Failure)
			}
			// 5xx and 429 mean "try later" (503 + Retry-After for the app),
			// whatever the body, unless it names the client as invalid.
			if (status == http.StatusTooManyRequests || status >= 500) && terr.Failure != tokens.FailUnavailable && terr.Failure != tokens.FailBadClient {
				t.Fatalf("status %d classified as failure %d: %v", status, terr.Failure, terr)
			}
			if len(terr.Description) > tokens.MaxDescription+len("…") {
				t.Fatalf("description of %d bytes", len(terr.Description))
			}
			if text := terr.Error() + terr.Advice("1"); len(body) >= 8 && strings.Contains(text, string(body)) {
				t.Fatalf("error text repeats the body: %s", text)
			}
			return
		}
		if a.AccessToken == "" || strings.ContainsAny(a.AccessToken, " \t\r\n") {
			t.Fatalf("unusable token %q", a.AccessToken)
		}
		if a.Lifetime < tokens.MinTokenLifetime || a.Lifetime > tokens.MaxTokenLifetime {
			t.Fatalf("lifetime %v", a.Lifetime)
		}
		if status < 200 || status > 299 {
			t.Fatalf("a token from a %d answer", status)
		}
		if a.RefreshToken == "sent-refresh-token" {
			t.Fatal("the refresh token sent came back as a new one")
		}
	})
}

// Stored records: decoding never panics; garbage is an error, not a record;
// what is encoded decodes to the same record, with and without a key.
func FuzzDecodeRecord(f *testing.F) {
	aead, err := tokens.ParseEncryptionKey(strings.Repeat("ab", 32))
	if err != nil {
		f.Fatal(err)
	}
	plain := &tokens.Records{ClientID: "c"}
	sealed := &tokens.Records{ClientID: "c", Keys: []cipher.AEAD{aead}}
	rec := &tokens.Record{Tenant: "1234567", ClientID: "c", Mode: "refresh_token", RefreshToken: "0123456789abcdef0123456789abcdef01234567"}
	for _, rs := range []*tokens.Records{plain, sealed} {
		raw, err := rs.Encode(tokens.RecordKey("c", tokens.Subject{Tenant: "1234567"}), rec)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
	}
	for _, s := range []string{`{}`, `null`, `[]`, `{"encrypted":"AES-256-GCM","data":""}`, `{"encrypted":"AES-256-GCM","data":"AAAA"}`, `{"encrypted":"ROT13"}`, `{"tenant":5}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		key := tokens.RecordKey("c", tokens.Subject{Tenant: "1234567"})
		for _, rs := range []*tokens.Records{plain, sealed} {
			got, err := rs.Decode(key, raw)
			if err != nil {
				continue
			}
			if got == nil {
				t.Fatal("nil record without an error")
			}
			again, err := rs.Encode(key, got)
			if err != nil {
				t.Fatal(err)
			}
			back, err := rs.Decode(key, again)
			if err != nil || back.RefreshToken != got.RefreshToken || back.Tenant != got.Tenant {
				t.Fatalf("round trip lost the record: %v", err)
			}
		}
	})
}
