package fortnox

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"net/http"
	"net/url"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(Connect))
	httpcaddyfile.RegisterHandlerDirective("fortnox_connect", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		c := new(Connect)
		return c, c.UnmarshalCaddyfile(h.Dispenser)
	})
	// Before respond: a site that ends in `respond 404` must still reach it.
	httpcaddyfile.RegisterDirectiveOrder("fortnox_connect", httpcaddyfile.Before, "respond")
}

// DefaultAuthorizeURL is Fortnox's authorize page.
const DefaultAuthorizeURL = "https://apps.fortnox.se/oauth-v1/auth"

const (
	// stateCookiePrefix starts the name of each flow's state cookie; the
	// rest of the name is the start of the flow's state, so that flows in
	// two tabs keep a cookie each.
	stateCookiePrefix = "fortnox_connect_"
	// stateInCookieName is how much of the state names its cookie.
	stateInCookieName = 16
	stateLifetime     = 10 * time.Minute // as long as Fortnox's codes live
	// cookieGrace: the cookie outlives the signed lifetime by this much,
	// so that a flow that took too long can be told so.
	cookieGrace = time.Minute
)

// Connect is the `fortnox_connect` handler, for a public site: it lets a
// customer's administrator connect the integration (the authorization-code
// flow, with account_type=service by default so that Fortnox creates a
// service-account consent). `GET <connect_path>` sends the browser to
// Fortnox; `GET <callback_path>` (the redirect_uri) checks the state,
// exchanges the code, reads the TenantId from the access token, stores
// the refresh token as the tenant's fallback and answers 303 to a result
// page (the same path with ?result=), which shows the same result on a
// reload. With account_type off, a link signed with link_key,
// `GET <connect_path>?account=<name>&tenant=<TenantId>&expires=…&sig=…`,
// connects a named user account instead: the name and the expected tenant
// travel in the signed state cookie, and the callback stores the user's
// chain under that name only when the token is that tenant's. The code is
// exchanged with the credentials, storage and encryption key of the
// fortnox handler with the same client_id and token_url, which must be in
// the same config. Other paths go on to the next handler.
type Connect struct {
	// The integration's client id. Required.
	ClientID string `json:"client_id,omitempty"`
	// The token endpoint. Default: Fortnox's.
	TokenURL string `json:"token_url,omitempty"`
	// Fortnox's authorize page. Default: https://apps.fortnox.se/oauth-v1/auth.
	AuthorizeURL string `json:"authorize_url,omitempty"`
	// The public URL of the callback, as registered in Fortnox's developer
	// portal. Required.
	RedirectURI string `json:"redirect_uri,omitempty"`
	// The scopes to ask for, space separated. Required.
	Scopes string `json:"scopes,omitempty"`
	// account_type sent to Fortnox. Default: service; "off" sends none.
	AccountType string `json:"account_type,omitempty"`
	// Where to send the browser after success, with ?tenant=<TenantId>
	// and account=<name> ("" for the service account) added. Default:
	// the built-in result page.
	SuccessRedirect string `json:"success_redirect,omitempty"`
	// A key (at least 32 bytes) that signs the state cookie and the result
	// page's address. Use a placeholder. Required.
	CookieSecret string `json:"cookie_secret,omitempty"`
	// The path that starts a connection. Default: "connect" beside the
	// callback path (/fortnox/callback → /fortnox/connect).
	ConnectPath string `json:"connect_path,omitempty"`
	// The path of the callback. Default: the path of redirect_uri.
	CallbackPath string `json:"callback_path,omitempty"`
	// The key (at least 32 bytes, used as text, never decoded) that signs
	// connect links naming an account: without it such links are refused.
	// Use a placeholder.
	LinkKey string `json:"link_key,omitempty"`
	// The integration's name as the customer knows it, in the pages'
	// titles and texts. Default: none (the pages say "the integration").
	AppName string `json:"app_name,omitempty"`
	// An html/template file that replaces the built-in page; its fields
	// are documented in docs/configuration.md. Checked at Provision.
	PageTemplate string `json:"page_template,omitempty"`

	linkKey        []byte
	cookieKey      []byte
	resultKey      []byte
	secure         bool
	redirect       *url.URL
	cookiePath     string
	connectPath    string
	callbackPath   string
	browserConnect string // the connect path as the browser sees it
	pages          *template.Template
	poolKey        string
	tokens         *tokens.Manager
	logger         *zap.Logger
	causes         *causeLog
}

// CaddyModule returns the Caddy module information.
func (*Connect) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.fortnox_connect",
		New: func() caddy.Module { return new(Connect) },
	}
}

