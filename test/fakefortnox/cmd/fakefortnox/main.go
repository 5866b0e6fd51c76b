// Command fakefortnox runs the fake Fortnox alone, for demos:
//
//	go run ./test/fakefortnox/cmd/fakefortnox -tenants 1234567,7654321
//	go run ./test/fakefortnox/cmd/fakefortnox -refresh-tenants 5550003 -refresh-token-dir .demo
//
// The second issues a refresh token for tenant 5550003, which has no
// service-account consent (as a customer of an integration that still runs
// on refresh tokens), and writes it to .demo/refresh-token-5550003 for the
// migration step: PUT /fortnox/tenants/5550003/refresh_token.
//
// Point the plugin's token_url at http://127.0.0.1:8099/oauth-v1/token and
// its reverse_proxy at http://127.0.0.1:8099.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

func main() {
	err := run(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakefortnox:", err)
		os.Exit(2)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("fakefortnox", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:8099", "listen address")
	clientID := fs.String("client-id", "demo-client", "the integration's client id")
	clientSecret := fs.String("client-secret", "demo-secret", "the integration's client secret")
	tenants := fs.String("tenants", "1234567,7654321", "comma-separated TenantIds with a service-account consent")
	refreshTenants := fs.String("refresh-tenants", "", "comma-separated TenantIds to issue a refresh token for (printed, or written to -refresh-token-dir)")
	refreshTokenDir := fs.String("refresh-token-dir", "", "write each refresh token of -refresh-tenants to <dir>/refresh-token-<TenantId> instead of printing it")
	lifetime := fs.Duration("token-lifetime", time.Hour, "access token lifetime")
	rateLimit := fs.Int("rate-limit", 25, "/3/ requests per window per tenant (negative: off)")
	rateWindow := fs.Duration("rate-window", 5*time.Second, "rate-limit window")
	authorizePage := fs.String("authorize-page", "", `companies the authorize page offers, "TenantId=Name,…": a person chooses the company and user and approves or denies (default: approve at once as 1234567, user 1)`)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	consentTenants, err := tenantList(*tenants)
	if err != nil {
		return fmt.Errorf("-tenants: %w", err)
	}
	refreshTokenTenants, err := tenantList(*refreshTenants)
	if err != nil {
		return fmt.Errorf("-refresh-tenants: %w", err)
	}

	s := fakefortnox.New(fakefortnox.Options{
		Clients:       map[string]string{*clientID: *clientSecret},
		TokenLifetime: *lifetime,
		RateLimit:     *rateLimit,
		RateWindow:    *rateWindow,
	})
	for _, tenant := range consentTenants {
		s.GrantConsent(*clientID, tenant)
	}
	if *authorizePage != "" {
		companies, err := companyList(*authorizePage)
		if err != nil {
			return fmt.Errorf("-authorize-page: %w", err)
		}
		s.SetAuthorizePage(companies)
	}
	if err := s.Listen(*addr); err != nil {
		return err
	}
	defer s.Close()

	consents := strings.Join(consentTenants, ",")
	if consents == "" {
		consents = "none"
	}
	fmt.Printf("fakefortnox listening on %s (token URL %s, client_id %s, service-account consent for tenants: %s)\n",
		s.URL(), s.TokenURL(), *clientID, consents)
	if err := issueRefreshTokens(os.Stdout, s, *clientID, refreshTokenTenants, *refreshTokenDir); err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	fmt.Println("fakefortnox stopping")
	return nil
}

// issueRefreshTokens issues a refresh token of clientID for each tenant
// and prints it, or writes it to dir/refresh-token-<tenant> when dir is set.
func issueRefreshTokens(out io.Writer, s *fakefortnox.Server, clientID string, tenants []string, dir string) error {
	for _, tenant := range tenants {
		token := s.IssueRefreshToken(clientID, tenant)
		if dir == "" {
			fmt.Fprintf(out, "refresh token for tenant %s: %s\n", tenant, token)
			continue
		}
		path, err := writeRefreshToken(dir, tenant, token)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "refresh token for tenant %s written to %s\n", tenant, path)
	}
	return nil
}

// writeRefreshToken writes token to dir/refresh-token-<tenant>, readable
// by its owner only, and returns the file's path.
func writeRefreshToken(dir, tenant, token string) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("-refresh-token-dir: %w", err)
	}
	path := filepath.Join(dir, "refresh-token-"+tenant)
	if err := os.WriteFile(path, []byte(token+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("-refresh-token-dir: %w", err)
	}
	return path, nil
}

// tenantList splits a comma-separated list of TenantIds.
func tenantList(list string) ([]string, error) {
	var tenants []string
	for _, t := range strings.Split(list, ",") {
		t = strings.TrimSpace(t)
		if t == "" {
			continue
		}
		if !isDigits(t) {
			return nil, errors.New("not a TenantId: " + t)
		}
		tenants = append(tenants, t)
	}
	return tenants, nil
}

func isDigits(s string) bool {
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return s != "" && s[0] != '0'
}

// companyList parses "1234567=Demo AB,7654321=Exempel AB".
func companyList(s string) ([]fakefortnox.Company, error) {
	var out []fakefortnox.Company
	for _, part := range strings.Split(s, ",") {
		id, name, _ := strings.Cut(strings.TrimSpace(part), "=")
		if _, err := tenantList(id); err != nil || id == "" {
			return nil, fmt.Errorf("%q is not TenantId=Name", part)
		}
		if name == "" {
			name = "Company " + id
		}
		out = append(out, fakefortnox.Company{TenantID: id, Name: name})
	}
	return out, nil
}
