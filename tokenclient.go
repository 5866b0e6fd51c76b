package fortnox

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// maxTokenAnswer bounds how much of a token endpoint answer is read. Real
// answers are about 3 KB; anything near this limit is not a token answer.
const maxTokenAnswer = 64 << 10

// maxDescription bounds how much of Fortnox's error_description we repeat.
const maxDescription = 200

// Lifetimes outside these bounds are not believed (see parseTokenAnswer).
const (
	minTokenLifetime     = time.Second
	maxTokenLifetime     = 24 * time.Hour
	defaultTokenLifetime = time.Hour
)

// grant names, as sent in grant_type and used in logs and metrics.
const (
	grantClientCredentials = "client_credentials"
	grantRefreshToken      = "refresh_token"
	grantAuthorizationCode = "authorization_code"
)

// tokenAnswer is a successful token endpoint answer.
type tokenAnswer struct {
	accessToken  string
	refreshToken string // only for the refresh-token and code grants
	lifetime     time.Duration
	scope        string
}

// tokenClient speaks Fortnox's token endpoint protocol. It is written here
// rather than with golang.org/x/oauth2 because Fortnox needs a TenantId
// header on client-credentials requests and serves JSON error bodies as
// text/plain and text/html, which x/oauth2 parses as form data and so loses
// the error code the fallback logic depends on.
type tokenClient struct {
	tokenURL string
	http     *http.Client
}

func newTokenClient(tokenURL string) *tokenClient {
	transport := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	return &tokenClient{
		tokenURL: tokenURL,
		// Timeouts come from each request's context; no redirects: a token
		// endpoint that redirects is misconfigured, and following it would
		// send the client secret somewhere else.
		http: &http.Client{
			Transport: transport,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
	}
}

// clientCredentials asks for a service-account token for tenant.
func (c *tokenClient) clientCredentials(ctx context.Context, cred credentials, tenant string) (*tokenAnswer, error) {
	form := url.Values{"grant_type": {grantClientCredentials}}
	return c.post(ctx, cred, form, tenant)
}

// refresh trades a refresh token for a new access and refresh token.
func (c *tokenClient) refresh(ctx context.Context, cred credentials, refreshToken string) (*tokenAnswer, error) {
	form := url.Values{"grant_type": {grantRefreshToken}, "refresh_token": {refreshToken}}
	return c.post(ctx, cred, form, "")
}

// exchangeCode trades an authorization code for tokens.
func (c *tokenClient) exchangeCode(ctx context.Context, cred credentials, code, redirectURI string) (*tokenAnswer, error) {
	form := url.Values{"grant_type": {grantAuthorizationCode}, "code": {code}, "redirect_uri": {redirectURI}}
	return c.post(ctx, cred, form, "")
}

func (c *tokenClient) post(ctx context.Context, cred credentials, form url.Values, tenant string) (*tokenAnswer, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.tokenURL, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, &tokenError{failure: failBadAnswer, cause: errors.New("token_url is not usable")}
	}
	req.SetBasicAuth(cred.clientID, cred.clientSecret)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "caddy-fortnox")
	if tenant != "" {
		req.Header.Set("TenantId", tenant)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		// The url.Error text names the token URL, never the form body.
		return nil, &tokenError{failure: failUnavailable, cause: transportCause(err)}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxTokenAnswer+1))
	if err != nil {
		return nil, &tokenError{failure: failUnavailable, status: resp.StatusCode, cause: errors.New("reading the answer failed")}
	}
	return parseTokenAnswer(resp.StatusCode, resp.Header.Get("Retry-After"), body)
}

// transportCause reduces a client error to its kind, without the request.
func transportCause(err error) error {
	var uerr *url.Error
	if errors.As(err, &uerr) {
		if uerr.Timeout() {
			return errors.New("timed out")
		}
		return uerr.Err
	}
	return err
}

// oauthAnswer is the JSON of a token endpoint answer, success or error.
type oauthAnswer struct {
	AccessToken      string          `json:"access_token"`
	RefreshToken     string          `json:"refresh_token"`
	TokenType        string          `json:"token_type"`
	ExpiresIn        json.RawMessage `json:"expires_in"`
	Scope            string          `json:"scope"`
	Error            string          `json:"error"`
	ErrorDescription string          `json:"error_description"`
}