// Provision checks the settings and joins the shared token manager.
func (c *Connect) Provision(ctx caddy.Context) error {
	c.logger = ctx.Logger()
	c.causes = &causeLog{every: time.Minute}
	repl := caddy.NewReplacer()
	clientID, err := resolveSetting(repl, "client_id", c.ClientID)
	if err != nil {
		return err
	}
	key, err := resolveSetting(repl, "cookie_secret", c.CookieSecret)
	if err != nil {
		return err
	}
	if len(key) < 32 {
		return errors.New("cookie_secret must be at least 32 bytes (e.g. `openssl rand -base64 32`)")
	}
	c.cookieKey = []byte(key)
	mac := hmac.New(sha256.New, c.cookieKey)
	mac.Write([]byte("fortnox_connect result pages"))
	c.resultKey = mac.Sum(nil)
	if c.LinkKey != "" {
		lk, err := resolveSetting(repl, "link_key", c.LinkKey)
		if err != nil {
			return err
		}
		if len(lk) < minLinkKeyLength {
			return fmt.Errorf("link_key must be at least %d bytes (e.g. `openssl rand -base64 32`)", minLinkKeyLength)
		}
		c.linkKey = []byte(lk)
	}
	if c.RedirectURI == "" {
		return errors.New("redirect_uri is required: the public URL of …/callback, as registered with Fortnox")
	}
	u, err := url.Parse(c.RedirectURI)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("redirect_uri %q is not an http(s) URL", c.RedirectURI)
	}
	// Secure cookies, except for a local test callback over plain HTTP.
	loopback := u.Hostname() == "127.0.0.1" || u.Hostname() == "localhost" || u.Hostname() == "::1"
	if u.Scheme == "http" && !loopback {
		return fmt.Errorf("redirect_uri %q must be https (plain http only on 127.0.0.1 or localhost, for tests)", c.RedirectURI)
	}
	c.secure = u.Scheme == "https"
	c.redirect = u
	c.callbackPath = c.CallbackPath
	if c.callbackPath == "" {
		c.callbackPath = u.Path
	}
	if c.callbackPath == "" || c.callbackPath == "/" {
		return fmt.Errorf("redirect_uri %q has no path for the callback: use e.g. https://connect.example.com/fortnox/callback", c.RedirectURI)
	}
	c.connectPath = c.ConnectPath
	if c.connectPath == "" {
		c.connectPath = path.Join(path.Dir(c.callbackPath), "connect")
	}
	for name, p := range map[string]string{"connect_path": c.connectPath, "callback_path": c.callbackPath} {
		if !strings.HasPrefix(p, "/") {
			return fmt.Errorf("%s %q must start with /", name, p)
		}
	}
	if c.connectPath == c.callbackPath {
		return fmt.Errorf("connect_path and callback_path are both %q: they must differ", c.connectPath)
	}
	// The browser comes back to redirect_uri, so that is the path it must
	// send the cookie to, also where callback_path differs (a prefix the
	// site strips). The connect path it sees has the same prefix.
	c.cookiePath = u.Path
	c.browserConnect = c.connectPath
	if prefix, ok := strings.CutSuffix(u.Path, c.callbackPath); ok {
		c.browserConnect = prefix + c.connectPath
	}
	if strings.TrimSpace(c.Scopes) == "" {
		return errors.New("scopes is required, e.g. scopes companyinformation invoice")
	}
	if c.AuthorizeURL == "" {
		c.AuthorizeURL = DefaultAuthorizeURL
	}
	if c.AccountType == "" {
		c.AccountType = "service"
	}
	if c.SuccessRedirect != "" {
		if su, err := url.Parse(c.SuccessRedirect); err != nil || su.Host == "" && !strings.HasPrefix(su.Path, "/") {
			return fmt.Errorf("success_redirect %q is not a URL or an absolute path", c.SuccessRedirect)
		}
	}
	if c.pages, err = loadPageTemplate(c.PageTemplate); err != nil {
		return err
	}
	c.tokens, c.poolKey, err = joinConfiguredManager(repl, c.TokenURL, clientID)
	return err
}

// Cleanup releases the token manager.
func (c *Connect) Cleanup() error { return leaveManager(c.poolKey) }

// ServeHTTP answers its connect and callback paths (exactly those); other
// paths go on. The callback path with ?result= (and no state) is the
// result page.
func (c *Connect) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	switch {
	case r.URL.Path == c.connectPath && r.Method == http.MethodGet:
		return c.start(w, r)
	case r.URL.Path == c.callbackPath && r.Method == http.MethodGet:
		q := r.URL.Query()
		if q.Has("result") && !q.Has("state") {
			c.showResult(w, r, q.Get("result"))
			return nil
		}
		c.callback(w, r)
		return nil
	}
	return next.ServeHTTP(w, r)
}

// flowCookie is what a flow's state cookie carries, signed: the state,
// when the flow expires, and what it is for (a tenant's service account:
// account "" and the tenant learned from the token; or a named user
// account of an expected tenant, with the signed link's query to start
// again with).
type flowCookie struct {
	State   string `json:"s"`
	Expires int64  `json:"x"`
	Account string `json:"a,omitempty"`
	Tenant  string `json:"t,omitempty"`
	Link    string `json:"l,omitempty"`
}

// connectTarget is what a connection is for.
type connectTarget struct {
	account, tenant string
}

func (f flowCookie) target() connectTarget {
	return connectTarget{account: f.Account, tenant: f.Tenant}
}

// stateCookieName is the name of the cookie of the flow with state.
func stateCookieName(state string) string {
	return stateCookiePrefix + state[:stateInCookieName]
}

// validState: the states start makes (43 base64url characters); anything
// else cannot be ours and names no cookie.
func validState(s string) bool {
	if len(s) != 43 {
		return false
	}
	for i := 0; i < len(s); i++ {
		ch := s[i]
		if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '_') {
			return false
		}
	}
	return true
}

