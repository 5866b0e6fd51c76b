package fortnox

import (
	"crypto/cipher"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
	"github.com/caddy-fortnox/caddy-fortnox/internal/redisstate"
	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// DefaultTokenURL is Fortnox's token endpoint.
const DefaultTokenURL = "https://apps.fortnox.se/oauth-v1/token"

// DefaultTenantHeader is the request header that names the tenant.
const DefaultTenantHeader = "X-Fortnox-Tenant"

// DefaultAccountHeader is the request header that names a user account.
const DefaultAccountHeader = "X-Fortnox-Account"

func init() {
	caddy.RegisterModule(Handler{})
	initMetrics()
}

// Handler is the `fortnox` HTTP handler. For each request it resolves the
// tenant (a Fortnox TenantId), gets a token for it and sets
// `Authorization: Bearer …`; the next handler (reverse_proxy) carries the
// request to Fortnox.
type Handler struct {
	// The integration's client id. Placeholders such as {env.FORTNOX_CLIENT_ID}
	// are resolved when the config loads. Required.
	ClientID string `json:"client_id,omitempty"`

	// The integration's client secret. Use a placeholder ({env.X} or
	// {file./run/secrets/x}) so that the config holds no secret. Required.
	ClientSecret string `json:"client_secret,omitempty"`

	// Fortnox's token endpoint. Default: https://apps.fortnox.se/oauth-v1/token.
	TokenURL string `json:"token_url,omitempty"`

	// The request header that carries the customer's TenantId or alias.
	// Default: X-Fortnox-Tenant. It is removed before the request is proxied.
	TenantHeader string `json:"tenant_header,omitempty"`

	// Tenants declared in the config: alias -> TenantId. A TenantId listed
	// without an alias maps to itself. Aliases may be sent in the tenant
	// header instead of the TenantId.
	Tenants map[string]string `json:"tenants,omitempty"`

	// Serve only the TenantIds named in Tenants; others get 403.
	OnlyListedTenants bool `json:"only_listed_tenants,omitempty"`

	// When a request has no tenant header, read the tenant from the tenantId
	// claim of the app's own `Authorization: Bearer` JWT (a token from before
	// the app used the sidecar). The signature is not checked; the token is
	// never forwarded.
	TenantFromToken bool `json:"tenant_from_token,omitempty"`

	// How long before expiry a token is refreshed in the background (it is
	// never refreshed before half its lifetime). Default: 5m.
	RefreshBefore caddy.Duration `json:"refresh_before,omitempty"`

	// How long one token request may take. Default: 10s.
	TokenTimeout caddy.Duration `json:"token_timeout,omitempty"`

	// How often a tenant that fell back to its refresh token tries client
	// credentials again, so that a tenant that gains a service-account
	// consent moves over by itself. Default: 1h.
	RetryClientCredentials caddy.Duration `json:"retry_client_credentials,omitempty"`

	// A 32-byte key (base64, or 64 hex characters) to encrypt the token
	// records in Caddy's storage with AES-256-GCM. Use a placeholder
	// ({env.FORTNOX_STORAGE_KEY}). Optional.
	EncryptionKey string `json:"encryption_key,omitempty"`

	// Older encryption keys, still accepted for reading while a store moves
	// to EncryptionKey (Caddyfile: `encryption_key <new> <old>...`). Records
	// are rewritten with EncryptionKey when next written.
	PreviousEncryptionKeys []string `json:"previous_encryption_keys,omitempty"`

	// The request header that names a user account of the tenant: the
	// request then uses that user's own refresh-token chain, never the
	// service account's. Default: X-Fortnox-Account. It is removed before
	// the request is proxied.
	AccountHeader string `json:"account_header,omitempty"`

	// The most token requests of this client id in flight at once; the
	// rest queue (within token_timeout). Default: 8.
	MaxTokenRequests int `json:"max_token_requests,omitempty"`

	// Cluster mode: a Redis URL (redis://[user:password@]host:port/db, or
	// rediss:// for TLS; placeholders such as {env.FORTNOX_REDIS_URL}), or
	// an object with exactly one of url, sentinel ({"master": …, "addrs":
	// […]}) and cluster ([host:port…]), and username, password, tls,
	// replica_acks (see RedisConfig). Every sidecar of the same client id
	// with the same Redis shares each tenant's rate budget, tokens, refresh
	// tokens and revocations. Run Redis with appendonly yes and appendfsync
	// always: it holds the only copy of rotated refresh tokens. Optional.
	Redis *RedisConfig `json:"redis,omitempty"`

	// Where rotated refresh tokens the token store has not taken yet are
	// kept, synced to disk (encrypted like records with encryption_key),
	// until the store has them: a store write that fails (Redis killed, a
	// full disk) loses no refresh token, also across a restart on the same
	// disk. Placeholders are resolved. Default: fortnox/journal under
	// Caddy's data directory (not Caddy's storage module, which may be
	// what failed).
	JournalDir string `json:"journal_dir,omitempty"`

	// How long a refresh-token rotation in flight (its mark in the
	// record) may go without its holder renewing it before another sidecar
	// tries the last stored refresh token once. Until then, requests that
	// need the rotated token answer 503 refresh_in_progress. Default: 10m.
	RotationTimeout caddy.Duration `json:"rotation_timeout,omitempty"`

	// The per-tenant rate limit, shared by all requests of this process for
	// the same client id. Default: 25 requests per 5s, Fortnox's own limit.
	RateLimit *RateLimit `json:"rate_limit,omitempty"`

	// The longest a request waits for its turn in the rate limiter before it
	// is answered 429. Default: 20s (a burst of 100 for one tenant drains).
	MaxWait caddy.Duration `json:"max_wait,omitempty"`

	// Request bodies up to this many bytes are kept in memory so that a
	// request Fortnox answers 401 can be sent again with a new token.
	// Default: 1 MiB. Negative: never keep bodies (only bodiless requests
	// are replayed).
	ReplayBodyLimit int64 `json:"replay_body_limit,omitempty"`

	// Check the client id and secret against the token endpoint shortly
	// after start (one refresh-grant request with a made-up refresh token,
	// which mints nothing), once per client id and token URL, and log
	// clearly when Fortnox rejects them or cannot be reached. Never during
	// `caddy validate`. Default: on; false turns it off.
	CheckCredentials *bool `json:"check_credentials,omitempty"`

	// Tell the app when a tenant's connection changes state: a
	// refresh-token chain rejected or lost (reconnect_required), a consent
	// revoked or created, a handed-over token quarantined. Each is POSTed
	// once per change of state as signed JSON, retried for up to a day.
	// Optional.
	Notify *Notify `json:"notify,omitempty"`

	tokens          *tokens.Manager
	settings        *tokens.Settings
	resolver        *tenantResolver
	accountHeader   string
	owned           []string // headers the sidecar owns: never forwarded as the app sent them
	pacing          pacer
	cluster         *redisstate.Conn
	clusterKey      string
	replayBodyLimit int64
	poolKey         string
	logger          *zap.Logger
}

// RateLimit is the per-tenant rate limit.
type RateLimit struct {
	// Requests allowed per window for each tenant. Default: 25.
	Requests int `json:"requests,omitempty"`
	// The sliding window. Default: 5s.
	Window caddy.Duration `json:"window,omitempty"`
	// Off turns the limiter off (`rate_limit off`).
	Off bool `json:"off,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.fortnox",
		New: func() caddy.Module { return new(Handler) },
	}
}

var placeholderOnly = regexp.MustCompile(`^\{[^{}]+\}$`)

// Provision resolves placeholders and joins the shared token manager. It
// touches no network (it also runs for `caddy validate` and `caddy adapt`).
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	repl := caddy.NewReplacer()

	clientID, err := resolveSetting(repl, "client_id", h.ClientID)
	if err != nil {
		return err
	}
	secret, err := resolveSetting(repl, "client_secret", h.ClientSecret)
	if err != nil {
		return err
	}
	tokenURL := resolveTokenURL(repl, h.TokenURL)
	if err := checkTokenURL(tokenURL); err != nil {
		return err
	}
	header := h.TenantHeader
	if header == "" {
		header = DefaultTenantHeader
	}
	if strings.EqualFold(header, "Authorization") || strings.EqualFold(header, "Proxy-Authorization") || !validHeaderName(header) {
		return fmt.Errorf("tenant_header %q is not a usable header name", header)
	}
	accountHeader := h.AccountHeader
	if accountHeader == "" {
		accountHeader = DefaultAccountHeader
	}
	if strings.EqualFold(accountHeader, "Authorization") || strings.EqualFold(accountHeader, "Proxy-Authorization") || strings.EqualFold(accountHeader, header) || !validHeaderName(accountHeader) {
		return fmt.Errorf("account_header %q is not a usable header name (nor the tenant header)", accountHeader)
	}
	h.accountHeader = http.CanonicalHeaderKey(accountHeader)
	h.owned = ownedHeaders(http.CanonicalHeaderKey(header), h.accountHeader)
	if h.MaxTokenRequests < 0 {
		return errors.New("max_token_requests must not be negative")
	}
	if err := tokens.ValidateTenantNames(h.Tenants); err != nil {
		return err
	}
	if h.OnlyListedTenants && len(h.Tenants) == 0 {
		return errors.New("only_listed_tenants is set but no tenant is listed: add `tenant <id>` or `tenant <alias> <id>` lines")
	}
	refreshBefore := time.Duration(h.RefreshBefore)
	if refreshBefore == 0 {
		refreshBefore = tokens.DefaultRefreshBefore
	}
	if refreshBefore < 0 {
		return errors.New("refresh_before must not be negative")
	}
	timeout := time.Duration(h.TokenTimeout)
	if timeout == 0 {
		timeout = tokens.DefaultTokenTimeout
	}
	if timeout < 0 {
		return errors.New("token_timeout must not be negative")
	}

	h.replayBodyLimit = h.ReplayBodyLimit
	if h.replayBodyLimit == 0 {
		h.replayBodyLimit = defaultReplayBodyLimit
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}

	retryCC := time.Duration(h.RetryClientCredentials)
	if retryCC == 0 {
		retryCC = tokens.DefaultRetryClientCredentials
	}
	if retryCC < 0 {
		return errors.New("retry_client_credentials must not be negative")
	}
	notify, err := h.Notify.provision(repl)
	if err != nil {
		return err
	}
	journalDir, err := h.journalDir(repl)
	if err != nil {
		return err
	}
	rotationTimeout := time.Duration(h.RotationTimeout)
	if rotationTimeout == 0 {
		rotationTimeout = tokens.DefaultRotationTimeout
	}
	if rotationTimeout < 0 {
		return errors.New("rotation_timeout must not be negative")
	}
	records := &tokens.Records{Storage: ctx.Storage(), ClientID: clientID, TokenURL: tokenURL, Clock: clk}
	if records.Keys, err = h.encryptionKeys(repl); err != nil {
		return err
	}

	h.resolver = newTenantResolver(header, h.Tenants, h.OnlyListedTenants, h.TenantFromToken)
	if h.tokens, h.poolKey, err = joinManager(tokenURL, clientID); err != nil {
		return err
	}
	if h.Redis.set() {
		target, err := h.Redis.target(repl)
		if err != nil {
			return err
		}
		if h.cluster, h.clusterKey, err = joinCluster(h.tokens, target, h.logger); err != nil {
			return err
		}
		records.Storage = h.cluster.Migrating(ctx.Storage())
	}
	if h.pacing, err = newPacer(h.RateLimit, h.MaxWait, clientID, tokenURL, h.cluster); err != nil {
		return err
	}
	metrics.MaxWait.Set(h.pacing.maxWait.Seconds())
	h.settings = &tokens.Settings{
		Gen:                    tokens.SettingsGeneration.Add(1),
		Cred:                   tokens.Credentials{ClientID: clientID, ClientSecret: secret},
		RefreshBefore:          refreshBefore,
		TokenTimeout:           timeout,
		RetryClientCredentials: retryCC,
		MaxTokenRequests:       h.MaxTokenRequests,
		Records:                records,
		JournalDir:             journalDir,
		RotationTimeout:        rotationTimeout,
		Listed:                 h.resolver.listed,
		Logger:                 h.logger,
		Notify:                 notify,
	}
	// A new manager needs settings at once (background work, admin API);
	// an existing one gets these when this handler serves its first request.
	h.tokens.Settings.CompareAndSwap(nil, h.settings)
	if h.CheckCredentials == nil || *h.CheckCredentials {
		h.tokens.CheckCredentialsSoon(h.settings.Cred, timeout, h.logger)
	}
	return nil
}

// journalDir is journal_dir resolved, absolute, or the default under
// Caddy's data directory.
func (h *Handler) journalDir(repl *caddy.Replacer) (string, error) {
	if strings.TrimSpace(h.JournalDir) == "" {
		return filepath.Join(caddy.AppDataDir(), "fortnox", "journal"), nil
	}
	dir := strings.TrimSpace(repl.ReplaceAll(h.JournalDir, ""))
	if dir == "" {
		return "", fmt.Errorf("journal_dir %q resolves to nothing", h.JournalDir)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("journal_dir %q: %v", h.JournalDir, err)
	}
	if fi, err := os.Stat(abs); err == nil && !fi.IsDir() {
		return "", fmt.Errorf("journal_dir %q is a file, not a directory", h.JournalDir)
	}
	return abs, nil
}

// encryptionKeys resolves encryption_key and the previous keys: the first
// encrypts, all decrypt.
func (h *Handler) encryptionKeys(repl *caddy.Replacer) ([]cipher.AEAD, error) {
	if strings.TrimSpace(h.EncryptionKey) == "" {
		if len(h.PreviousEncryptionKeys) > 0 {
			return nil, errors.New("previous_encryption_keys are set but encryption_key is not: records would be written in plain JSON; set encryption_key to the new key")
		}
		return nil, nil
	}
	var keys []cipher.AEAD
	for i, raw := range append([]string{h.EncryptionKey}, h.PreviousEncryptionKeys...) {
		name := "encryption_key"
		if i > 0 {
			name = fmt.Sprintf("encryption_key (previous key %d)", i)
		}
		key, err := resolveSetting(repl, name, raw)
		if err != nil {
			return nil, err
		}
		aead, err := tokens.ParseEncryptionKey(key)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		keys = append(keys, aead)
	}
	return keys, nil
}

// resolveSetting resolves the placeholders of a required setting. The error
// never shows the resolved value, only the placeholder the config named.
func resolveSetting(repl *caddy.Replacer, name, raw string) (string, error) {
	if strings.TrimSpace(raw) == "" {
		return "", fmt.Errorf("%s is required", name)
	}
	v := strings.TrimSpace(repl.ReplaceAll(raw, ""))
	if v != "" {
		return v, nil
	}
	if placeholderOnly.MatchString(strings.TrimSpace(raw)) {
		return "", fmt.Errorf("%s is empty: its placeholder %s resolved to nothing (is the environment variable set, or the file present and non-empty?)", name, strings.TrimSpace(raw))
	}
	return "", fmt.Errorf("%s is empty after resolving placeholders", name)
}

func checkTokenURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("token_url %q is not an http(s) URL", raw)
	}
	if u.User != nil {
		return errors.New("token_url must not contain credentials; use client_id and client_secret")
	}
	if u.Scheme == "http" && !isLoopback(u.Hostname()) {
		// The client secret and customers' refresh tokens go to it.
		return fmt.Errorf("token_url %q: http:// is accepted only on loopback (127.0.0.1, ::1, localhost); use https://", raw)
	}
	return nil
}

func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c == '-' || c == '_' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
		if !ok {
			return false
		}
	}
	return true
}

// Cleanup releases this config's hold on the shared token manager and
// rate limiter.
func (h *Handler) Cleanup() error {
	var errs []error
	if h.pacing.poolKey != "" {
		errs = append(errs, h.pacing.release())
	}
	errs = append(errs, leaveCluster(h.clusterKey), leaveManager(h.poolKey))
	return errors.Join(errs...)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)

// Notify is where the app hears of state changes it must act on.
type Notify struct {
	// The app's URL that receives the events (POST, JSON). https, or http
	// on loopback (127.0.0.1, ::1, localhost). Placeholders such as
	// {env.FORTNOX_NOTIFY_URL} are resolved when the config loads. Required.
	URL string `json:"url,omitempty"`

	// The key the events are signed with: each carries
	// `X-Fortnox-Signature: sha256=<lowercase hex HMAC-SHA256 of the body>`.
	// Its text after placeholders is the key, as bytes. Use a placeholder
	// ({env.FORTNOX_NOTIFY_SECRET}) so that the config holds no secret.
	// Required.
	Secret string `json:"secret,omitempty"`
}

// provision resolves and checks a notify block (nil: none).
func (n *Notify) provision(repl *caddy.Replacer) (*tokens.NotifySettings, error) {
	if n == nil {
		return nil, nil
	}
	raw, err := resolveSetting(repl, "notify url", n.URL)
	if err != nil {
		return nil, err
	}
	secret, err := resolveSetting(repl, "notify secret", n.Secret)
	if err != nil {
		return nil, err
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return nil, errors.New("notify url is not an http(s) URL")
	}
	if u.User != nil {
		return nil, errors.New("notify url must not contain credentials: the events are signed with the notify secret")
	}
	if u.Scheme == "http" && !isLoopback(u.Hostname()) {
		return nil, fmt.Errorf("notify url must be https (http only on loopback: 127.0.0.1, ::1, localhost), not http on %s", u.Hostname())
	}
	return &tokens.NotifySettings{Url: u.String(), Host: u.Host, Secret: []byte(secret)}, nil
}

// resolveTokenURL is the configured token URL with placeholders resolved,
// or Fortnox's.
func resolveTokenURL(repl *caddy.Replacer, raw string) string {
	if raw == "" {
		return DefaultTokenURL
	}
	return strings.TrimSpace(repl.ReplaceAll(raw, ""))
}
