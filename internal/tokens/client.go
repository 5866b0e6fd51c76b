package tokens

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/clock"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

// MaxTokenAnswer bounds how much of a token endpoint answer is read. Real
// answers are about 3 KB; anything near this limit is not a token answer.
// (x/oauth2 would read up to 1 MiB: the transport below cuts it first.)
const MaxTokenAnswer = 64 << 10

// MaxDescription bounds how much of Fortnox's error_description we repeat.
const MaxDescription = 200

// Lifetimes outside these bounds are not believed (see tokenLifetime).
const (
	MinTokenLifetime     = time.Second
	MaxTokenLifetime     = 24 * time.Hour
	defaultTokenLifetime = time.Hour
)

// Grant names an OAuth2 grant, as sent in grant_type and used in logs,
// metrics and the records: one type for every place a grant is named.
type Grant string

// The grants the sidecar uses.
const (
	GrantClientCredentials Grant = "client_credentials"
	GrantRefreshToken      Grant = "refresh_token"
	GrantAuthorizationCode Grant = "authorization_code"
)

// String is the grant's name.
func (g Grant) String() string { return string(g) }

// Answer is a successful token endpoint answer.
type Answer struct {
	AccessToken  string
	RefreshToken string // only for the refresh-token and code grants; "" when Fortnox sent no new one
	Lifetime     time.Duration
	Scope        string
	status       int // Fortnox's HTTP status (2xx), for tracing
}

// Client speaks to Fortnox's token endpoint through golang.org/x/oauth2,
// with Fortnox's quirks kept around it:
//   - the client id and secret always go in the Basic header
//     (AuthStyleInHeader): x/oauth2's auto-detection would send a refused
//     request again with the secret in the body, which makes a no-consent
//     answer two requests and spends a single-use refresh token twice;
//   - client credentials need a TenantId header, set by the transport that
//     is handed to x/oauth2 in the request's context;
//   - Fortnox labels JSON answers text/plain or text/html: errors are
//     classified from the body whatever its label, and the transport tells
//     x/oauth2 the body is JSON so that it does not parse it as a form;
//   - answers are bounded at maxTokenAnswer and redirects never followed (a
//     redirect would carry the client secret elsewhere);
//   - lifetimes come from the raw expires_in and the plugin's clock, never
//     from x/oauth2's Expiry (which uses time.Now).
type Client struct {
	clock    *clock.Clock
	tokenURL string
	// host is the token URL's host[:port], the only part of it that error
	// texts name.
	host      string
	Transport http.RoundTripper
}

func NewTokenClient(tokenURL string, clk *clock.Clock) *Client {
	transport := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	return &Client{clock: clk, tokenURL: tokenURL, host: hostOf(tokenURL), Transport: transport}
}

// hostOf returns the host[:port] of a URL, never its user info, path or query.
func hostOf(rawURL string) string {
	if u, err := url.Parse(rawURL); err == nil && u.Host != "" {
		return u.Host
	}
	return "the token endpoint"
}

// ClientCredentials asks for a service-account token for tenant.
func (c *Client) ClientCredentials(ctx context.Context, cred Credentials, tenant string) (*Answer, error) {
	conf := &clientcredentials.Config{
		ClientID:     cred.ClientID,
		ClientSecret: cred.ClientSecret,
		TokenURL:     c.tokenURL,
		AuthStyle:    oauth2.AuthStyleInHeader,
	}
	ctx, tr := c.requestContext(ctx, tenant)
	tok, err := conf.Token(ctx)
	return c.answer(tr, tok, err, "")
}

// Refresh trades a refresh token for a new access and refresh token. The
// refresh token is sent once, whatever the answer.
func (c *Client) Refresh(ctx context.Context, cred Credentials, refreshToken string) (*Answer, error) {
	if refreshToken == "" {
		// x/oauth2 would refuse it without a request; say so our way.
		return nil, &Error{Failure: FailNoConsent, Code: "invalid_grant", Description: "no refresh token to send"}
	}
	ctx, tr := c.requestContext(ctx, "")
	tok, err := c.config(cred, "").TokenSource(ctx, &oauth2.Token{RefreshToken: refreshToken}).Token()
	return c.answer(tr, tok, err, refreshToken)
}