// start sends the browser to Fortnox's authorize page with a fresh state,
// bound to the browser by a signed, short-lived cookie of its own that
// also carries what the connection is for.
func (c *Connect) start(w http.ResponseWriter, r *http.Request) error {
	c.commonHeaders(w)
	if there := c.canonicalURL(r); there != "" {
		http.Redirect(w, r, there, http.StatusFound)
		return nil
	}
	q := r.URL.Query()
	target := connectTarget{account: q.Get("account"), tenant: q.Get("tenant")}
	link := ""
	if q.Has("account") {
		if c.linkKey == nil {
			c.logCause("link_not_accepted", "connect link refused: it names an account, and link_key is not set")
			c.render(w, r, http.StatusBadRequest, pageInput{kind: kindLinkNotAccepted})
			return nil
		}
		if problem := checkLink(c.linkKey, q, clk.Now()); problem != "" {
			c.logCause(string(problem), "connect link refused")
			c.render(w, r, http.StatusForbidden, pageInput{kind: kindLinkInvalid})
			return nil
		}
		link = r.URL.RawQuery
	}
	if target.account != "" || target.tenant != "" {
		cause := ""
		switch {
		case c.AccountType != "off":
			cause = "link_account_with_service_accounts"
		case !tokens.ValidAccountName(target.account):
			cause = "link_bad_account"
		case !tokens.ValidTenantID(target.tenant):
			cause = "link_bad_tenant"
		}
		if cause != "" {
			c.logCause(cause, "connect link refused: it cannot connect a user account here")
			c.render(w, r, http.StatusBadRequest, pageInput{kind: kindLinkBad})
			return nil
		}
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	state := base64.RawURLEncoding.EncodeToString(raw)
	flow := flowCookie{State: state, Expires: clk.Now().Add(stateLifetime).Unix(), Account: target.account, Tenant: target.tenant, Link: link}
	http.SetCookie(w, &http.Cookie{
		Name: stateCookieName(state), Value: c.seal(c.cookieKey, flow), Path: c.cookiePath,
		MaxAge: int((stateLifetime + cookieGrace) / time.Second), HttpOnly: true, Secure: c.secure, SameSite: http.SameSiteLaxMode,
	})
	q = url.Values{
		"client_id":     {c.tokens.ClientID()},
		"redirect_uri":  {c.RedirectURI},
		"scope":         {strings.Join(strings.Fields(c.Scopes), " ")},
		"state":         {state},
		"access_type":   {"offline"},
		"response_type": {"code"},
	}
	if c.AccountType != "off" {
		q.Set("account_type", c.AccountType)
	}
	http.Redirect(w, r, c.AuthorizeURL+"?"+q.Encode(), http.StatusFound)
	return nil
}

// canonicalURL returns where to send a connect link opened on another
// host than redirect_uri's ("" when it is on that host): the state cookie
// is set for the host the browser asks, and must be there when Fortnox
// sends the browser back to redirect_uri.
func (c *Connect) canonicalURL(r *http.Request) string {
	if sameHost(r.Host, c.redirect) {
		return ""
	}
	uri := r.URL.RequestURI()
	if orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok && orig.URL != nil {
		uri = orig.URL.RequestURI()
	}
	return c.redirect.Scheme + "://" + c.redirect.Host + uri
}

// sameHost reports whether the Host header names u's host (a default
// port written out or not).
func sameHost(host string, u *url.URL) bool {
	host = strings.ToLower(host)
	want := strings.ToLower(u.Host)
	if host == want {
		return true
	}
	port := "80"
	if u.Scheme == "https" {
		port = "443"
	}
	if u.Port() == "" {
		return host == want+":"+port
	}
	return u.Port() == port && host == strings.ToLower(u.Hostname())
}

// seal signs v with key: base64url("1" + JSON).base64url(mac). (The "1"
// is a version, and keeps the value from looking like a JWT to a log
// scanner.)
func (c *Connect) seal(key []byte, v any) string {
	b, _ := json.Marshal(v)
	payload := base64.RawURLEncoding.EncodeToString(append([]byte{'1'}, b...))
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(payload))
	return payload + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

// open checks a sealed value and decodes it into v.
func (c *Connect) open(key []byte, sealed string, v any) bool {
	payload, sig, ok := strings.Cut(sealed, ".")
	if !ok || len(sealed) > 4096 {
		return false
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(payload))
	want := base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
	if !hmac.Equal([]byte(want), []byte(sig)) {
		return false
	}
	b, err := base64.RawURLEncoding.DecodeString(payload)
	return err == nil && len(b) > 0 && b[0] == '1' && json.Unmarshal(b[1:], v) == nil
}

// connectResult is how a flow ended, signed into the result page's
// address (and kept for the state's lifetime, for a state that comes
// back). Never a code or a token.
type connectResult struct {
	Kind    string `json:"k"`
	Tenant  string `json:"t,omitempty"` // the company connected, or the one the link expected
	Chosen  string `json:"c,omitempty"` // the company chosen on Fortnox's page, when it was another
	Account string `json:"a,omitempty"`
	Detail  string `json:"d,omitempty"` // Fortnox's error_description, cut
	Link    string `json:"l,omitempty"` // the signed link's query, to start again with
	Expires int64  `json:"x"`
}

// callback finishes the connection. Each way out that follows a valid
// state is a result: kept under the state and shown at a result URL, so
// that a reload, back or forward shows it again.
func (c *Connect) callback(w http.ResponseWriter, r *http.Request) {
	c.commonHeaders(w)
	q := r.URL.Query()
	state := q.Get("state")
	if !validState(state) {
		c.logCause("state_missing_or_malformed", "connect callback refused: no state of ours")
		c.render(w, r, http.StatusBadRequest, pageInput{kind: kindNoFlow})
		return
	}
	name := stateCookieName(state)
	cookie, cookieErr := r.Cookie(name)
	if cookieErr == nil {
		// Its own state has returned: the cookie is spent.
		http.SetCookie(w, &http.Cookie{Name: name, Value: "", Path: c.cookiePath, MaxAge: -1, HttpOnly: true, Secure: c.secure, SameSite: http.SameSiteLaxMode})
	}
	if res, ok := c.keptResult(r.Context(), state); ok {
		if res.Kind == kindConnected {
			res.Kind = kindAlready
			c.render(w, r, http.StatusOK, pageInput{kind: kindAlready, result: res})
			return
		}
		http.Redirect(w, r, c.resultURL(c.seal(c.resultKey, res)), http.StatusSeeOther)
		return
	}
	if cookieErr != nil {
		c.logCause("state_no_cookie", "connect callback refused: this browser has no cookie for the state (another browser, or the flow expired)")
		c.render(w, r, http.StatusBadRequest, pageInput{kind: kindNoFlow})
		return
	}
	var flow flowCookie
	if !c.open(c.cookieKey, cookie.Value, &flow) || !hmac.Equal([]byte(flow.State), []byte(state)) {
		c.logCause("state_cookie_invalid", "connect callback refused: the state cookie is not ours or not this state's")
		c.render(w, r, http.StatusBadRequest, pageInput{kind: kindBadFlow})
		return
	}
	in := pageInput{result: connectResult{Tenant: flow.Tenant, Account: flow.Account, Link: flow.Link}}
	if clk.Now().After(time.Unix(flow.Expires, 0)) {
		c.logCause("state_expired", "connect callback refused: the flow took longer than its state lives", zap.Duration("lifetime", stateLifetime))
		in.kind = kindTooLong
		c.render(w, r, http.StatusBadRequest, in)
		return
	}
	fresh, err := c.tokens.Shared().FirstUse(r.Context(), "connect-state:"+state, stateLifetime+cookieGrace)
	if err != nil {
		c.logCause("state_check_unavailable", "connect callback refused: used states cannot be checked", zap.Error(err))
		in.kind = kindTryLater
		c.render(w, r, http.StatusServiceUnavailable, in)
		return
	}
	if !fresh {
		// Used, and no result kept yet: its first callback is still at work.
		in.kind = kindInProgress
		c.render(w, r, http.StatusConflict, in)
		return
	}
	res := c.complete(r, flow, q)
	c.finish(w, r, state, res)
}

// complete exchanges the code and stores what it brings; it returns the
// result to show.
func (c *Connect) complete(r *http.Request, flow flowCookie, q url.Values) connectResult {
	res := connectResult{Tenant: flow.Tenant, Account: flow.Account, Link: flow.Link}
	target := flow.target()
	if fe := q.Get("error"); fe != "" {
		res.Kind, res.Detail = kindFortnoxError, cutRunes(q.Get("error_description"), maxShownDescription)
		if fe == "access_denied" {
			res.Kind = kindDenied
		}
		c.logCause("fortnox_refused:"+target.tenant, "Fortnox refused the connection", zap.String("error", cutRunes(fe, 64)), zap.String("error_description", res.Detail))
		return res
	}
	code := q.Get("code")
	if code == "" {
		c.logCause("no_code", "connect callback: Fortnox sent neither a code nor an error")
		res.Kind = kindExchangeFailed
		return res
	}
	s := c.tokens.Settings.Load()
	if s == nil || s.Records == nil {
		c.logCause("no_fortnox_handler", "connect callback: no fortnox handler with this client_id and token_url is loaded; add one to the same config")
		res.Kind = kindNotSaved
		return res
	}
	// Not under the browser's context: once the code is exchanged, Fortnox
	// has spent it, and a browser that leaves must not lose the grant.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), tokens.LockBudget+s.TokenTimeout)
	defer cancel()
	answer, err := c.tokens.Client.ExchangeCode(ctx, s.Cred, code, c.RedirectURI)
	if err != nil {
		c.logCause("exchange_failed", "code exchange failed", zap.Error(tokens.AsTokenError(err)))
		res.Kind = kindExchangeFailed
		return res
	}
	tenant, err := tokens.TenantFromToken(answer.AccessToken)
	if target.account != "" {
		return c.connectAccount(ctx, target, answer, tenant, res)
	}
	if err != nil {
		c.logCause("token_names_no_tenant", "connect callback: Fortnox's token names no tenant", zap.Error(err))
		res.Kind = kindNoCompany
		return res
	}
	res.Tenant = tenant
	if answer.RefreshToken != "" {
		if err := c.tokens.Ops().StoreAnswer(ctx, tokens.Subject{Tenant: tenant}, answer); err != nil {
			return c.storeFailed(tokens.Subject{Tenant: tenant}, err, tenant, res)
		}
	}
	// The access token of the code grant belongs to the administrator who
	// connected; it is not cached: the tenant's requests get the service
	// account's token (client credentials) or, failing that, one from the
	// stored refresh token.
	c.tokens.ConsentCreated(tenant)
	c.logger.Info("customer connected", zap.String("tenant", tenant))
	res.Kind = kindConnected
	return res
}

// connectAccount stores a user's chain under the account name the signed
// state carries, when the token is the expected tenant's. tokenTenant is
// the tenant the token names ("" if none).
func (c *Connect) connectAccount(ctx context.Context, target connectTarget, answer *tokens.Answer, tokenTenant string, res connectResult) connectResult {
	subj := tokens.Subject{Tenant: target.tenant, Account: target.account}
	if answer.RefreshToken == "" {
		c.logCause("no_refresh_token:"+target.tenant, "connect callback: Fortnox gave no refresh token for the user (was access_type=offline refused?)", subj.LogFields()...)
		res.Kind = kindNoRefreshToken
		return res
	}
	if err := c.tokens.Ops().StoreAnswer(ctx, subj, answer); err != nil {
		return c.storeFailed(subj, err, tokenTenant, res)
	}
	c.logger.Info("user account connected", subj.LogFields()...)
	res.Kind = kindConnected
	return res
}

// storeFailed turns what the store answered into a result; the whole
// story (where the refresh token went, what the operator can do) is for
// the log.
func (c *Connect) storeFailed(subj tokens.Subject, err error, tokenTenant string, res connectResult) connectResult {
	res.Kind = kindNotSaved
	if ae, ok := asAdminError(err); ok {
		switch ae.code {
		case "tenant_mismatch":
			res.Kind, res.Chosen = kindTenantMismatch, tokenTenant
		case "account_user_mismatch":
			res.Kind = kindUserMismatch
		}
	}
	cause := res.Kind + ":" + subj.Tenant
	c.logCause(cause, "a connection's refresh token was not stored under its name", append(subj.LogFields(), zap.Error(err))...)
	return res
}

// finish keeps the result under the state and sends the browser to it
// (303), or after a success to success_redirect when one is set.
func (c *Connect) finish(w http.ResponseWriter, r *http.Request, state string, res connectResult) {
	res.Expires = clk.Now().Add(stateLifetime).Unix()
	sealed := c.seal(c.resultKey, res)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), tokens.SharedCallLimit)
	defer cancel()
	if err := c.tokens.Shared().KeepResult(ctx, "connect-result:"+state, sealed, stateLifetime+cookieGrace); err != nil {
		c.logCause("result_not_kept", "a connection's result could not be kept for a reload", zap.Error(err))
	}
	if res.Kind == kindConnected && c.SuccessRedirect != "" {
		u, _ := url.Parse(c.SuccessRedirect)
		q := u.Query()
		q.Set("tenant", res.Tenant)
		q.Set("account", res.Account)
		u.RawQuery = q.Encode()
		http.Redirect(w, r, u.String(), http.StatusSeeOther)
		return
	}
	http.Redirect(w, r, c.resultURL(sealed), http.StatusSeeOther)
}

