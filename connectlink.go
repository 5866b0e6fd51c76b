package fortnox

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/spf13/cobra"
)

// Signed connect links. A link that names an account (…/connect?account=
// anna&tenant=…) decides whose name a Fortnox user's chain is stored
// under, so only the app may make one: it carries expires (Unix seconds)
// and sig, the lowercase hex HMAC-SHA256 under link_key of every other
// query parameter, encoded as url.Values.Encode writes them (sorted by
// name, form-encoded: a space is "+").

const (
	// minLinkKeyLength is the shortest link_key accepted, in bytes.
	minLinkKeyLength = 32
	// maxLinkLifetime is how far ahead a link's expires may be.
	maxLinkLifetime = 7 * 24 * time.Hour
	// linkKeyEnv is where `caddy fortnox connect-link` reads the key.
	linkKeyEnv = "FORTNOX_LINK_KEY"
	// defaultConnectLinkURL is what connect-link signs without --url: a
	// path the app puts behind its connect site's origin.
	defaultConnectLinkURL = "/fortnox/connect"
)

// linkSignature returns the signature of a link's query: every parameter
// but sig, encoded as url.Values.Encode does.
func linkSignature(key []byte, q url.Values) string {
	signed := url.Values{}
	for k, vs := range q {
		if k != "sig" {
			signed[k] = vs
		}
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(signed.Encode()))
	return hex.EncodeToString(mac.Sum(nil))
}

// linkProblem says why a signed link is refused.
type linkProblem string

const (
	linkUnsigned    linkProblem = "link_unsigned"      // no sig or no expires
	linkBadExpiry   linkProblem = "link_bad_expiry"    // expires is not Unix seconds
	linkBadSig      linkProblem = "link_bad_signature" // wrong key, or a parameter changed
	linkExpired     linkProblem = "link_expired"
	linkTooDistant  linkProblem = "link_too_far_ahead" // expires more than 7 days ahead
	linkNotAccepted linkProblem = "link_key_missing"   // an account link, and no link_key
)

// checkLink verifies a link's signature and expiry at t. "" is a good link.
func checkLink(key []byte, q url.Values, t time.Time) linkProblem {
	sig, exp := q.Get("sig"), q.Get("expires")
	if sig == "" || exp == "" || len(q["sig"]) != 1 || len(q["expires"]) != 1 {
		return linkUnsigned
	}
	expires, err := strconv.ParseInt(exp, 10, 64)
	if err != nil || strconv.FormatInt(expires, 10) != exp {
		return linkBadExpiry
	}
	// The signature first: a stranger learns nothing about expiry rules
	// from a link that is not ours.
	if !hmac.Equal([]byte(linkSignature(key, q)), []byte(sig)) {
		return linkBadSig
	}
	switch at := time.Unix(expires, 0); {
	case !t.Before(at):
		return linkExpired
	case at.Sub(t) > maxLinkLifetime:
		return linkTooDistant
	}
	return ""
}

// connectLink builds a signed link for a named account of a tenant, valid
// for ttl from t. base is the connect URL (its own query parameters are
// signed too).
func connectLink(key []byte, base, tenant, account string, ttl time.Duration, t time.Time) (string, error) {
	switch {
	case len(key) < minLinkKeyLength:
		return "", fmt.Errorf("the link key must be at least %d bytes (it has %d); make one with `openssl rand -base64 32` and give the same to link_key", minLinkKeyLength, len(key))
	case !tokens.ValidTenantID(tenant):
		return "", fmt.Errorf("--tenant %q is not a TenantId (digits, as Fortnox's DatabaseNumber)", tenant)
	case !tokens.ValidAccountName(account):
		return "", fmt.Errorf("--account %q is not an account name: 1 to 64 of A-Z a-z 0-9 . _ @ -, not dots only", account)
	case ttl <= 0:
		return "", fmt.Errorf("--ttl %v must be positive", ttl)
	case ttl > maxLinkLifetime:
		return "", fmt.Errorf("--ttl %v is longer than a link may live (7 days, 168h)", ttl)
	}
	u, err := url.Parse(base)
	if err != nil {
		return "", fmt.Errorf("--url %q is not a URL: %v", base, err)
	}
	if u.Path == "" || (u.Scheme != "" && u.Scheme != "https" && u.Scheme != "http") {
		return "", fmt.Errorf("--url %q must be the connect path, e.g. https://connect.example.com/fortnox/connect", base)
	}
	q := u.Query()
	for _, k := range []string{"sig", "expires", "account", "tenant"} {
		if q.Has(k) {
			return "", fmt.Errorf("--url %q already has %s=: give the connect URL without it", base, k)
		}
	}
	q.Set("account", account)
	q.Set("tenant", tenant)
	q.Set("expires", strconv.FormatInt(t.Add(ttl).Unix(), 10))
	q.Set("sig", linkSignature(key, q))
	u.RawQuery = q.Encode()
	return u.String(), nil
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