// ExchangeCode trades an authorization code for tokens.
func (c *Client) ExchangeCode(ctx context.Context, cred Credentials, code, redirectURI string) (*Answer, error) {
	ctx, tr := c.requestContext(ctx, "")
	tok, err := c.config(cred, redirectURI).Exchange(ctx, code)
	return c.answer(tr, tok, err, "")
}

func (c *Client) config(cred Credentials, redirectURI string) *oauth2.Config {
	return &oauth2.Config{
		ClientID:     cred.ClientID,
		ClientSecret: cred.ClientSecret,
		Endpoint:     oauth2.Endpoint{TokenURL: c.tokenURL, AuthStyle: oauth2.AuthStyleInHeader},
		RedirectURL:  redirectURI,
	}
}

// requestContext hands x/oauth2 the HTTP client of one token request: the
// shared transport wrapped with Fortnox's headers and the answer bound, and
// no redirects. The wrapper is returned too: it keeps the answer it read.
func (c *Client) requestContext(ctx context.Context, tenant string) (context.Context, *fortnoxTransport) {
	client, tr := c.httpClient(tenant)
	return context.WithValue(ctx, oauth2.HTTPClient, client), tr
}

// httpClient is the HTTP client of one request to Fortnox's OAuth
// endpoints: the shared transport with Fortnox's headers, the answer
// bound, and no redirects (a redirect would carry the secret elsewhere).
func (c *Client) httpClient(tenant string) (*http.Client, *fortnoxTransport) {
	tr := &fortnoxTransport{base: c.Transport, tenant: tenant}
	return &http.Client{
		Transport: tr,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}, tr
}

// revokeURL is Fortnox's revoke endpoint beside the token endpoint:
// …/oauth-v1/token → …/oauth-v1/revoke.
func revokeURL(tokenURL string) string {
	if base, ok := strings.CutSuffix(tokenURL, "/token"); ok {
		return base + "/revoke"
	}
	return strings.TrimSuffix(tokenURL, "/") + "/revoke"
}

// revoke revokes a refresh token at Fortnox (POST /oauth-v1/revoke,
// token_type_hint=refresh_token; Fortnox answers {"revoked":true}).
// x/oauth2 has no revoke call; the request goes through the same client as
// the token requests, with the client id and secret in the Basic header
// (form-encoded first, as x/oauth2 does).
func (c *Client) revoke(ctx context.Context, cred Credentials, refreshToken string) error {
	form := url.Values{"token_type_hint": {"refresh_token"}, "token": {refreshToken}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, revokeURL(c.tokenURL), strings.NewReader(form.Encode()))
	if err != nil {
		return &Error{Failure: FailBadAnswer, Cause: errors.New("the revoke URL is not usable")}
	}
	req.SetBasicAuth(url.QueryEscape(cred.ClientID), url.QueryEscape(cred.ClientSecret))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	client, _ := c.httpClient("")
	resp, err := client.Do(req)
	if err != nil {
		return &Error{Failure: FailUnavailable, Cause: transportCause(err)}
	}
	resp.Body.Close()
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return &Error{Failure: FailUnavailable, Status: resp.StatusCode}
	case resp.StatusCode == http.StatusUnauthorized:
		return &Error{Failure: FailBadClient, Status: resp.StatusCode}
	}
	return &Error{Failure: FailBadAnswer, Status: resp.StatusCode, Cause: fmt.Errorf("the revoke endpoint answered %d", resp.StatusCode)}
}

// fortnoxTransport adds Fortnox's headers to a token request and reads the
// answer itself, bounded, before x/oauth2 sees it.
type fortnoxTransport struct {
	base   http.RoundTripper
	tenant string // the TenantId header; "" for the refresh and code grants
	// body is the answer read, for explaining an unusable 2xx answer (it
	// may hold a token: it is never printed).
	body   []byte
	status int
}

