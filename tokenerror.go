package fortnox

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"
)

// tokenFailure says why no token could be had, and so what the app is told.
type tokenFailure int

const (
	// failNoConsent: the tenant has no usable service-account consent and no
	// refresh token to fall back on. The customer must authorize.
	failNoConsent tokenFailure = iota + 1
	// failGrantRejected: Fortnox rejected the stored refresh token
	// (invalid_grant). The customer must authorize again.
	failGrantRejected
	// failBadClient: Fortnox rejected the client id or secret (invalid_client).
	failBadClient
	// failBadAnswer: the token endpoint answered something we cannot use.
	failBadAnswer
	// failUnavailable: the token endpoint could not be reached, timed out, or
	// answered 5xx or 429.
	failUnavailable
	// failStorage: the token store could not be read or written.
	failStorage
	// failConsentRevoked: Fortnox told us (consent webhook) that the
	// customer revoked the integration's consent.
	failConsentRevoked
	// failTenantMismatch: a token (from Fortnox, or read from a store)
	// names another tenant than the one it was asked for, or none where one
	// is required. It is never used.
	failTenantMismatch
	// failRecordMisplaced: a stored record names another tenant, account
	// or client than the key it is stored under. It is never used and
	// never overwritten.
	failRecordMisplaced
	// failAccountNotAuthorized: a named user account has no refresh token.
	failAccountNotAuthorized
	// failUserMismatch: a named account's token is another Fortnox user's
	// than the one the account is bound to.
	failUserMismatch
)

// tokenError is what the token manager returns when it has no token for a
// tenant. It never holds a token, a refresh token or a secret: its text is
// safe for logs and for the app.
type tokenError struct {
	failure tokenFailure
	// status is the token endpoint's HTTP status, 0 when there was no answer.
	status int
	// code and description are the OAuth error fields of the answer, if any
	// (description is cut short; it is Fortnox's text, never ours).
	code        string
	description string
	// cause is the underlying error (transport error, parse error), if any.
	cause error
	// retryAt is when the next attempt for this tenant will be made.
	retryAt time.Time
	// For failTenantMismatch: the tenant asked for and the one the token
	// names ("" when it names none); detail adds what became of it (where
	// the new refresh token that came with it was kept), as a sentence.
	tenant, tokenTenant, detail string
	// fromClientCredentials: the token came from client credentials
	// (nothing was stored; it is Fortnox's error).
	fromClientCredentials bool
	// handedOver: the token was handed over (admin API, fortnox_handover,
	// connect), not read from a stored record.
	handedOver bool
	// For failUserMismatch: the account, the user it is bound to and the
	// user the token names.
	account, wantUser, tokenUser string
}

func (e *tokenError) Error() string {
	var s string
	switch e.failure {
	case failNoConsent:
		s = "no service-account consent for this tenant and no refresh token stored"
	case failGrantRejected:
		s = "the stored refresh token was rejected"
	case failBadClient:
		s = "the token endpoint rejected the client id or secret"
	case failBadAnswer:
		s = "the token endpoint gave an answer that cannot be used"
	case failUnavailable:
		s = "the token endpoint is unavailable"
	case failStorage:
		s = "the token store failed"
	case failConsentRevoked:
		s = "the customer revoked the consent"
	case failTenantMismatch:
		s = "the token is not the tenant's"
		if e.tokenTenant != "" {
			s = fmt.Sprintf("the token is for tenant %s, not %s", e.tokenTenant, e.tenant)
		}
	case failRecordMisplaced:
		s = "the stored record is another tenant's"
	case failAccountNotAuthorized:
		s = "no refresh token is stored for the account"
	case failUserMismatch:
		s = fmt.Sprintf("the token is user %s's, but account %s is bound to user %s", e.tokenUser, e.account, e.wantUser)
	default:
		s = "token error"
	}
	if e.status != 0 {
		s += fmt.Sprintf(" (HTTP %d", e.status)
		if e.code != "" {
			s += " " + e.code
		}
		if e.description != "" {
			s += ": " + strconv.Quote(e.description)
		}
		s += ")"
	}
	if e.cause != nil {
		s += ": " + e.cause.Error()
	}
	return s
}

func (e *tokenError) Unwrap() error { return e.cause }

// httpStatus is the status the app gets for this failure (DESIGN's table).
func (e *tokenError) httpStatus() int {
	switch e.failure {
	case failNoConsent, failGrantRejected, failConsentRevoked, failAccountNotAuthorized:
		return http.StatusForbidden
	case failTenantMismatch, failRecordMisplaced, failUserMismatch:
		return http.StatusConflict
	case failBadClient, failBadAnswer:
		return http.StatusBadGateway
	default:
		return http.StatusServiceUnavailable
	}
}

