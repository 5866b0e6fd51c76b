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
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "fortnox",
		Usage: "tenants [--address <admin address>] [--json] [--client-id <id>] | export|import|encrypt [--address <admin address>] [--client-id <id>] | tenant-id <token|-> | company-info [--api <url>] <token|->",
		Short: "See the sidecar's tenants; learn a Fortnox customer's TenantId from a token",
		Long: `
Helpers for operating the caddy-fortnox sidecar and moving an integration to it.

  caddy fortnox tenants [--address unix//<socket>] [--config <Caddyfile>] [--json] [--client-id <id>]
      Lists the tenants the running sidecar knows (GET /fortnox/tenants on
      Caddy's admin endpoint): mode, when the access token expires, the last
      error, and whether a refresh token is stored (and how old it is). The
      admin endpoint is found as "caddy reload" finds it: --address (such as
      unix//run/caddy-fortnox/admin.sock), else the "admin" option of
      --config, else the CADDY_ADMIN environment variable (the image sets
      it), else the "admin" option of ./Caddyfile. The admin socket opens to
      the sidecar's user only: run the command as that user. --json prints
      the admin API's JSON for scripts; --client-id picks a client when the
      sidecar has several. No token is ever shown.

  caddy fortnox export [--address …] [--config …] [--client-id <id>]
  caddy fortnox import [--address …] [--config …] [--client-id <id>] [--overwrite]
      In cluster mode (a redis line): copy the token records, still
      encrypted, from Redis into the sidecar's Caddy storage (export: a
      backup, or the way back to one sidecar), or from its Caddy storage
      into Redis (import; a record Redis holds already is kept unless
      --overwrite, and each imported one leaves a tombstone behind). The
      admin endpoint is found as for "tenants".

  caddy fortnox encrypt [--address …] [--client-id <id>]
      With encryption_key set, a record found unencrypted is never used:
      this rewrites, in place and with the configured key, the records
      written before the key was set (in Caddy's storage, or in Redis in
      cluster mode). Running it again changes nothing.

  caddy fortnox tenant-id <token|->
      Decodes a Fortnox access token (no signature check: only Fortnox can)
      and prints its tenantId and other non-secret claims. "-" reads the
      token from standard input, which keeps it out of your shell history.

  caddy fortnox company-info [--api https://api.fortnox.se] <token|->
      Asks Fortnox's /3/companyinformation (or /3/settings/company) with the
      token and prints DatabaseNumber, which is the TenantId.

  caddy fortnox connect-link --tenant <TenantId> --account <name> [--ttl 24h] [--url <connect URL>]
      Prints a signed fortnox_connect link for a named user account, with
      the key in FORTNOX_LINK_KEY (fortnox_connect's link_key).

The token itself is never printed.`,
		CobraFunc: func(cmd *cobra.Command) {
			var tf tenantsFlags
			tenants := &cobra.Command{
				Use:   "tenants [--address <admin address>] [--json] [--client-id <id>]",
				Short: "List the tenants the running sidecar knows, with their token state (never a token)",
				Args:  cobra.NoArgs,
				RunE: func(c *cobra.Command, _ []string) error {
					ctx, cancel := context.WithTimeout(c.Context(), 30*time.Second)
					defer cancel()
					return runTenants(ctx, c.OutOrStdout(), tf, time.Now())
				},
			}
			tenants.Flags().StringVar(&tf.address, "address", "", adminAddressHelp)
			tenants.Flags().StringVarP(&tf.config, "config", "c", "", "the sidecar's config file, to read its admin address from (when --address is not given)")
			tenants.Flags().StringVarP(&tf.adapter, "adapter", "a", "", "the config adapter of --config")
			tenants.Flags().BoolVar(&tf.json, "json", false, "print the admin API's JSON instead of a table")
			tenants.Flags().StringVar(&tf.clientID, "client-id", "", "the client id to list, when the sidecar has more than one")
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
			cmd.AddCommand(tenants, transferCommand("export"), transferCommand("import"), transferCommand("encrypt"), tenantID, companyInfo, connectLinkCommand())
		},
	})
}

