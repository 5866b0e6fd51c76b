package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// -refresh-tenants with -refresh-token-dir: the demo's migration step reads
// a refresh token, valid at the fake, from dir/refresh-token-<TenantId>.
func TestRefreshTokensWrittenToDir(t *testing.T) {
	s := fakefortnox.New(fakefortnox.Options{Clients: map[string]string{"demo-client": "demo-secret"}})
	dir := filepath.Join(t.TempDir(), ".demo")
	var out bytes.Buffer
	if err := issueRefreshTokens(&out, s, "demo-client", []string{"5550003"}, dir); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "refresh-token-5550003")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	token := strings.TrimSpace(string(b))
	if !s.RefreshTokenValid(token) {
		t.Errorf("the written refresh token %q is not valid at the fake", token)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, %v: a refresh token file must be private", fi.Mode(), err)
	}
	if got := out.String(); strings.Contains(got, token) || !strings.Contains(got, path) {
		t.Errorf("printed %q: the path, not the token", got)
	}

	// Without a dir, the token is printed.
	out.Reset()
	if err := issueRefreshTokens(&out, s, "demo-client", []string{"5550004"}, ""); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "refresh token for tenant 5550004: ") {
		t.Errorf("printed %q", out.String())
	}
}

func TestTenantList(t *testing.T) {
	got, err := tenantList(" 1234567, ,7654321")
	if err != nil || strings.Join(got, ",") != "1234567,7654321" {
		t.Errorf("tenantList = %v, %v", got, err)
	}
	if _, err := tenantList("123,abc"); err == nil || !strings.Contains(err.Error(), "abc") {
		t.Errorf("a non-TenantId: %v", err)
	}
}
