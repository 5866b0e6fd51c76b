package fortnox

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"

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
	stateCookie   = "fortnox_connect_state"
	stateLifetime = 10 * time.Minute // as long as Fortnox's codes live
)

// Connect is the `fortnox_connect` handler, for a public site: it lets a
// customer's administrator connect the integration (the authorization-code
// flow, with account_type=service by default so that Fortnox creates a
// service-account consent). `GET <connect_path>` sends the browser to
// Fortnox; `GET <callback_path>` (the redirect_uri) checks the state,
// exchanges the code, reads the TenantId from the access token and stores
// the refresh token as the tenant's fallback. With account_type off,
// `GET <connect_path>?account=<name>&tenant=<TenantId>` connects a named
// user account instead: the name and the expected tenant travel in the
// signed state, and the callback stores the user's chain under that name
// only when the token is that tenant's. The code is exchanged with the
// credentials, storage and encryption key of the fortnox handler with the
// same client_id and token_url, which must be in the same config. Other
// paths go on to the next handler.
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
	// added. Default: a plain success page.
	SuccessRedirect string `json:"success_redirect,omitempty"`
	// A key (at least 32 bytes) that signs the state cookie. Use a
	// placeholder. Required.
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

	linkKey      []byte
	cookieKey    []byte
	secure       bool
	cookiePath   string
	connectPath  string
	callbackPath string
	poolKey      string
	tokens       *tokenManager
	logger       *zap.Logger
	causes       *causeLog
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
	// site strips).
	c.cookiePath = u.Path
	if strings.TrimSpace(c.Scopes) == "" {
		return errors.New("scopes is required, e.g. scopes companyinformation invoice")
	}
	if c.AuthorizeURL == "" {
		c.AuthorizeURL = DefaultAuthorizeURL
	}
	if c.AccountType == "" {
		c.AccountType = "service"
	}
	c.tokens, c.poolKey, err = joinManager(resolveTokenURL(repl, c.TokenURL), clientID)
	return err
}

// Cleanup releases the token manager.
func (c *Connect) Cleanup() error { return leaveManager(c.poolKey) }

// ServeHTTP answers its connect and callback paths (exactly those); other
// paths go on.
func (c *Connect) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	switch {
	case r.URL.Path == c.connectPath && r.Method == http.MethodGet:
		return c.start(w, r)
	case r.URL.Path == c.callbackPath && r.Method == http.MethodGet:
		c.callback(w, r)
		return nil
	}
	return next.ServeHTTP(w, r)
}

// connectTarget is what a connection is for: a tenant's service account
// (account "" and tenant learned from the token), or a named user account
// of an expected tenant.
type connectTarget struct {
	account, tenant string
}

// start sends the browser to Fortnox's authorize page with a fresh state,
// bound to the browser by a signed, short-lived cookie that also carries
// what the connection is for.
func (c *Connect) start(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	target := connectTarget{account: q.Get("account"), tenant: q.Get("tenant")}
	if q.Has("account") {
		if c.linkKey == nil {
			c.page(w, http.StatusBadRequest, "This link cannot connect a user account", "Links that name an account must be signed: this site has no link_key.", "")
			return nil
		}
		if problem := checkLink(c.linkKey, q, now()); problem != "" {
			c.logCause(string(problem), "connect link refused")
			c.page(w, http.StatusForbidden, "This link is not valid", "The link is not signed by the app, was changed, or has expired. Ask the app for a new link.", "")
			return nil
		}
	}
	if target.account != "" || target.tenant != "" {
		switch {
		case c.AccountType != "off":
			c.page(w, http.StatusBadRequest, "This link cannot connect a user account", "Connecting a named user account needs account_type off in fortnox_connect (a service-account connection has no account name).", "")
			return nil
		case !validAccountName(target.account):
			c.page(w, http.StatusBadRequest, "This link cannot connect a user account", "account= must be the account's name: 1 to 64 of A-Z a-z 0-9 . _ @ -, not dots only.", "")
			return nil
		case !validTenantID(target.tenant):
			c.page(w, http.StatusBadRequest, "This link cannot connect a user account", "tenant= must be the TenantId of the company the user connects (a user may belong to several).", "")
			return nil
		}
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	state := base64.RawURLEncoding.EncodeToString(raw)
	expires := now().Add(stateLifetime)
	http.SetCookie(w, &http.Cookie{
		Name: stateCookie, Value: c.signState(state, expires, target), Path: c.cookiePath,
		MaxAge: int(stateLifetime / time.Second), HttpOnly: true, Secure: c.secure, SameSite: http.SameSiteLaxMode,
	})
	q = url.Values{
		"client_id":     {c.tokens.clientID},
		"redirect_uri":  {c.RedirectURI},
		"scope":         {strings.Join(strings.Fields(c.Scopes), " ")},
		"state":         {state},
		"access_type":   {"offline"},
		"response_type": {"code"},
	}
	if c.AccountType != "off" {
		q.Set("account_type", c.AccountType)
	}
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, c.AuthorizeURL+"?"+q.Encode(), http.StatusFound)
	return nil
}