// errorCode is the machine-readable "error" field of the app's answer.
func (e *tokenError) errorCode() string {
	switch e.failure {
	case failNoConsent:
		return "tenant_not_authorized"
	case failGrantRejected:
		return "refresh_token_rejected"
	case failBadClient:
		return "invalid_client_credentials"
	case failBadAnswer:
		return "bad_token_response"
	case failStorage:
		return "token_storage_unavailable"
	case failConsentRevoked:
		return "consent_revoked"
	case failTenantMismatch, failRecordMisplaced:
		return "tenant_mismatch"
	case failAccountNotAuthorized:
		return "account_not_authorized"
	case failUserMismatch:
		return "account_user_mismatch"
	default:
		return "token_endpoint_unavailable"
	}
}

// advice is the "message" field: what happened and what to do.
func (e *tokenError) advice(tenant string) string {
	switch e.failure {
	case failNoConsent:
		return "Fortnox gave no token for tenant " + tenant + ": the customer has not given this integration a service-account consent and no refresh token is stored. " +
			"Ask a system administrator of the customer to authorize the integration (authorization code flow with account_type=service), or hand a refresh token for the tenant over: " + handoverStep(tenant, "") + "."
	case failGrantRejected:
		if e.account != "" {
			return "Fortnox rejected the refresh token stored for account " + e.account + " of tenant " + tenant + " (used, revoked or expired). The user must authorize again: " + e.accountRemedy(tenant)
		}
		return "Fortnox rejected the stored refresh token for tenant " + tenant + " (used or expired). The customer must authorize the integration again; then hand the new refresh token over: " + handoverStep(tenant, "") + "."
	case failBadClient:
		return "Fortnox rejected the configured client id or client secret. Check client_id and client_secret in the fortnox block (and the environment variables or files they name)."
	case failBadAnswer:
		return "Fortnox's token endpoint gave an answer that is not a usable token. Check token_url; if it is right, this is on Fortnox's side: try again later."
	case failConsentRevoked:
		return "The customer (tenant " + tenant + ") revoked this integration's consent in Fortnox. The customer must authorize the integration again; requests are refused until a new consent or refresh token arrives."
	case failTenantMismatch:
		return e.mismatchAdvice(tenant)
	case failRecordMisplaced:
		msg := "The token store holds a record for tenant " + tenant + " that names another tenant or client"
		if e.cause != nil {
			msg += " (" + e.cause.Error() + ")"
		}
		return msg + ". It is never used for this tenant's requests."
	case failAccountNotAuthorized:
		if e.account != "" {
			return "No refresh token is stored for account " + e.account + " of tenant " + tenant + ": " + e.accountRemedy(tenant) + " Requests without the account header use the service account."
		}
		return "No refresh token is stored for this user account of tenant " + tenant + ". Connect the user with a signed connect link (fortnox_connect, ?account=<name>&tenant=" + tenant + " signed with link_key: caddy fortnox connect-link) or hand the user's refresh token over: " + handoverStep(tenant, "<name>") + ". Requests without the account header use the service account."
	case failUserMismatch:
		return "Fortnox's token for account " + e.account + " of tenant " + tenant + " is user " + e.tokenUser + "'s, but the account is bound to user " + e.wantUser + ": it was not used. An operator must delete the account before another user can be connected under its name."
	case failStorage:
		if msg := recordRefusalAdvice(e.cause, e.whose(tenant)); msg != "" {
			return msg
		}
		msg := "The token store (Caddy's storage) could not be used for tenant " + tenant
		if e.cause != nil {
			msg += ": " + e.cause.Error()
		}
		return msg + ". Nothing stored was changed; fix the storage or the encryption_key and retry."
	default:
		return "Fortnox's token endpoint " + e.unavailableReason() + ", and no valid token is cached for tenant " + tenant + ". " +
			e.unavailableHint() + "Retry after the number of seconds in Retry-After."
	}
}

// unavailableReason names why the token endpoint is unavailable: the HTTP
// status it answered, or the class of transport failure (DNS, connection
// refused, timeout, TLS). It names a host at most, never a URL.
func (e *tokenError) unavailableReason() string {
	var te *transportError
	switch {
	case e.status == http.StatusTooManyRequests:
		return "answered HTTP 429 (too many requests)"
	case e.status != 0:
		return fmt.Sprintf("answered HTTP %d", e.status)
	case errors.As(e.cause, &te):
		return "could not be reached (" + te.Error() + ")"
	default:
		return "could not be reached or is failing"
	}
}

