package fortnox

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// mintToken gets a real access token for tenant from the fake.
func mintToken(t *testing.T, fake *fakefortnox.Server, tenant string) string {
	t.Helper()
	fake.GrantConsent(testClientID, tenant)
	a, err := newTokenClient(fake.TokenURL()).clientCredentials(context.Background(), credentials{testClientID, testClientSecret}, tenant)
	if err != nil {
		t.Fatal(err)
	}
	return a.accessToken
}

func TestCommandTenantID(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{})
	tok := mintToken(t, fake, "1234567")
	for _, tc := range []struct{ arg, stdin string }{
		{tok, ""},
		{"-", tok + "\n"},
		{"-", "Bearer " + tok},
	} {
		var out bytes.Buffer
		if err := printTenantID(&out, strings.NewReader(tc.stdin), tc.arg); err != nil {
			t.Fatal(err)
		}
		got := out.String()
		for _, want := range []string{"tenantId:  1234567\n", "clientId:  " + testClientID, "expires:", "valid for"} {
			if !strings.Contains(got, want) {
				t.Errorf("output lacks %q:\n%s", want, got)
			}
		}
		if strings.Contains(got, tok) || strings.Contains(got, tok[len(tok)-20:]) {
			t.Error("the output holds the token")
		}
	}
	for _, bad := range []struct{ arg, want string }{
		{"not-a-token", "not a JWT"},
		{"a.%%%.c", "not base64url"},
		{fakeJWT(`{"clientId":"x"}`), "no tenantId claim"},
		{fakeJWT(`{"tenantId":"abc"}`), "not a TenantId"},
		{"-", "no token given"},
	} {
		err := printTenantID(&bytes.Buffer{}, strings.NewReader(""), bad.arg)
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: error %v, want %q", bad.arg, err, bad.want)
		}
	}
}

func TestCommandCompanyInfo(t *testing.T) {
	fake := startFake(t, fakefortnox.Options{})
	tok := mintToken(t, fake, "7654321")
	var out bytes.Buffer
	if err := printCompanyInfo(context.Background(), &out, strings.NewReader(""), tok, fake.URL()); err != nil {
		t.Fatal(err)
	}
	if out.String() != "DatabaseNumber (TenantId): 7654321\n" {
		t.Errorf("output %q", out.String())
	}
	if err := printCompanyInfo(context.Background(), &out, strings.NewReader(""), tok, "http://api.example.com"); err == nil || !strings.Contains(err.Error(), "must be an https URL") {
		t.Errorf("plain http to another host: %v", err)
	}
	err := printCompanyInfo(context.Background(), &out, strings.NewReader(""), fakeJWT(`{"tenantId":1}`), fake.URL())
	if err == nil || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), "not valid") {
		t.Errorf("forged token: %v", err)
	}
}