// keptResult returns the result kept for a state whose flow has ended.
func (c *Connect) keptResult(ctx context.Context, state string) (connectResult, bool) {
	ctx, cancel := context.WithTimeout(ctx, tokens.SharedCallLimit)
	defer cancel()
	sealed, err := c.tokens.Shared().FlowResult(ctx, "connect-result:"+state)
	var res connectResult
	if err != nil || sealed == "" || !c.open(c.resultKey, sealed, &res) {
		return connectResult{}, false
	}
	return res, true
}

// resultURL is the result page's address, on the path the browser came
// back to.
func (c *Connect) resultURL(sealed string) string {
	return c.cookiePath + "?result=" + url.QueryEscape(sealed)
}

// showResult is GET <callback>?result=…: the same page for as long as the
// flow's state lives.
func (c *Connect) showResult(w http.ResponseWriter, r *http.Request, sealed string) {
	c.commonHeaders(w)
	var res connectResult
	if !c.open(c.resultKey, sealed, &res) {
		c.logCause("result_not_ours", "connect result page refused: its address is not signed by this site")
		c.render(w, r, http.StatusBadRequest, pageInput{kind: kindGone})
		return
	}
	if clk.Now().After(time.Unix(res.Expires, 0)) {
		c.render(w, r, http.StatusGone, pageInput{kind: kindGone})
		return
	}
	c.render(w, r, resultStatus(res.Kind), pageInput{kind: res.Kind, result: res})
}