// adminAddressHelp is the help of the commands' --address flag.
const adminAddressHelp = "the admin endpoint's address, such as unix//run/caddy-fortnox/admin.sock (default: the \"admin\" option of --config, else $CADDY_ADMIN, else the \"admin\" option of ./Caddyfile)"

// readTokenArg returns the token given as an argument, or read from in
// when the argument is "-". A leading "Bearer " is dropped.
func readTokenArg(in io.Reader, arg string) (string, error) {
	tok := arg
	if arg == "-" {
		line, err := bufio.NewReader(io.LimitReader(in, tokens.MaxJWTLength+1)).ReadString('\n')
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
	c, err := tokens.DecodeJWTClaims(tok)
	if err != nil {
		return fmt.Errorf("cannot read the token: %v (expected a Fortnox access token: three base64url parts joined by dots)", err)
	}
	tenant, err := c.Tenant()
	if err != nil {
		return fmt.Errorf("cannot read the token: %v", err)
	}
	fmt.Fprintf(out, "tenantId:  %s\n", tenant)
	printClaim(out, "clientId", c.ClientID)
	printClaim(out, "userId", rawText(c.UserID)) // a string or a number
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

// printClaim prints one claim. Claims are whatever the token's maker put
// there, so control characters are escaped: a hostile token must not clear
// the terminal, move the cursor or forge extra output lines.
func printClaim(out io.Writer, name, value string) {
	if value != "" && value != "null" {
		fmt.Fprintf(out, "%-10s %s\n", name+":", escapeControl(value))
	}
}

// escapeControl makes text from outside safe to print on a terminal: C0
// and C1 control characters, DEL, Unicode's bidirectional overrides and
// invalid UTF-8 are written as Go escapes (\n, \x1b, \u202e); everything
// else is kept as it is.
func escapeControl(s string) string {
	clean := true
	for _, r := range s {
		if needsEscape(r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case needsEscape(r):
			q := strconv.QuoteRune(r) // '\n', '\x1b', '\u202e'
			b.WriteString(q[1 : len(q)-1])
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}

func needsEscape(r rune) bool {
	return r == utf8.RuneError || unicode.IsControl(r) ||
		(r >= 0x202a && r <= 0x202e) || (r >= 0x2066 && r <= 0x2069) // bidi embeddings, overrides, isolates
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
	// Both endpoints name the company's DatabaseNumber; the token may have
	// the scope of only one of them. When neither answers, say what each
	// one said: that tells a missing scope from an expired token.
	var tried []string
	for _, path := range []string{"/3/companyinformation", "/3/settings/company"} {
		number, err := databaseNumber(ctx, api+path, tok)
		if err == nil {
			fmt.Fprintf(out, "DatabaseNumber (TenantId): %s\n", number)
			return nil
		}
		tried = append(tried, path+": "+err.Error())
	}
	return fmt.Errorf("no DatabaseNumber from %s; tried %s", api, strings.Join(tried, "; "))
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
		return "", requestFailure(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", fmt.Errorf("reading the answer: %v", requestFailure(err))
	}
	if resp.StatusCode != http.StatusOK {
		hint := ""
		switch resp.StatusCode {
		case http.StatusUnauthorized:
			hint = " (the token is expired or not valid)"
		case http.StatusForbidden:
			hint = " (the token lacks this endpoint's scope)"
		}
		if msg := fortnoxMessage(body); msg != "" {
			hint += ": " + msg
		}
		return "", fmt.Errorf("Fortnox answered %d%s", resp.StatusCode, hint)
	}
	var v struct {
		CompanyInformation struct{ DatabaseNumber json.RawMessage }
		CompanySettings    struct{ DatabaseNumber json.RawMessage }
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return "", errors.New("Fortnox answered 200, but not with JSON")
	}
	raw := v.CompanyInformation.DatabaseNumber
	if len(raw) == 0 {
		raw = v.CompanySettings.DatabaseNumber
	}
	number := strings.Trim(string(raw), `"`)
	if !tokens.ValidTenantID(number) {
		return "", errors.New("Fortnox answered 200, but with no DatabaseNumber")
	}
	return number, nil
}

// requestFailure is what went wrong with a request, without the URL that
// net/http puts in front (the commands name the URL themselves).
func requestFailure(err error) error {
	var uerr *url.Error
	if errors.As(err, &uerr) {
		if uerr.Timeout() {
			return errors.New("no answer: timed out")
		}
		return uerr.Err
	}
	return err
}

// fortnoxMessage reads the message of a Fortnox API error body,
// {"ErrorInformation":{"message":"…"}} in any key casing, shortened and
// safe to print; "" when there is none.
func fortnoxMessage(body []byte) string {
	var v struct {
		ErrorInformation struct {
			Message string
		}
		Message string
	}
	if json.Unmarshal(body, &v) != nil { // encoding/json matches keys case-insensitively
		return ""
	}
	msg := v.ErrorInformation.Message
	if msg == "" {
		msg = v.Message
	}
	return shorten(msg, 100)
}

// shorten keeps the first line of s, escaped, at most n runes.
func shorten(s string, n int) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexAny(s, "\r\n"); i >= 0 {
		s = strings.TrimSpace(s[:i]) + " …"
	}
	s = escapeControl(s)
	if utf8.RuneCountInString(s) > n {
		r := []rune(s)
		s = strings.TrimSpace(string(r[:n-1])) + "…"
	}
	return s
}

// tenantsFlags are the flags of `caddy fortnox tenants`.
type tenantsFlags struct {
	address, config, adapter string
	clientID                 string
	json                     bool
}

// runTenants asks the running sidecar's admin API for its tenants and
// prints them as a table, or as the API's own JSON with --json.
func runTenants(ctx context.Context, out io.Writer, f tenantsFlags, now time.Time) error {
	addr, err := adminAddress(f)
	if err != nil {
		return err
	}
	body, err := getTenants(ctx, addr, f.clientID)
	if err != nil {
		return err
	}
	if f.json {
		if _, err := out.Write(body); err != nil {
			return err
		}
		if len(body) > 0 && body[len(body)-1] != '\n' {
			_, err = io.WriteString(out, "\n")
		}
		return err
	}
	return printTenants(out, body, now)
}

// adminAddress finds the sidecar's admin endpoint as `caddy reload` does:
// --address; else the "admin" option of --config; else CADDY_ADMIN (the
// image sets it); else the "admin" option of the Caddyfile in the working
// directory; else Caddy's default. Any of them may be a unix socket
// (unix//path), which is where the shipped configs put it.
func adminAddress(f tenantsFlags) (string, error) {
	if f.address == "" && f.config == "" {
		if env := os.Getenv("CADDY_ADMIN"); env != "" {
			return env, nil
		}
		if _, err := os.Stat("Caddyfile"); err == nil {
			f.config = "Caddyfile"
		}
	}
	addr, err := caddycmd.DetermineAdminAPIAddress(f.address, nil, f.config, f.adapter)
	if err != nil {
		return "", fmt.Errorf("finding the admin endpoint's address: %v (pass --address unix//<path of its socket>, or --config <its Caddyfile>)", err)
	}
	return addr, nil
}

// maxTenantsAnswer bounds what the command reads from the admin API: tens
// of thousands of tenants fit.
const maxTenantsAnswer = 64 << 20

// getTenants GETs /fortnox/tenants from the admin API at addr.
func getTenants(ctx context.Context, addr, clientID string) ([]byte, error) {
	uri := "/fortnox/tenants"
	if clientID != "" {
		uri += "?client_id=" + url.QueryEscape(clientID)
	}
	return adminCall(ctx, addr, http.MethodGet, uri)
}

// adminCall sends one request to the admin API at addr and returns the
// answer's body.
func adminCall(ctx context.Context, addr, method, uri string) ([]byte, error) {
	type answer struct {
		body []byte
		err  error
	}
	done := make(chan answer, 1)
	go func() {
		// Caddy's own helper: it speaks to tcp, unix and fd admin
		// addresses and sets the Origin the admin endpoint expects.
		resp, err := caddycmd.AdminAPIRequest(addr, method, uri, nil, nil)
		if err != nil {
			done <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, maxTenantsAnswer))
		done <- answer{body, err}
	}()
	var a answer
	select {
	case a = <-done:
	case <-ctx.Done():
		return nil, fmt.Errorf("Caddy's admin API at %s did not answer in time: is it the sidecar's admin address? (pass --address)", addr)
	}
	switch {
	case a.err == nil:
		return a.body, nil
	case strings.Contains(a.err.Error(), "responded with error"):
		// The admin API answered, with an error of its own (no fortnox
		// handler loaded, an unknown --client-id, several client ids).
		hint := ""
		if strings.Contains(a.err.Error(), "client_id") && !strings.Contains(uri, "client_id=") {
			hint = " (pass --client-id)"
		}
		return nil, fmt.Errorf("Caddy's admin API at %s refused %s %s: %s%s", addr, method, uri, shorten(strings.TrimPrefix(a.err.Error(), "caddy responded with error: "), 300), hint)
	case strings.Contains(a.err.Error(), "permission denied"):
		return nil, fmt.Errorf("cannot reach Caddy's admin API at %s: %s. Only the sidecar's own user may open its admin socket: run this command as that user (in Kubernetes: kubectl exec -c fortnox-sidecar)",
			addr, dialFailure(a.err))
	default:
		return nil, fmt.Errorf("cannot reach Caddy's admin API at %s: %s. Is the sidecar running? If its admin endpoint listens elsewhere, pass --address (the \"admin\" global option of its Caddyfile, such as unix//run/caddy-fortnox/admin.sock) or --config <its Caddyfile>, or set CADDY_ADMIN",
			addr, dialFailure(a.err))
	}
}

// dialFailure is the cause in an error of caddycmd.AdminAPIRequest, without
// its "performing request: Get "<url>": " wrapping.
func dialFailure(err error) string {
	msg := strings.TrimPrefix(err.Error(), "performing request: ")
	if strings.HasPrefix(msg, "Get \"") {
		if i := strings.Index(msg, "\": "); i >= 0 {
			msg = msg[i+3:]
		}
	}
	return msg
}

// tenantStatus is one object of GET /fortnox/tenants, read leniently: any
// field may be missing or null (older sidecars have fewer of them).
type tenantStatus struct {
	Tenant                 json.RawMessage     `json:"tenant"`
	Mode                   string              `json:"mode"`
	TokenExpiresAt         *string             `json:"token_expires_at"`
	HasRefreshToken        *bool               `json:"has_refresh_token"`
	LastError              *string             `json:"last_error"`
	RefreshTokenAgeSeconds *float64            `json:"refresh_token_age_seconds"`
	ConsentRevoked         bool                `json:"consent_revoked"`
	Accounts               []accountStatus     `json:"accounts"`
	Quarantined            []quarantinedStatus `json:"quarantined"`
}

// quarantinedStatus is a quarantined refresh token of a tenant (never the
// token).
type quarantinedStatus struct {
	ID            string `json:"id"`
	Account       string `json:"account"`
	HandedOverFor string `json:"handed_over_for"`
	At            string `json:"at"`
}

// accountStatus is a named user account of a tenant.
type accountStatus struct {
	Name                   string          `json:"name"`
	UserID                 json.RawMessage `json:"user_id"`
	TokenExpiresAt         *string         `json:"token_expires_at"`
	HasRefreshToken        *bool           `json:"has_refresh_token"`
	LastError              *string         `json:"last_error"`
	RefreshTokenAgeSeconds *float64        `json:"refresh_token_age_seconds"`
}

// printTenants prints the JSON of GET /fortnox/tenants as a table: one row
// per tenant, sorted by TenantId, and under each tenant one row per named
// user account. Times are relative to now. The API never returns a token,
// and the table has no column that could hold one.
func printTenants(out io.Writer, body []byte, now time.Time) error {
	var rows []tenantStatus
	if err := json.Unmarshal(body, &rows); err != nil {
		return fmt.Errorf("the admin API's answer is not a JSON array of tenants: %v", err)
	}
	if len(rows) == 0 {
		_, err := fmt.Fprintln(out, "No tenants known yet: a tenant is listed after its first request, a stored refresh token or a consent event.")
		return err
	}
	for i := range rows {
		rows[i].Tenant = json.RawMessage(rawText(rows[i].Tenant))
		sort.SliceStable(rows[i].Accounts, func(a, b int) bool { return rows[i].Accounts[a].Name < rows[i].Accounts[b].Name })
	}
	sort.SliceStable(rows, func(a, b int) bool { return tenantLess(string(rows[a].Tenant), string(rows[b].Tenant)) })

	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TENANT\tMODE\tEXPIRES\tLAST ERROR\tREFRESH TOKEN")
	for _, r := range rows {
		mode := r.Mode
		if mode == "" {
			mode = "-"
		}
		if r.ConsentRevoked {
			mode += " (consent revoked)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", cell(string(r.Tenant)), escapeControl(mode),
			expiresCell(r.TokenExpiresAt, now), errorCell(r.LastError), refreshTokenCell(r.HasRefreshToken, r.RefreshTokenAgeSeconds))
		for _, a := range r.Accounts {
			name := "account " + cell(a.Name)
			if id := rawText(a.UserID); id != "" {
				name += " (user " + escapeControl(id) + ")"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", cell(string(r.Tenant)), name,
				expiresCell(a.TokenExpiresAt, now), errorCell(a.LastError), refreshTokenCell(a.HasRefreshToken, a.RefreshTokenAgeSeconds))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	return printQuarantined(out, rows, now)
}

// printQuarantined prints the QUARANTINED section: refresh tokens handed
// over for another tenant (or user) than their own, served under no name
// until an operator releases (POST /fortnox/quarantine/{id}/release) or
// deletes them. Nothing when there are none.
func printQuarantined(out io.Writer, rows []tenantStatus, now time.Time) error {
	n := 0
	for _, r := range rows {
		n += len(r.Quarantined)
	}
	if n == 0 {
		return nil
	}
	fmt.Fprintf(out, "\nQUARANTINED: %d refresh token(s) handed over for another tenant or user than their own, served under no name.\n", n)
	fmt.Fprintln(out, "Release one to its own tenant with POST /fortnox/quarantine/<id>/release, or delete it with DELETE /fortnox/quarantine/<id>.")
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTENANT\tACCOUNT\tHANDED OVER FOR\tAT")
	for _, r := range rows {
		for _, q := range r.Quarantined {
			account := "(service account)"
			if q.Account != "" {
				account = cell(q.Account)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", cell(q.ID), cell(string(r.Tenant)), account, cell(q.HandedOverFor), atCell(q.At, now))
		}
	}
	return tw.Flush()
}

// atCell is an RFC 3339 time and how long ago it was.
func atCell(at string, now time.Time) string {
	t, err := time.Parse(time.RFC3339, at)
	if err != nil {
		return cell(at)
	}
	if d := now.Sub(t); d >= 0 {
		return t.UTC().Format(time.RFC3339) + " (" + shortDuration(d) + " ago)"
	}
	return t.UTC().Format(time.RFC3339)
}

// rawText is a JSON string's text, or a JSON number as written; "" for
// null or nothing.
func rawText(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	if t := strings.TrimSpace(string(raw)); t != "null" {
		return t
	}
	return ""
}

// tenantLess orders TenantIds as numbers (shorter first), anything else
// after them by text.
func tenantLess(a, b string) bool {
	da, db := tokens.ValidTenantID(a), tokens.ValidTenantID(b)
	switch {
	case da && db && len(a) != len(b):
		return len(a) < len(b)
	case da != db:
		return da
	}
	return a < b
}

// cell is a table cell: escaped, never empty, without tabs or line breaks.
func cell(s string) string {
	if s == "" {
		return "-"
	}
	return escapeControl(s)
}

func expiresCell(at *string, now time.Time) string {
	if at == nil || *at == "" {
		return "-"
	}
	t, err := time.Parse(time.RFC3339, *at)
	if err != nil {
		return "?"
	}
	if d := t.Sub(now); d > 0 {
		return "in " + shortDuration(d)
	}
	return "expired " + shortDuration(now.Sub(t)) + " ago"
}

// errorCell is the first line of an error, cut to about 40 characters.
func errorCell(msg *string) string {
	if msg == nil || strings.TrimSpace(*msg) == "" {
		return "-"
	}
	return shorten(*msg, 40)
}

func refreshTokenCell(has *bool, ageSeconds *float64) string {
	switch {
	case has == nil:
		return "-"
	case !*has:
		return "no"
	case ageSeconds == nil || *ageSeconds < 0:
		return "yes"
	}
	return "yes (" + shortDuration(time.Duration(*ageSeconds*float64(time.Second))) + ")"
}

// shortDuration is d, truncated, in words a table can hold: 45s, 52m,
// 5h12m, 12d.
func shortDuration(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	case d < 48*time.Hour:
		h, m := int(d/time.Hour), int(d%time.Hour/time.Minute)
		if m == 0 {
			return fmt.Sprintf("%dh", h)
		}
		return fmt.Sprintf("%dh%dm", h, m)
	}
	return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
}

// transferCommand is `caddy fortnox export` or `caddy fortnox import`.
func transferCommand(verb string) *cobra.Command {
	var f tenantsFlags
	var overwrite bool
	short := "Copy the token records from Redis into Caddy's storage (cluster mode), still encrypted"
	if verb == "import" {
		short = "Copy the token records from Caddy's storage into Redis (cluster mode), still encrypted"
	}
	if verb == "encrypt" {
		short = "Encrypt with encryption_key the token records written before it was set (Caddy's storage or Redis)"
	}
	c := &cobra.Command{
		Use:   verb + " [--address <admin address>] [--client-id <id>]",
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(c.Context(), 5*time.Minute)
			defer cancel()
			addr, err := adminAddress(f)
			if err != nil {
				return err
			}
			q := url.Values{}
			if f.clientID != "" {
				q.Set("client_id", f.clientID)
			}
			if overwrite {
				q.Set("overwrite", "true")
			}
			uri := "/fortnox/" + verb
			if len(q) > 0 {
				uri += "?" + q.Encode()
			}
			body, err := adminCall(ctx, addr, http.MethodPost, uri)
			if err != nil {
				return err
			}
			return printTransfer(c.OutOrStdout(), verb, body)
		},
	}
	c.Flags().StringVar(&f.address, "address", "", adminAddressHelp)
	c.Flags().StringVarP(&f.config, "config", "c", "", "the sidecar's config file, to read its admin address from")
	c.Flags().StringVarP(&f.adapter, "adapter", "a", "", "the config adapter of --config")
	c.Flags().StringVar(&f.clientID, "client-id", "", "the client id, when the sidecar has more than one")
	if verb == "import" {
		c.Flags().BoolVar(&overwrite, "overwrite", false, "replace records Redis already holds (their refresh tokens are lost: only when Redis is known to be stale)")
	}
	return c
}

// printTransfer prints what an export or import did.
func printTransfer(out io.Writer, verb string, body []byte) error {
	if verb == "encrypt" {
		return printEncrypt(out, body)
	}
	var res struct {
		Copied, Skipped, Failed []string
	}
	if err := json.Unmarshal(body, &res); err != nil {
		return fmt.Errorf("the admin API's answer is not a transfer result: %s", shorten(string(body), 200))
	}
	fmt.Fprintf(out, "%s: %d records copied, %d skipped, %d failed\n", verb, len(res.Copied), len(res.Skipped), len(res.Failed))
	for _, k := range res.Skipped {
		fmt.Fprintf(out, "  skipped %s\n", escapeControl(k))
	}
	for _, k := range res.Failed {
		fmt.Fprintf(out, "  FAILED  %s\n", escapeControl(k))
	}
	if len(res.Failed) > 0 {
		return fmt.Errorf("%d records were not copied", len(res.Failed))
	}
	return nil
}

// printEncrypt prints what `caddy fortnox encrypt` did.
func printEncrypt(out io.Writer, body []byte) error {
	var res struct {
		Encrypted        []string `json:"encrypted"`
		AlreadyEncrypted int      `json:"already_encrypted"`
		Skipped, Failed  []string
	}
	if err := json.Unmarshal(body, &res); err != nil {
		return fmt.Errorf("the admin API's answer is not an encryption result: %s", shorten(string(body), 200))
	}
	fmt.Fprintf(out, "encrypt: %d records encrypted, %d already encrypted, %d failed\n", len(res.Encrypted), res.AlreadyEncrypted, len(res.Failed))
	for _, k := range res.Encrypted {
		fmt.Fprintf(out, "  encrypted %s\n", escapeControl(k))
	}
	for _, k := range res.Failed {
		fmt.Fprintf(out, "  FAILED    %s\n", escapeControl(k))
	}
	if len(res.Failed) > 0 {
		return fmt.Errorf("%d records were not encrypted", len(res.Failed))
	}
	return nil
}

// connectLinkCommand is `caddy fortnox connect-link`.
func connectLinkCommand() *cobra.Command {
	var tenant, account, base string
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "connect-link --tenant <TenantId> --account <name> [--ttl 24h] [--url <connect URL>]",
		Short: "Print a signed fortnox_connect link for a named user account (key from " + linkKeyEnv + ")",
		Long: `Prints a link that connects a named user account of a tenant through
fortnox_connect, signed with the key in the environment variable ` + linkKeyEnv + `
(the same text as fortnox_connect's link_key, at least 32 bytes). The link
carries account, tenant, expires (now + --ttl, at most 7 days) and sig.
Without --url it prints the path and query (` + defaultConnectLinkURL + `?…),
to put behind the connect site's origin.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			return printConnectLink(c.OutOrStdout(), os.Getenv(linkKeyEnv), base, tenant, account, ttl, time.Now())
		},
	}
	cmd.Flags().StringVar(&tenant, "tenant", "", "the TenantId of the company the user connects (required)")
	cmd.Flags().StringVar(&account, "account", "", "the account name the user's chain is stored under (required)")
	cmd.Flags().DurationVar(&ttl, "ttl", 24*time.Hour, "how long the link is valid (at most 168h)")
	cmd.Flags().StringVar(&base, "url", defaultConnectLinkURL, "the connect URL, e.g. https://connect.example.com/fortnox/connect")
	return cmd
}

// printConnectLink prints a signed link; the key is never printed.
func printConnectLink(out io.Writer, key, base, tenant, account string, ttl time.Duration, t time.Time) error {
	key = strings.TrimSpace(key)
	if key == "" {
		return errors.New(linkKeyEnv + " is not set: export the key fortnox_connect's link_key holds (at least 32 bytes)")
	}
	if tenant == "" || account == "" {
		return errors.New("--tenant and --account are both required")
	}
	link, err := connectLink([]byte(key), base, tenant, account, ttl, t)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(out, link)
	return err
}