func (t *fortnoxTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	req = req.Clone(req.Context()) // a RoundTripper must not change the caller's request
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "caddy-fortnox")
	if t.tenant != "" {
		req.Header.Set("TenantId", t.tenant)
	}
	resp, err := t.base.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxTokenAnswer+1))
	if err != nil {
		return nil, err // the connection broke or timed out mid-answer
	}
	if len(body) > MaxTokenAnswer {
		return nil, &answerTooLarge{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After")}
	}
	t.body, t.status = body, resp.StatusCode
	resp.Body = io.NopCloser(bytes.NewReader(body))
	resp.ContentLength = int64(len(body))
	// Fortnox's answers are JSON whatever their label; x/oauth2 would parse
	// a text/plain one as a form and lose every field.
	resp.Header.Set("Content-Type", "application/json")
	return resp, nil
}

// answerTooLarge: the answer passed maxTokenAnswer and was not read.
type answerTooLarge struct {
	status     int
	retryAfter string
}

func (e *answerTooLarge) Error() string { return "answer too large" }

// answer turns what x/oauth2 returned into a Answer or a *Error.
// sentRefresh is the refresh token the request carried ("" for the other
// grants): x/oauth2 copies it into an answer that has none.
func (c *Client) answer(tr *fortnoxTransport, tok *oauth2.Token, err error, sentRefresh string) (*Answer, error) {
	if err != nil {
		return nil, c.classify(err, tr.body)
	}
	if tok.TokenType != "" && !strings.EqualFold(tok.TokenType, "bearer") {
		return nil, &Error{Failure: FailBadAnswer, Status: http.StatusOK, Cause: errors.New("token_type is not bearer")}
	}
	if strings.ContainsAny(tok.AccessToken, " \t\r\n") {
		return nil, &Error{Failure: FailBadAnswer, Status: http.StatusOK, Cause: errors.New("access_token is not a single word")}
	}
	refreshToken := tok.RefreshToken
	if refreshToken == sentRefresh {
		refreshToken = "" // no new refresh token: x/oauth2 echoed the one sent
	}
	scope, _ := tok.Extra("scope").(string)
	return &Answer{
		AccessToken:  tok.AccessToken,
		RefreshToken: refreshToken,
		Lifetime:     tokenLifetime(tok.Extra("expires_in"), tok.AccessToken),
		Scope:        scope,
		status:       tr.status,
	}, nil
}

// classify turns an x/oauth2 error into a *Error. It never repeats the
// answer's body (which may hold a token) nor the token URL's path or query.
// body is the answer as read, when there was one.
func (c *Client) classify(err error, body []byte) *Error {
	var tooLarge *answerTooLarge
	if errors.As(err, &tooLarge) {
		if tooLarge.status == http.StatusTooManyRequests || tooLarge.status >= 500 {
			// Not read, but a big error page from a proxy in front is
			// still "try later" (503 and Retry-After for the app).
			return classifyTokenError(tooLarge.status, tooLarge.retryAfter, "", "", c.clock.Now())
		}
		// A 4xx is not read either, so it cannot say invalid_grant and
		// must not mark a refresh token dead.
		return &Error{Failure: FailBadAnswer, Status: tooLarge.status, Cause: errors.New("answer too large")}
	}
	var rerr *oauth2.RetrieveError
	if errors.As(err, &rerr) && rerr.Response != nil {
		code, description := oauthErrorFields(rerr.Body)
		return classifyTokenError(rerr.Response.StatusCode, rerr.Response.Header.Get("Retry-After"), code, description, c.clock.Now())
	}
	var uerr *url.Error
	if errors.As(err, &uerr) {
		return &Error{Failure: FailUnavailable, Cause: classifyTransport(uerr.Err, c.host)}
	}
	// x/oauth2 read a 2xx answer but found no token in it.
	return &Error{Failure: FailBadAnswer, Status: http.StatusOK, Cause: errors.New(unusableAnswer(body))}
}