// commonHeaders: never cached, never sends the address on, never framed.
func (c *Connect) commonHeaders(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	fortnox_connect {
//		client_id        <id>
//		connect_path     <path>
//		callback_path    <path>
//		token_url        <url>
//		authorize_url    <url>
//		redirect_uri     <url>
//		scopes           <scope...>
//		account_type     service|off
//		success_redirect <url>
//		cookie_secret    <secret>
//		link_key         <key>
//		app_name         <name>
//		page_template    <file>
//	}
func (c *Connect) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	var scopes []string
	err := unmarshalBlock(d, map[string]*string{
		"client_id":        &c.ClientID,
		"token_url":        &c.TokenURL,
		"authorize_url":    &c.AuthorizeURL,
		"redirect_uri":     &c.RedirectURI,
		"account_type":     &c.AccountType,
		"success_redirect": &c.SuccessRedirect,
		"cookie_secret":    &c.CookieSecret,
		"connect_path":     &c.ConnectPath,
		"callback_path":    &c.CallbackPath,
		"link_key":         &c.LinkKey,
		"app_name":         &c.AppName,
		"page_template":    &c.PageTemplate,
	}, map[string]*[]string{"scopes": &scopes})
	if len(scopes) > 0 {
		c.Scopes = strings.Join(scopes, " ")
	}
	return err
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Connect)(nil)
	_ caddy.CleanerUpper          = (*Connect)(nil)
	_ caddyhttp.MiddlewareHandler = (*Connect)(nil)
	_ caddyfile.Unmarshaler       = (*Connect)(nil)
)

// causeLog logs a repeating cause at most once a minute, with the count
// of those left out since: a stranger who sends a thousand bad callbacks
// writes one line a minute, not a thousand. A cause is a fixed kind,
// never a value the browser sent.
type causeLog struct {
	mu    sync.Mutex
	seen  map[string]*causeSeen
	every time.Duration
}

type causeSeen struct {
	last    time.Time
	skipped int
}

// allow reports whether cause may be logged now, and how many were left
// out since it last was.
func (l *causeLog) allow(cause string) (bool, int) {
	t := clk.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.seen == nil {
		l.seen = make(map[string]*causeSeen)
	}
	s := l.seen[cause]
	if s == nil {
		if len(l.seen) >= 1024 { // causes are a fixed set; this only bounds memory
			l.seen = make(map[string]*causeSeen)
		}
		s = &causeSeen{}
		l.seen[cause] = s
	} else if t.Sub(s.last) < l.every {
		s.skipped++
		return false, 0
	}
	skipped := s.skipped
	s.last, s.skipped = t, 0
	return true, skipped
}

// logCause writes msg at WARN for cause, at most once a minute per cause.
func (c *Connect) logCause(cause, msg string, fields ...zap.Field) {
	ok, skipped := c.causes.allow(cause)
	if !ok {
		return
	}
	fields = append([]zap.Field{zap.String("cause", cause)}, fields...)
	if skipped > 0 {
		fields = append(fields, zap.Int("not_logged", skipped))
	}
	c.logger.Warn(msg, fields...)
}

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

// The pages a customer's administrator meets: in Swedish or English by
// Accept-Language, in plain words (the technical cause goes to the log),
// titled with app_name, readable on a phone, never framed, never cached.

// The kinds of page (also connectResult.Kind and PageData.Kind).
const (
	kindConnected       = "connected"
	kindAlready         = "already_connected"
	kindDenied          = "denied"
	kindFortnoxError    = "fortnox_error"
	kindNoFlow          = "no_flow"
	kindBadFlow         = "bad_flow"
	kindTooLong         = "took_too_long"
	kindInProgress      = "in_progress"
	kindTryLater        = "try_later"
	kindExchangeFailed  = "exchange_failed"
	kindNoCompany       = "no_company"
	kindTenantMismatch  = "tenant_mismatch"
	kindUserMismatch    = "account_user_mismatch"
	kindNoRefreshToken  = "no_refresh_token"
	kindNotSaved        = "not_saved"
	kindLinkInvalid     = "link_invalid"
	kindLinkNotAccepted = "link_not_accepted"
	kindLinkBad         = "link_bad"
	kindGone            = "result_gone"
)

// maxShownDescription is how many characters of Fortnox's
// error_description a page shows.
const maxShownDescription = 200