// signState makes the cookie value: state.expiry.account.tenant.mac, the
// account base64url-encoded (names may hold dots). The signature covers
// all of it, so neither the account nor the expected tenant can be
// changed on the way back.
func (c *Connect) signState(state string, expires time.Time, target connectTarget) string {
	payload := state + "." + strconv.FormatInt(expires.Unix(), 10) + "." +
		base64.RawURLEncoding.EncodeToString([]byte(target.account)) + "." + target.tenant
	mac := hmac.New(sha256.New, c.cookieKey)
	mac.Write([]byte(payload))
	return payload + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

// checkState verifies the cookie's signature and expiry, that it names
// the state Fortnox sent back, and that the state was not used before. It
// returns what the connection is for, from the signed cookie only.
func (c *Connect) checkState(r *http.Request, state string) (connectTarget, error) {
	damaged := errors.New("the state cookie is damaged: start again")
	cookie, err := r.Cookie(stateCookie)
	if err != nil {
		return connectTarget{}, errors.New("this browser did not start the connection here (no state cookie): start again")
	}
	parts := strings.Split(cookie.Value, ".")
	if len(parts) != 5 {
		return connectTarget{}, damaged
	}
	exp, err := strconv.ParseInt(parts[1], 10, 64)
	if err != nil {
		return connectTarget{}, damaged
	}
	account, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return connectTarget{}, damaged
	}
	target := connectTarget{account: string(account), tenant: parts[3]}
	want := c.signState(parts[0], time.Unix(exp, 0), target)
	if !hmac.Equal([]byte(want), []byte(cookie.Value)) {
		return connectTarget{}, errors.New("the state cookie is not ours: start again")
	}
	if now().After(time.Unix(exp, 0)) {
		return connectTarget{}, errors.New("the connection took too long (over 10 minutes): start again")
	}
	if !hmac.Equal([]byte(parts[0]), []byte(state)) {
		return connectTarget{}, errors.New("the state Fortnox sent back does not match this browser's: start again")
	}
	fresh, err := c.tokens.shared().firstUse(r.Context(), "connect-state:"+state, stateLifetime)
	if err != nil {
		return connectTarget{}, errors.New("the connection cannot be checked right now (" + err.Error() + "): start again in a moment")
	}
	if !fresh {
		return connectTarget{}, errors.New("this connection was already completed: start again")
	}
	return target, nil
}

// callback finishes the connection.
func (c *Connect) callback(w http.ResponseWriter, r *http.Request) {
	// The cookie is spent whatever happens.
	http.SetCookie(w, &http.Cookie{Name: stateCookie, Value: "", Path: c.cookiePath, MaxAge: -1, HttpOnly: true, Secure: c.secure, SameSite: http.SameSiteLaxMode})
	q := r.URL.Query()
	target, err := c.checkState(r, q.Get("state"))
	if err != nil {
		c.page(w, http.StatusBadRequest, "The connection could not be checked", err.Error(), "")
		return
	}
	if fe := q.Get("error"); fe != "" {
		c.logger.Info("Fortnox refused the connection", zap.String("error", cutDescription(fe)))
		c.page(w, http.StatusForbidden, "Fortnox did not connect the integration",
			"Fortnox answered: "+cutDescription(fe)+" — "+cutDescription(q.Get("error_description")), "")
		return
	}
	code := q.Get("code")
	if code == "" {
		c.page(w, http.StatusBadRequest, "The connection could not be completed", "Fortnox sent no code: start again.", "")
		return
	}
	s := c.tokens.settings.Load()
	if s == nil || s.records == nil {
		c.page(w, http.StatusInternalServerError, "The connection could not be completed", "No fortnox handler with this client_id and token_url is loaded: add one to the same config.", "")
		return
	}
	// Not under the browser's context: once the code is exchanged, Fortnox
	// has spent it, and a browser that leaves must not lose the grant.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), lockBudget+s.tokenTimeout)
	defer cancel()
	answer, err := c.tokens.client.exchangeCode(ctx, s.cred, code, c.RedirectURI)
	if err != nil {
		c.logger.Error("code exchange failed", zap.Error(err))
		c.page(w, http.StatusBadGateway, "Fortnox did not complete the connection", asTokenError(err).Error()+". Start again.", "")
		return
	}
	tenant, err := tenantFromToken(answer.accessToken)
	if target.account != "" {
		c.connectAccount(w, r, ctx, target, answer, tenant)
		return
	}
	if err != nil {
		c.page(w, http.StatusBadGateway, "The connection could not be completed", "Fortnox's token names no tenant ("+err.Error()+").", "")
		return
	}
	if answer.refreshToken != "" {
		if err := c.tokens.storeAnswer(ctx, subject{tenant: tenant}, answer); err != nil {
			c.logger.Error("storing the refresh token of a new connection failed", zap.String("tenant", tenant), zap.Error(err))
			c.page(w, http.StatusInternalServerError, "The connection could not be saved", "Storing the tenant's token failed: "+err.Error(), "")
			return
		}
	}
	// The access token of the code grant belongs to the administrator who
	// connected; it is not cached: the tenant's requests get the service
	// account's token (client credentials) or, failing that, one from the
	// stored refresh token.
	c.tokens.consentCreated(tenant)
	c.logger.Info("customer connected", zap.String("tenant", tenant))
	c.succeed(w, r, tenant, "")
}