// unavailableHint says what the operator can check, for the failures that
// are not Fortnox's own.
func (e *tokenError) unavailableHint() string {
	var te *transportError
	switch {
	case e.status == http.StatusTooManyRequests:
		return "Fortnox is limiting token requests. "
	case e.status != 0:
		return "This is on Fortnox's side (or a proxy in front of it). "
	case !errors.As(e.cause, &te):
		return ""
	}
	switch te.kind {
	case transportDNS:
		return "Check token_url and this host's DNS resolver. "
	case transportRefused:
		return "Check token_url, and that nothing between this host and Fortnox blocks the port. "
	case transportTimeout:
		return "Check the network path (firewall, HTTP proxy), or raise token_timeout. "
	case transportTLS:
		return "Check token_url, the system's CA certificates and any TLS-inspecting proxy. "
	default:
		return ""
	}
}

// mismatchAdvice explains a token that is not the tenant's: both ids, never
// a token.
func (e *tokenError) mismatchAdvice(tenant string) string {
	whose := "tenant " + tenant
	if e.account != "" {
		whose = "account " + e.account + " of tenant " + tenant
	}
	var msg string
	if e.tokenTenant != "" {
		msg = "Fortnox's token for " + whose + " is for tenant " + e.tokenTenant + ", so it was not used."
		switch {
		case e.fromClientCredentials:
		case e.account != "":
			msg += " The account's refresh token belongs to tenant " + e.tokenTenant + "."
		case e.handedOver:
			msg += " The refresh token handed over for " + tenant + " belongs to " + e.tokenTenant + "."
		default:
			msg += " The refresh token stored for " + tenant + " belongs to " + e.tokenTenant + "."
		}
	} else {
		msg = "Fortnox's token for " + whose + " names no tenant, so it cannot be proved to be " + tenant + "'s and was not used."
		if e.cause != nil {
			msg = "Fortnox's token for " + whose + " was not used: " + e.cause.Error() + "."
		}
	}
	if e.detail != "" {
		msg += " " + e.detail
	}
	switch {
	case e.fromClientCredentials:
		return msg + " This is Fortnox's error (or token_url does not point at Fortnox): try again later."
	case e.account != "":
		return msg + " The user must authorize again for tenant " + tenant + ": " + e.accountRemedy(tenant)
	}
	return msg + " Hand tenant " + tenant + "'s own refresh token over (" + handoverStep(tenant, "") + "), or have the customer authorize again."
}

// foundInRecord says whether the failure was found in a stored record (or
// in a refresh of a stored token): its subject exists, and is not a name a
// client made up.
func (e *tokenError) foundInRecord() bool {
	switch e.failure {
	case failGrantRejected, failRecordMisplaced, failUserMismatch, failConsentRevoked:
		return true
	case failTenantMismatch:
		return !e.fromClientCredentials
	case failStorage:
		return errors.Is(e.cause, errRecordUnreadable)
	}
	return false
}

// whose names the subject of the failure.
func (e *tokenError) whose(tenant string) string {
	if e.account != "" {
		return "account " + e.account + " of tenant " + tenant
	}
	return "tenant " + tenant
}

// accountRemedy says how a named account gets a (new) refresh-token chain.
func (e *tokenError) accountRemedy(tenant string) string {
	return "connect the user with a signed connect link (fortnox_connect, ?account=" + e.account + "&tenant=" + tenant +
		" signed with link_key: caddy fortnox connect-link) or hand the user's refresh token over: " + handoverStep(tenant, e.account) + "."
}

// handoverStep names the request that hands a refresh token over to the
// sidecar: the hand-over route on the proxy's own listener, which is the
// app's one way to do it (the admin endpoint is no place for the app).
func handoverStep(tenant, account string) string {
	path := "/tenants/" + tenant + "/refresh_token"
	if account != "" {
		path = "/tenants/" + tenant + "/accounts/" + account + "/refresh_token"
	}
	return "PUT " + path + " with {\"refresh_token\":\"…\"} on the sidecar's hand-over route (fortnox_handover)"
}

// retryAfterSeconds is the Retry-After value for an answer given at t:
// whole seconds until the next attempt, at least 1.
func retryAfterSeconds(retryAt, t time.Time) int {
	s := int(math.Ceil(retryAt.Sub(t).Seconds()))
	if s < 1 {
		return 1
	}
	return s
}