// resultStatus is the status a result page answers with.
func resultStatus(kind string) int {
	switch kind {
	case kindConnected, kindAlready:
		return http.StatusOK
	case kindDenied, kindFortnoxError:
		return http.StatusForbidden
	case kindTenantMismatch, kindUserMismatch:
		return http.StatusConflict
	case kindExchangeFailed, kindNoCompany, kindNoRefreshToken:
		return http.StatusBadGateway
	case kindNotSaved:
		return http.StatusInternalServerError
	}
	return http.StatusBadRequest
}

// PageData is what a page template is executed with (page_template's
// fields, documented in docs/configuration.md).
type PageData struct {
	Lang          string       // "sv" or "en", by Accept-Language
	AppName       string       // app_name ("" when not set)
	Title         string       // the page's title, app_name included
	Heading       string       // what happened, in a few words
	Message       string       // what it means and what to do, plain text
	Kind          string       // what happened, for a template that words it itself (e.g. "connected")
	Success       bool         // the company (or account) is connected
	Tenant        string       // the company's TenantId, when known
	Account       string       // the user account's name ("" for the service account)
	Detail        string       // Fortnox's own words (error_description), cut; "" if none
	StartAgainURL string       // where to start again; "" when starting again would not help
	StartAgain    string       // the link's text ("Start again" / "Börja om")
	CloseHint     string       // "You may close this window." on success, else ""
	Labels        PageLabels   // the words around the values, in Lang
	Nonce         string       // the CSP nonce: <style nonce="{{.Nonce}}">
	Style         template.CSS // the built-in stylesheet
	Status        int          // the HTTP status
}

// PageLabels are the fixed words of a page, in its language.
type PageLabels struct {
	Company, Account, Fortnox string
}

// pageInput is what render needs to make a page.
type pageInput struct {
	kind   string
	result connectResult
}

// render writes a page: the operator's template or the built-in one.
func (c *Connect) render(w http.ResponseWriter, r *http.Request, status int, in pageInput) {
	lang := pickLanguage(r.Header.Get("Accept-Language"))
	d := c.pageData(lang, status, in)
	nonce := make([]byte, 18)
	_, _ = rand.Read(nonce)
	d.Nonce = base64.RawURLEncoding.EncodeToString(nonce)
	tmpl := c.pages
	if tmpl == nil {
		tmpl = builtinPage
	}
	var body bytes.Buffer
	if err := tmpl.Execute(&body, d); err != nil {
		c.logCause("page_template_failed", "page_template could not be executed: the built-in page is shown", zap.Error(err))
		body.Reset()
		_ = builtinPage.Execute(&body, d)
	}
	h := w.Header()
	c.commonHeaders(w)
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'nonce-"+d.Nonce+"'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Language", lang)
	h.Set("Vary", "Accept-Language")
	w.WriteHeader(status)
	_, _ = w.Write(body.Bytes())
}