// connectAccount stores a user's chain under the account name the signed
// state carries, when the token is the expected tenant's. tokenTenant is
// the tenant the token names ("" if none).
func (c *Connect) connectAccount(w http.ResponseWriter, r *http.Request, ctx context.Context, target connectTarget, answer *tokenAnswer, tokenTenant string) {
	subj := subject{tenant: target.tenant, account: target.account}
	if answer.refreshToken == "" {
		c.page(w, http.StatusBadGateway, "The connection could not be completed", "Fortnox gave no refresh token for the user (was access_type=offline refused?). Start again.", "")
		return
	}
	if err := c.tokens.storeAnswer(ctx, subj, answer); err != nil {
		// The whole story (where the refresh token went, what the
		// operator can do) is for the log; the page tells the person in
		// the browser what to do.
		c.logger.Error("storing a user account's refresh token failed", append(subj.logFields(), zap.Error(err))...)
		status, message := http.StatusInternalServerError, err.Error()
		var ae *adminError
		if errors.As(err, &ae) {
			status = ae.status
			switch {
			case ae.code == "tenant_mismatch" && tokenTenant != "":
				message = "This link connects account " + target.account + " to the company with TenantId " + target.tenant +
					", but the company chosen on Fortnox's page was " + tokenTenant + ", so nothing was stored for " + target.tenant +
					". Start again and choose the company " + target.tenant + "."
			case ae.code == "tenant_mismatch":
				message = "Fortnox's token names no company, so it cannot be proved to be " + target.tenant + "'s; nothing was stored for it. Start again."
			case ae.code == "account_user_mismatch":
				message = "Account " + target.account + " of the company " + target.tenant + " belongs to another Fortnox user, so nothing was stored. " +
					"Log in to Fortnox as that user and start again, or ask the integration's operator to delete the account first."
			}
		}
		c.page(w, status, "The user account was not connected", message, "")
		return
	}
	c.logger.Info("user account connected", subj.logFields()...)
	c.succeed(w, r, target.tenant, target.account)
}

// succeed ends a connection: the success page or success_redirect.
func (c *Connect) succeed(w http.ResponseWriter, r *http.Request, tenant, account string) {
	if c.SuccessRedirect != "" {
		sep := "?"
		if strings.Contains(c.SuccessRedirect, "?") {
			sep = "&"
		}
		w.Header().Set("Cache-Control", "no-store")
		http.Redirect(w, r, c.SuccessRedirect+sep+"tenant="+url.QueryEscape(tenant), http.StatusFound)
		return
	}
	message := "The integration is connected to your Fortnox company."
	if account != "" {
		message = "Your Fortnox user is connected as account " + account + "."
	}
	c.page(w, http.StatusOK, "Connected", message, tenant)
}

var pageTemplate = template.Must(template.New("page").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{.Title}}</title></head>
<body><h1>{{.Title}}</h1><p>{{.Message}}</p>{{if .Tenant}}<p>TenantId: <strong id="tenant">{{.Tenant}}</strong></p>{{end}}</body></html>
`))

// page writes a small, plain HTML page. Never a token in it.
func (c *Connect) page(w http.ResponseWriter, status int, title, message, tenant string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Security-Policy", "default-src 'none'")
	w.WriteHeader(status)
	_ = pageTemplate.Execute(w, struct{ Title, Message, Tenant string }{title, message, tenant})
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
	t := now()
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