// parseTokenAnswer reads a token endpoint answer. Fortnox serves JSON under
// whatever Content-Type, so the body is parsed as JSON regardless; when it is
// not JSON the status alone decides.
func parseTokenAnswer(status int, retryAfter string, body []byte) (*tokenAnswer, error) {
	if len(body) > maxTokenAnswer {
		if status == http.StatusTooManyRequests || status >= 500 {
			// Not read, but a big error page from a proxy in front is
			// still "try later" (503 and Retry-After for the app).
			return nil, classifyTokenError(status, retryAfter, "", "")
		}
		return nil, &tokenError{failure: failBadAnswer, status: status, cause: errors.New("answer too large")}
	}
	var a oauthAnswer
	jsonErr := json.Unmarshal(bytes.TrimSpace(body), &a)
	if status < 200 || status > 299 || a.Error != "" {
		return nil, classifyTokenError(status, retryAfter, a.Error, a.ErrorDescription)
	}
	if jsonErr != nil {
		return nil, &tokenError{failure: failBadAnswer, status: status, cause: errors.New("answer is not JSON")}
	}
	if a.AccessToken == "" {
		return nil, &tokenError{failure: failBadAnswer, status: status, cause: errors.New("answer has no access_token")}
	}
	if a.TokenType != "" && !strings.EqualFold(a.TokenType, "bearer") {
		return nil, &tokenError{failure: failBadAnswer, status: status, cause: errors.New("token_type is not bearer")}
	}
	if strings.ContainsAny(a.AccessToken, " \t\r\n") {
		return nil, &tokenError{failure: failBadAnswer, status: status, cause: errors.New("access_token is not a single word")}
	}
	return &tokenAnswer{
		accessToken:  a.AccessToken,
		refreshToken: a.RefreshToken,
		lifetime:     tokenLifetime(a.ExpiresIn, a.AccessToken),
		scope:        a.Scope,
	}, nil
}

// tokenLifetime believes expires_in when it is sane (a number or a numeric
// string between a second and a day). Otherwise it reads exp-iat from the
// JWT, and failing that assumes Fortnox's documented hour; a day at most, so
// a wrong answer cannot pin a dead token in the cache.
func tokenLifetime(raw json.RawMessage, accessToken string) time.Duration {
	if secs, ok := parseSeconds(raw); ok {
		if d := time.Duration(secs * float64(time.Second)); d >= minTokenLifetime && d <= maxTokenLifetime {
			return d
		}
	}
	if c, err := decodeJWTClaims(accessToken); err == nil && c.Exp > c.Iat && c.Iat > 0 {
		if d := time.Duration(c.Exp-c.Iat) * time.Second; d >= minTokenLifetime && d <= maxTokenLifetime {
			return d
		}
	}
	return defaultTokenLifetime
}

func parseSeconds(raw json.RawMessage) (float64, bool) {
	s := strings.Trim(string(raw), `"`)
	if s == "" {
		return 0, false
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f != f { // NaN
		return 0, false
	}
	return f, true
}

// classifyTokenError turns a failed answer into what it means for the app.
// Any 4xx other than invalid_client means "no usable consent" for client
// credentials (Fortnox's exact answer is unknown); the refresh-token path
// reads invalid_grant out of the same error.
func classifyTokenError(status int, retryAfter, code, description string) *tokenError {
	e := &tokenError{status: status, code: code, description: cutDescription(description)}
	switch {
	case code == "invalid_client":
		e.failure = failBadClient
	case status == http.StatusTooManyRequests || status >= 500:
		e.failure = failUnavailable
		if d, ok := parseRetryAfter(retryAfter); ok {
			e.retryAt = now().Add(d)
		}
	case status >= 400:
		e.failure = failNoConsent
	default:
		e.failure = failBadAnswer
	}
	return e
}

func cutDescription(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > maxDescription {
		s = s[:maxDescription] + "…"
	}
	return s
}

// parseRetryAfter reads a Retry-After header given in seconds (the form a
// token endpoint uses); dates and nonsense are ignored. Capped at an hour.
func parseRetryAfter(v string) (time.Duration, bool) {
	secs, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || secs <= 0 {
		return 0, false
	}
	return min(time.Duration(secs)*time.Second, time.Hour), true
}