// pageData words a page in lang.
func (c *Connect) pageData(lang string, status int, in pageInput) PageData {
	res := in.result
	sv := lang == "sv"
	app := c.AppName
	if app == "" {
		app = pick(sv, "integrationen", "the integration")
	}
	d := PageData{
		Lang: lang, AppName: c.AppName, Kind: in.kind, Status: status,
		Tenant: res.Tenant, Account: res.Account, Detail: res.Detail, Style: builtinStyle,
		StartAgain: pick(sv, "Börja om", "Start again"),
		Labels: PageLabels{
			Company: pick(sv, "Företagets TenantId i Fortnox", "Company (Fortnox TenantId)"),
			Account: pick(sv, "Användarkonto", "User account"),
			Fortnox: pick(sv, "Fortnox svarade", "Fortnox said"),
		},
	}
	startAgain := true
	switch in.kind {
	case kindConnected:
		d.Success, startAgain = true, false
		d.Heading = pick(sv, "Klart – anslutet till Fortnox", "Done – connected to Fortnox")
		d.Message = pick(sv, capital(app)+" är nu anslutet till ert företag i Fortnox.", capital(app)+" is now connected to your company in Fortnox.")
		if res.Account != "" {
			d.Message = pick(sv, "Din Fortnox-användare är nu ansluten till "+app+" som kontot "+res.Account+".",
				"Your Fortnox user is now connected to "+app+" as account "+res.Account+".")
		}
	case kindAlready:
		d.Success, startAgain = true, false
		d.Heading = pick(sv, "Redan anslutet", "Already connected")
		d.Message = pick(sv, "Den här anslutningen är redan klar: "+app+" är anslutet till ert företag i Fortnox.",
			"This connection is already complete: "+app+" is connected to your company in Fortnox.")
	case kindDenied:
		d.Heading = pick(sv, "Anslutningen avbröts", "The connection was cancelled")
		d.Message = pick(sv, "Anslutningen godkändes inte i Fortnox, så ingenting har ändrats. Du kan börja om när du vill.",
			"The connection was not approved in Fortnox, so nothing has changed. You can start again whenever you like.")
	case kindFortnoxError:
		d.Heading = pick(sv, "Fortnox avbröt anslutningen", "Fortnox stopped the connection")
		d.Message = pick(sv, "Fortnox slutförde inte anslutningen, så ingenting har ändrats. Börja om; händer det igen, kontakta "+app+".",
			"Fortnox did not complete the connection, so nothing has changed. Start again; if it happens again, contact "+app+".")
	case kindNoFlow:
		d.Heading = pick(sv, "Anslutningen kunde inte slutföras här", "The connection could not be completed here")
		d.Message = pick(sv, "Den här sidan hör till en anslutning som startades i en annan webbläsare, eller som tog för lång tid. Börja om i den här webbläsaren.",
			"This page belongs to a connection that was started in another browser, or that took too long. Start again in this browser.")
	case kindBadFlow:
		d.Heading = pick(sv, "Anslutningen kunde inte kontrolleras", "The connection could not be checked")
		d.Message = pick(sv, "Något stämde inte med anslutningen i den här webbläsaren, så ingenting har ändrats. Börja om.",
			"Something about the connection in this browser did not match, so nothing has changed. Start again.")
	case kindTooLong:
		d.Heading = pick(sv, "Det tog för lång tid", "That took too long")
		d.Message = pick(sv, "En anslutning måste slutföras inom "+minutes(stateLifetime)+" minuter, så ingenting har ändrats. Börja om.",
			"A connection must be completed within "+minutes(stateLifetime)+" minutes, so nothing has changed. Start again.")
	case kindInProgress:
		d.Heading = pick(sv, "Anslutningen slutförs", "The connection is being completed")
		d.Message = pick(sv, "Anslutningen håller på att slutföras. Vänta en stund och ladda sedan om sidan.",
			"The connection is being completed. Wait a moment, then reload this page.")
		startAgain = false
	case kindTryLater:
		d.Heading = pick(sv, "Försök igen om en stund", "Please try again in a moment")
		d.Message = pick(sv, "Anslutningen kunde inte kontrolleras just nu, så ingenting har ändrats. Börja om om en stund.",
			"The connection could not be checked just now, so nothing has changed. Start again in a moment.")
	case kindExchangeFailed:
		d.Heading = pick(sv, "Fortnox slutförde inte anslutningen", "Fortnox did not complete the connection")
		d.Message = pick(sv, "Fortnox svarade inte som väntat, så ingenting har ändrats. Börja om; händer det igen, försök senare.",
			"Fortnox did not answer as expected, so nothing has changed. Start again; if it happens again, try later.")
	case kindNoCompany:
		d.Heading = pick(sv, "Inget företag angavs", "No company was named")
		d.Message = pick(sv, "Fortnox angav inte vilket företag anslutningen gäller, så ingenting har sparats. Börja om.",
			"Fortnox did not say which company the connection is for, so nothing was saved. Start again.")
	case kindTenantMismatch:
		d.Heading = pick(sv, "Fel företag valt", "Another company was chosen")
		if res.Chosen != "" {
			d.Message = pick(sv, "Den här länken ansluter kontot "+res.Account+" till företaget med TenantId "+res.Tenant+", men företaget som valdes på Fortnox sida var "+res.Chosen+", så ingenting sparades för "+res.Tenant+". Börja om och välj företaget "+res.Tenant+".",
				"This link connects account "+res.Account+" to the company with TenantId "+res.Tenant+", but the company chosen on Fortnox's page was "+res.Chosen+", so nothing was stored for "+res.Tenant+". Start again and choose the company "+res.Tenant+".")
		} else {
			d.Message = pick(sv, "Fortnox svar angav inget företag, så det kunde inte visas vara "+res.Tenant+"; ingenting sparades. Börja om.",
				"Fortnox's answer names no company, so it cannot be shown to be "+res.Tenant+"'s; nothing was stored. Start again.")
		}
	case kindUserMismatch:
		d.Heading = pick(sv, "Kontot tillhör en annan användare", "The account belongs to another user")
		d.Message = pick(sv, "Kontot "+res.Account+" hos företaget "+res.Tenant+" tillhör en annan Fortnox-användare, så ingenting sparades. Logga in i Fortnox som den användaren och börja om, eller be "+app+" att ta bort kontot först.",
			"Account "+res.Account+" of the company "+res.Tenant+" belongs to another Fortnox user, so nothing was stored. Log in to Fortnox as that user and start again, or ask "+app+" to remove the account first.")
	case kindNoRefreshToken:
		d.Heading = pick(sv, "Fortnox gav ingen bestående åtkomst", "Fortnox gave no lasting access")
		d.Message = pick(sv, "Fortnox godkände inte bestående åtkomst för din användare, så ingenting sparades. Börja om.",
			"Fortnox did not grant lasting access for your user, so nothing was saved. Start again.")
	case kindNotSaved:
		d.Heading = pick(sv, "Anslutningen kunde inte sparas", "The connection could not be saved")
		d.Message = pick(sv, "Något gick fel hos "+app+" när anslutningen skulle sparas. Försök igen om en stund; händer det igen, kontakta "+app+".",
			"Something went wrong at "+app+" while saving the connection. Try again in a moment; if it happens again, contact "+app+".")
	case kindLinkInvalid:
		d.Heading = pick(sv, "Länken är inte giltig", "This link is not valid")
		d.Message = pick(sv, "Länken har gått ut, har ändrats eller kommer inte från "+app+". Be "+app+" om en ny länk.",
			"The link has expired, was changed, or does not come from "+app+". Ask "+app+" for a new link.")
		startAgain = false
	case kindLinkNotAccepted:
		d.Heading = pick(sv, "Länken kan inte användas här", "This link cannot be used here")
		d.Message = pick(sv, "Den här webbplatsen tar inte emot länkar som ansluter ett användarkonto. Be "+app+" om en annan länk.",
			"This site does not accept links that connect a user account. Ask "+app+" for another link.")
		startAgain = false
	case kindLinkBad:
		d.Heading = pick(sv, "Länken kan inte ansluta ett användarkonto", "This link cannot connect a user account")
		d.Message = pick(sv, "Länken är ofullständig eller inte avsedd för den här webbplatsen. Be "+app+" om en ny länk.",
			"The link is incomplete or not meant for this site. Ask "+app+" for a new link.")
		startAgain = false
	case kindGone:
		d.Heading = pick(sv, "Sidan finns inte längre", "This page is no longer available")
		d.Message = pick(sv, "Resultatet av anslutningen visas bara en kort stund. Blev ert företag anslutet så är det fortfarande anslutet; annars kan du börja om.",
			"The result of a connection is shown for a short while only. If your company was connected, it still is; otherwise you can start again.")
	}
	if d.Success {
		d.CloseHint = pick(sv, "Du kan stänga det här fönstret.", "You may close this window.")
	}
	if startAgain {
		d.StartAgainURL = c.startAgainURL(res)
	}
	name := "Fortnox"
	if c.AppName != "" {
		name = c.AppName + " – Fortnox"
	}
	d.Title = d.Heading + " · " + name
	return d
}