// oauthErrorFields reads the OAuth error fields of an answer body as JSON,
// whatever its Content-Type said; a body that is not JSON has none.
func oauthErrorFields(body []byte) (code, description string) {
	var e struct {
		Error            string `json:"error"`
		ErrorDescription string `json:"error_description"`
	}
	_ = json.Unmarshal(bytes.TrimSpace(body), &e)
	return e.Error, e.ErrorDescription
}

// unusableAnswer names what is wrong with a 2xx answer that x/oauth2
// refused, without repeating any of it.
func unusableAnswer(body []byte) string {
	var a struct {
		AccessToken json.RawMessage `json:"access_token"`
		ExpiresIn   json.RawMessage `json:"expires_in"`
	}
	if err := json.Unmarshal(bytes.TrimSpace(body), &a); err != nil {
		return "answer is not a JSON object"
	}
	var access string
	if err := json.Unmarshal(a.AccessToken, &access); err != nil || access == "" {
		return "answer has no access_token"
	}
	var secs json.Number
	if len(a.ExpiresIn) > 0 && string(a.ExpiresIn) != "null" {
		if err := json.Unmarshal(a.ExpiresIn, &secs); err != nil {
			return "expires_in is not a number"
		}
		if _, err := secs.Int64(); err != nil {
			return "expires_in is not a whole number of seconds"
		}
	}
	return "answer is not a usable token answer"
}

// tokenLifetime believes expires_in when it is sane (a whole number of
// seconds, or such a numeric string, between a second and a day). Otherwise
// it reads exp-iat from the JWT, and failing that assumes Fortnox's
// documented hour; a day at most, so a wrong answer cannot pin a dead token
// in the cache. expiresIn is the raw JSON value (float64, string or nil).
func tokenLifetime(expiresIn any, accessToken string) time.Duration {
	if secs, ok := seconds(expiresIn); ok {
		if d := time.Duration(secs * float64(time.Second)); d >= MinTokenLifetime && d <= MaxTokenLifetime {
			return d
		}
	}
	if c, err := DecodeJWTClaims(accessToken); err == nil && c.Exp > c.Iat && c.Iat > 0 {
		if d := time.Duration(c.Exp-c.Iat) * time.Second; d >= MinTokenLifetime && d <= MaxTokenLifetime {
			return d
		}
	}
	return defaultTokenLifetime
}

func seconds(v any) (float64, bool) {
	switch v := v.(type) {
	case float64:
		return v, true
	case string:
		f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || f != f { // NaN
			return 0, false
		}
		return f, true
	default:
		return 0, false
	}
}

// classifyTokenError turns a failed answer into what it means for the app.
// Any 4xx other than invalid_client means "no usable consent" for client
// credentials (Fortnox's exact answer is unknown); the refresh-token path
// reads invalid_grant out of the same error.
func classifyTokenError(status int, retryAfter, code, description string, at time.Time) *Error {
	e := &Error{Status: status, Code: CutDescription(code), Description: CutDescription(description)}
	switch {
	case code == "invalid_client":
		e.Failure = FailBadClient
	case status == http.StatusTooManyRequests || status >= 500:
		e.Failure = FailUnavailable
		if d, ok := ParseRetryAfter(retryAfter); ok {
			e.RetryAt = at.Add(d)
		}
	case status >= 400:
		e.Failure = FailNoConsent
	default:
		e.Failure = FailBadAnswer
	}
	return e
}

func CutDescription(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > MaxDescription {
		s = s[:MaxDescription] + "…"
	}
	return s
}

// ParseRetryAfter reads a Retry-After header given in seconds (the form a
// token endpoint uses); dates and nonsense are ignored. Capped at an hour.
func ParseRetryAfter(v string) (time.Duration, bool) {
	secs, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || secs <= 0 {
		return 0, false
	}
	return min(time.Duration(secs)*time.Second, time.Hour), true
}

// transportCause reduces an HTTP client error to its class (see
// classifyTransport), naming only the host it tried to reach.
func transportCause(err error) error {
	var uerr *url.Error
	if errors.As(err, &uerr) {
		return classifyTransport(uerr.Err, hostOf(uerr.URL))
	}
	return classifyTransport(err, "")
}

