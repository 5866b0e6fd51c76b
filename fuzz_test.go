package fortnox

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// Tenant resolution never panics, and what it accepts is a TenantId.
func FuzzResolveTenant(f *testing.F) {
	for _, seed := range []string{"1234567", "acme", " 1234567 ", "", "0", "01", "-1", "١٢٣", "1234567\x00", strings.Repeat("9", 40), "acme\n", "ACME"} {
		f.Add(seed, false)
		f.Add(seed, true)
	}
	f.Fuzz(func(t *testing.T, value string, onlyListed bool) {
		tr := newTenantResolver(DefaultTenantHeader, map[string]string{"acme": "1234567", "7654321": "7654321"}, onlyListed, true)
		r := httptest.NewRequest(http.MethodGet, "/3/x", nil)
		r.Header[DefaultTenantHeader] = []string{value}
		r.Header["Authorization"] = []string{"Bearer " + value}
		tenant, err := tr.resolve(r)
		if err != nil {
			if err.status != 400 && err.status != 403 {
				t.Fatalf("status %d", err.status)
			}
			return
		}
		if !validTenantID(tenant) {
			t.Fatalf("resolved %q from %q: not a TenantId", tenant, value)
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
		tenant, err := tenantFromToken(token)
		if err == nil && !validTenantID(tenant) {
			t.Fatalf("tenant %q from %q", tenant, token)
		}
		if _, err := tenantFromBearer("Bearer " + token); err == nil && len(token) > maxJWTLength {
			t.Fatal("decoded a token over the length limit")
		}
	})
}

// Token endpoint answers: never a panic; a success has a usable token and
// a sane lifetime; a failure is classified and repeats no body.
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
		{200, `{"access_token":"","token_type":"bearer"}`},
		{200, `{"access_token":"a b"}`},
		{200, `<html></html>`},
		{400, `{"error":"invalid_grant","error_description":"Invalid refresh token"}`},
		{401, `{"error":"invalid_client","error_description":"The client credentials are invalid"}`},
		{503, ``},
		{429, `{}`},
		{302, `{"access_token":"abc"}`},
		{200, `{"access_token":"abc","error":"x"}`},
		{400, `{"error":"` + strings.Repeat("x", 500) + `","error_description":"` + strings.Repeat("\x01", 300) + `"}`},
	} {
		f.Add(seed.status, []byte(seed.body), "120")
	}
	f.Fuzz(func(t *testing.T, status int, body []byte, retryAfter string) {
		a, err := parseTokenAnswer(status, retryAfter, body)
		if err != nil {
			terr, ok := err.(*tokenError)
			if !ok {
				t.Fatalf("not a tokenError: %v", err)
			}
			if terr.failure < failNoConsent || terr.failure > failStorage {
				t.Fatalf("unclassified failure %d", terr.failure)
			}
			if len(terr.description) > maxDescription+len("…") {
				t.Fatalf("description of %d bytes", len(terr.description))
			}
			_ = terr.Error()
			_ = terr.advice("1")
			return
		}
		if a.accessToken == "" || strings.ContainsAny(a.accessToken, " \t\r\n") {
			t.Fatalf("unusable token %q", a.accessToken)
		}
		if a.lifetime < minTokenLifetime || a.lifetime > maxTokenLifetime {
			t.Fatalf("lifetime %v", a.lifetime)
		}
	})
}

// Stored records: decoding never panics; garbage is an error, not a record;
// what is encoded decodes to the same record, with and without a key.
func FuzzDecodeRecord(f *testing.F) {
	aead, err := parseEncryptionKey(strings.Repeat("ab", 32))
	if err != nil {
		f.Fatal(err)
	}
	plain := &recordStore{clientID: "c"}
	sealed := &recordStore{clientID: "c", aead: aead}
	rec := &tokenRecord{Tenant: "1234567", ClientID: "c", Mode: "refresh_token", RefreshToken: "0123456789abcdef0123456789abcdef01234567"}
	for _, rs := range []*recordStore{plain, sealed} {
		raw, err := rs.encode(recordKey("c", "1234567"), rec)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
	}
	for _, s := range []string{`{}`, `null`, `[]`, `{"encrypted":"AES-256-GCM","data":""}`, `{"encrypted":"AES-256-GCM","data":"AAAA"}`, `{"encrypted":"ROT13"}`, `{"tenant":5}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		key := recordKey("c", "1234567")
		for _, rs := range []*recordStore{plain, sealed} {
			got, err := rs.decode(key, raw)
			if err != nil {
				continue
			}
			if got == nil {
				t.Fatal("nil record without an error")
			}
			again, err := rs.encode(key, got)
			if err != nil {
				t.Fatal(err)
			}
			back, err := rs.decode(key, again)
			if err != nil || back.RefreshToken != got.RefreshToken || back.Tenant != got.Tenant {
				t.Fatalf("round trip lost the record: %v", err)
			}
		}
	})
}