// startAgainURL is where a flow starts again: the signed link it began
// with while that is valid, the plain connect path for a service-account
// connection; "" when neither would do (an account flow whose link has
// expired, or an unknown flow where only account links are used).
func (c *Connect) startAgainURL(res connectResult) string {
	if res.Link != "" {
		q, err := url.ParseQuery(res.Link)
		if err != nil || checkLink(c.linkKey, q, clk.Now()) != "" {
			return ""
		}
		return c.browserConnect + "?" + res.Link
	}
	if res.Account != "" || (res.Tenant == "" && c.AccountType == "off") {
		return ""
	}
	return c.browserConnect
}

// pickLanguage returns "sv" when Swedish comes first in Accept-Language
// (by q, then by order), else "en".
func pickLanguage(header string) string {
	type choice struct {
		lang  string
		q     float64
		order int
	}
	var choices []choice
	for i, part := range strings.Split(header, ",") {
		tag, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		tag = strings.ToLower(strings.TrimSpace(tag))
		q := 1.0
		if v, ok := strings.CutPrefix(strings.TrimSpace(params), "q="); ok {
			if f, err := strconv.ParseFloat(v, 64); err == nil {
				q = f
			}
		}
		primary, _, _ := strings.Cut(tag, "-")
		if q > 0 && (primary == "sv" || primary == "en") {
			choices = append(choices, choice{primary, q, i})
		}
	}
	sort.SliceStable(choices, func(a, b int) bool { return choices[a].q > choices[b].q })
	if len(choices) > 0 && choices[0].lang == "sv" {
		return "sv"
	}
	return "en"
}

func pick(sv bool, swedish, english string) string {
	if sv {
		return swedish
	}
	return english
}

func capital(s string) string {
	r, n := utf8.DecodeRuneInString(s)
	if r == utf8.RuneError {
		return s
	}
	return strings.ToUpper(string(r)) + s[n:]
}

func minutes(d time.Duration) string { return strconv.Itoa(int(d / time.Minute)) }

// cutRunes keeps the first n characters of s (never half of one), with
// control characters as spaces and invalid UTF-8 dropped.
func cutRunes(s string, n int) string {
	s = strings.ToValidUTF8(s, "")
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	i := 0
	for k := range s {
		if i == n {
			return s[:k] + "…"
		}
		i++
	}
	return s
}

// loadPageTemplate parses page_template and executes it once with sample
// data, so a broken template fails the config, not a customer's page.
func loadPageTemplate(file string) (*template.Template, error) {
	if file == "" {
		return nil, nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("page_template: %v", err)
	}
	t, err := template.New("page").Parse(string(b))
	if err != nil {
		return nil, fmt.Errorf("page_template %s: %v", file, err)
	}
	sample := PageData{Lang: "en", Title: "t", Heading: "h", Message: "m", Kind: kindConnected, Success: true, Tenant: "1234567",
		Account: "anna", Detail: "d", StartAgainURL: "/fortnox/connect", StartAgain: "Start again", CloseHint: "c", Nonce: "n", Style: builtinStyle, Status: 200}
	if err := t.Execute(io.Discard, sample); err != nil {
		return nil, fmt.Errorf("page_template %s does not execute with the documented fields: %v", file, err)
	}
	return t, nil
}

// builtinStyle is small and self-contained: no fonts or images to fetch.
const builtinStyle template.CSS = `*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2433;background:#f3f5f8}
main{max-width:34rem;margin:0 auto;padding:2.5rem 1.25rem}
.card{background:#fff;border-radius:12px;padding:1.75rem 1.5rem;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h1{font-size:1.4rem;line-height:1.3;margin:0 0 .75rem}
.ok h1{color:#0b6b3a}.fail h1{color:#9b1c1c}
p{margin:.5rem 0}
dl{margin:1rem 0;display:grid;grid-template-columns:auto 1fr;gap:.25rem 1rem}
dt{color:#5b6475}dd{margin:0;font-weight:600;overflow-wrap:anywhere}
blockquote{margin:1rem 0;padding:.5rem .75rem;border-left:3px solid #c9ced8;color:#3d4556;overflow-wrap:anywhere}
a.button{display:inline-block;margin-top:1rem;padding:.65rem 1.1rem;border-radius:8px;background:#1f6feb;color:#fff;text-decoration:none;font-weight:600}
.close{color:#5b6475;margin-top:1rem}
.app{color:#5b6475;font-size:.9rem;margin:0 0 1rem}
@media (max-width:30rem){main{padding:1rem .75rem}dl{grid-template-columns:1fr}dd{margin-bottom:.5rem}}`

var builtinPage = template.Must(template.New("page").Parse(`<!doctype html>
<html lang="{{.Lang}}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{{.Title}}</title>
<style nonce="{{.Nonce}}">{{.Style}}</style></head>
<body><main><div class="card {{if .Success}}ok{{else}}fail{{end}}" id="{{.Kind}}">
{{if .AppName}}<p class="app">{{.AppName}}</p>{{end}}
<h1>{{.Heading}}</h1>
<p id="message">{{.Message}}</p>
{{if .Detail}}<blockquote><span>{{.Labels.Fortnox}}:</span> <span id="detail">{{.Detail}}</span></blockquote>{{end}}
{{if or .Tenant .Account}}<dl>{{if .Tenant}}<dt>{{.Labels.Company}}</dt><dd><strong id="tenant">{{.Tenant}}</strong></dd>{{end}}{{if .Account}}<dt>{{.Labels.Account}}</dt><dd id="account">{{.Account}}</dd>{{end}}</dl>{{end}}
{{if .CloseHint}}<p class="close" id="close">{{.CloseHint}}</p>{{end}}
{{if .StartAgainURL}}<a class="button" id="start-again" href="{{.StartAgainURL}}">{{.StartAgain}}</a>{{end}}
</div></main></body></html>
`))
