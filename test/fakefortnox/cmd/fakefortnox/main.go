// Command fakefortnox runs the fake Fortnox alone, for demos:
//
//	go run ./test/fakefortnox/cmd/fakefortnox -tenants 1234567,7654321
//
// Point the plugin's token_url at http://127.0.0.1:8099/oauth-v1/token and
// its reverse_proxy at http://127.0.0.1:8099.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
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
	refreshTenants := fs.String("refresh-tenants", "", "comma-separated TenantIds to issue (and print) a refresh token for")
	lifetime := fs.Duration("token-lifetime", time.Hour, "access token lifetime")
	rateLimit := fs.Int("rate-limit", 25, "/3/ requests per window per tenant (negative: off)")
	rateWindow := fs.Duration("rate-window", 5*time.Second, "rate-limit window")
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
	for _, tenant := range refreshTokenTenants {
		fmt.Printf("refresh token for tenant %s: %s\n", tenant, s.IssueRefreshToken(*clientID, tenant))
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	fmt.Println("fakefortnox stopping")
	return nil
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
