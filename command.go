package fortnox

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "fortnox",
		Usage: "tenant-id <token|-> | company-info [--api <url>] <token|->",
		Short: "Learn a Fortnox customer's TenantId from a token",
		Long: `
Helpers for moving an integration to the caddy-fortnox sidecar.

  caddy fortnox tenant-id <token|->
      Decodes a Fortnox access token (no signature check: only Fortnox can)
      and prints its tenantId and other non-secret claims. "-" reads the
      token from standard input, which keeps it out of your shell history.

  caddy fortnox company-info [--api https://api.fortnox.se] <token|->
      Asks Fortnox's /3/companyinformation (or /3/settings/company) with the
      token and prints DatabaseNumber, which is the TenantId.

The token itself is never printed.`,
		CobraFunc: func(cmd *cobra.Command) {
			tenantID := &cobra.Command{
				Use:   "tenant-id <token|->",
				Short: "Print the tenantId and other claims of an access token",
				Args:  cobra.ExactArgs(1),
				RunE: func(c *cobra.Command, args []string) error {
					return printTenantID(c.OutOrStdout(), os.Stdin, args[0])
				},
			}
			var api string
			companyInfo := &cobra.Command{
				Use:   "company-info [--api <url>] <token|->",
				Short: "Ask Fortnox for the DatabaseNumber (TenantId) of a token's company",
				Args:  cobra.ExactArgs(1),
				RunE: func(c *cobra.Command, args []string) error {
					ctx, cancel := context.WithTimeout(c.Context(), 30*time.Second)
					defer cancel()
					return printCompanyInfo(ctx, c.OutOrStdout(), os.Stdin, args[0], api)
				},
			}
			companyInfo.Flags().StringVar(&api, "api", "https://api.fortnox.se", "Fortnox API base URL")
			cmd.AddCommand(tenantID, companyInfo)
		},
	})
}

// readTokenArg returns the token given as an argument, or read from in
// when the argument is "-". A leading "Bearer " is dropped.
func readTokenArg(in io.Reader, arg string) (string, error) {
	tok := arg
	if arg == "-" {
		line, err := bufio.NewReader(io.LimitReader(in, maxJWTLength+1)).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("reading the token from standard input: %w", err)
		}
		tok = line
	}
	tok = strings.TrimSpace(tok)
	if len(tok) > 7 && strings.EqualFold(tok[:7], "bearer ") {
		tok = strings.TrimSpace(tok[7:])
	}
	if tok == "" {
		return "", errors.New("no token given")
	}
	return tok, nil
}

// printTenantID prints the non-secret claims of an access token.
func printTenantID(out io.Writer, in io.Reader, arg string) error {
	tok, err := readTokenArg(in, arg)
	if err != nil {
		return err
	}
	c, err := decodeJWTClaims(tok)
	if err != nil {
		return fmt.Errorf("cannot read the token: %v (expected a Fortnox access token: three base64url parts joined by dots)", err)
	}
	tenant, err := c.tenant()
	if err != nil {
		return fmt.Errorf("cannot read the token: %v", err)
	}
	fmt.Fprintf(out, "tenantId:  %s\n", tenant)
	printClaim(out, "clientId", c.ClientID)
	printClaim(out, "userId", strings.Trim(string(c.UserID), `"`))
	printClaim(out, "sub", c.Sub)
	printClaim(out, "scope", c.Scope)
	printClaim(out, "issuer", c.Iss)
	if c.Iat > 0 {
		fmt.Fprintf(out, "issued:    %s\n", time.Unix(c.Iat, 0).UTC().Format(time.RFC3339))
	}
	if c.Exp > 0 {
		exp := time.Unix(c.Exp, 0).UTC()
		state := "expired"
		if left := time.Until(exp); left > 0 {
			state = "valid for " + left.Round(time.Second).String()
		}
		fmt.Fprintf(out, "expires:   %s (%s)\n", exp.Format(time.RFC3339), state)
	}
	return nil
}

func printClaim(out io.Writer, name, value string) {
	if value != "" && value != "null" {
		fmt.Fprintf(out, "%-10s %s\n", name+":", value)
	}
}

// printCompanyInfo asks Fortnox for the DatabaseNumber of the token's company.
func printCompanyInfo(ctx context.Context, out io.Writer, in io.Reader, arg, api string) error {
	tok, err := readTokenArg(in, arg)
	if err != nil {
		return err
	}
	api = strings.TrimRight(api, "/")
	u, err := url.Parse(api)
	if err != nil || u.Host == "" || (u.Scheme != "https" && !(u.Scheme == "http" && isLoopback(u.Hostname()))) {
		return fmt.Errorf("--api %q must be an https URL (plain http only on 127.0.0.1 or localhost): the token must not cross a network in clear", api)
	}
	var lastErr error
	for _, path := range []string{"/3/companyinformation", "/3/settings/company"} {
		number, err := databaseNumber(ctx, api+path, tok)
		if err == nil {
			fmt.Fprintf(out, "DatabaseNumber (TenantId): %s\n", number)
			return nil
		}
		lastErr = fmt.Errorf("%s: %w", path, err)
	}
	return lastErr
}

func isLoopback(host string) bool {
	return host == "127.0.0.1" || host == "localhost" || host == "::1"
}

// commandClient is the HTTP client of the commands: bounded, no redirects
// (a redirect would carry the token elsewhere).
var commandClient = &http.Client{
	Timeout:       30 * time.Second,
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// databaseNumber GETs one of Fortnox's company endpoints and reads
// DatabaseNumber, as a number or a string.
func databaseNumber(ctx context.Context, url, token string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept", "application/json")
	resp, err := commandClient.Do(req)
	if err != nil {
		return "", transportCause(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		hint := ""
		if resp.StatusCode == http.StatusUnauthorized {
			hint = " (the token is expired or not valid)"
		}
		return "", fmt.Errorf("Fortnox answered %d%s", resp.StatusCode, hint)
	}
	var v struct {
		CompanyInformation struct{ DatabaseNumber json.RawMessage }
		CompanySettings    struct{ DatabaseNumber json.RawMessage }
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return "", errors.New("the answer is not JSON")
	}
	raw := v.CompanyInformation.DatabaseNumber
	if len(raw) == 0 {
		raw = v.CompanySettings.DatabaseNumber
	}
	number := strings.Trim(string(raw), `"`)
	if !validTenantID(number) {
		return "", errors.New("the answer has no DatabaseNumber")
	}
	return number, nil
}