// TransportKind is why a request got no HTTP answer.
type TransportKind int

const (
	transportOther TransportKind = iota
	TransportDNS
	TransportRefused
	TransportTimeout
	TransportTLS
	TransportClosed
	transportCancelled
)

// TransportError is a request that got no HTTP answer, reduced to its
// class and the host it tried. Its text holds no URL, token or secret.
type TransportError struct {
	Kind TransportKind
	// host is host[:port] of the URL (or the name that did not resolve).
	host string
	// detail is a short, safe reason (a DNS or TLS error text), or "".
	detail string
}

func (e *TransportError) Error() string {
	host := e.host
	if host == "" {
		host = "the server"
	}
	switch e.Kind {
	case TransportDNS:
		if e.detail == "" {
			return "DNS failure: the name " + host + " does not resolve"
		}
		return "DNS failure: looking up " + host + " failed (" + e.detail + ")"
	case TransportRefused:
		return "connection refused by " + host
	case TransportTimeout:
		return "timed out waiting for " + host
	case TransportTLS:
		return "TLS failure with " + host + ": " + e.detail
	case TransportClosed:
		return "the connection to " + host + " closed without an answer"
	case transportCancelled:
		return "the request to " + host + " was cancelled"
	default:
		if e.detail == "" {
			return "could not reach " + host
		}
		return "could not reach " + host + ": " + e.detail
	}
}

// classifyTransport sorts a transport error (the Err of a url.Error) into
// DNS failure, connection refused, timeout, TLS failure, a connection
// closed without an answer, or cancellation. host is host[:port] of the
// request's URL.
func classifyTransport(err error, host string) *TransportError {
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		name := dnsErr.Name
		if name == "" {
			name = host
		}
		if dnsErr.IsNotFound {
			return &TransportError{Kind: TransportDNS, host: name}
		}
		return &TransportError{Kind: TransportDNS, host: name, detail: dnsErr.Err}
	}
	if detail, ok := tlsFailure(err); ok {
		return &TransportError{Kind: TransportTLS, host: host, detail: detail}
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return &TransportError{Kind: TransportRefused, host: host}
	}
	var netErr net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &netErr) && netErr.Timeout()) {
		return &TransportError{Kind: TransportTimeout, host: host}
	}
	if errors.Is(err, context.Canceled) {
		return &TransportError{Kind: transportCancelled, host: host}
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EPIPE) {
		return &TransportError{Kind: TransportClosed, host: host}
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Err != nil {
		return &TransportError{Kind: transportOther, host: host, detail: opErr.Err.Error()}
	}
	return &TransportError{Kind: transportOther, host: host, detail: CutDescription(err.Error())}
}

// tlsFailure reports whether err is a TLS handshake or certificate failure,
// with a short reason.
func tlsFailure(err error) (string, bool) {
	var (
		verifyErr    *tls.CertificateVerificationError
		unknownCA    x509.UnknownAuthorityError
		hostnameErr  x509.HostnameError
		invalidErr   x509.CertificateInvalidError
		recordErr    tls.RecordHeaderError
		alertErr     tls.AlertError
		systemRoots  x509.SystemRootsError
		constraintEr x509.ConstraintViolationError
	)
	switch {
	case errors.As(err, &verifyErr):
		return "the certificate is not trusted: " + verifyErr.Err.Error(), true
	case errors.As(err, &unknownCA):
		return "the certificate is not trusted: " + unknownCA.Error(), true
	case errors.As(err, &hostnameErr):
		return hostnameErr.Error(), true
	case errors.As(err, &invalidErr):
		return invalidErr.Error(), true
	case errors.As(err, &systemRoots):
		return systemRoots.Error(), true
	case errors.As(err, &constraintEr):
		return constraintEr.Error(), true
	case errors.As(err, &recordErr), strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		// The second is net/http's untyped error for the same mistake.
		return "the server does not speak TLS (is the URL https:// for an http:// server?)", true
	case errors.As(err, &alertErr):
		return "the server refused the handshake (" + alertErr.Error() + ")", true
	}
	return "", false
}
