package fortnox

import (
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// The admin endpoint is the operator's, never the app's: no message the
// app receives sends it there. Where a refresh token is the remedy, the
// message names the hand-over route (fortnox_handover) instead. The error
// codes are those of DESIGN's table.
func TestAppMessagesNeverPointAtTheAdminAPI(t *testing.T) {
	codes := map[tokenFailure]string{
		failNoConsent: "tenant_not_authorized", failGrantRejected: "refresh_token_rejected",
		failBadClient: "invalid_client_credentials", failBadAnswer: "bad_token_response",
		failUnavailable: "token_endpoint_unavailable", failStorage: "token_storage_unavailable",
		failConsentRevoked: "consent_revoked", failTenantMismatch: "tenant_mismatch",
		failRecordMisplaced: "tenant_mismatch", failAccountNotAuthorized: "account_not_authorized",
		failUserMismatch: "account_user_mismatch",
	}
	handover := map[tokenFailure]bool{failNoConsent: true, failGrantRejected: true, failTenantMismatch: true, failAccountNotAuthorized: true}
	for failure, code := range codes {
		for _, account := range []string{"", "anna"} {
			e := &tokenError{failure: failure, tenant: "1234567", account: account, tokenTenant: "7654321", tokenUser: "2", wantUser: "1"}
			msg := e.advice("1234567")
			if got := e.errorCode(); got != code {
				t.Errorf("failure %d: error %q, want %q", failure, got, code)
			}
			if strings.Contains(strings.ToLower(msg), "admin api") || strings.Contains(msg, "/fortnox/tenants") || strings.Contains(msg, "2019") {
				t.Errorf("%s (account %q) sends the app to the admin API: %s", code, account, msg)
			}
			if !handover[failure] || (failure == failNoConsent && account != "") { // a service-account failure only
				continue
			}
			path := "/tenants/1234567/refresh_token"
			switch {
			case account != "":
				path = "/tenants/1234567/accounts/anna/refresh_token"
			case failure == failAccountNotAuthorized:
				path = "/tenants/1234567/accounts/<name>/refresh_token"
			}
			want := "PUT " + path + " with {\"refresh_token\":\"…\"} on the sidecar's hand-over route (fortnox_handover)"
			if !strings.Contains(msg, want) {
				t.Errorf("%s (account %q) does not name the hand-over route:\n%s\nwant it to hold %s", code, account, msg, want)
			}
		}
	}

	// As the app reads it, over HTTP.
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	sc := startSidecar(t, fake, "")
	status, body, resp := sc.get("/3/companyinformation", "5550001")
	e := errorAnswer(t, resp, body)
	if status != http.StatusForbidden || e.Error != "tenant_not_authorized" ||
		!strings.Contains(e.Message, "PUT /tenants/5550001/refresh_token") || !strings.Contains(e.Message, "fortnox_handover") ||
		strings.Contains(strings.ToLower(string(body)), "admin api") {
		t.Errorf("no consent: %d %s, want 403 tenant_not_authorized naming the hand-over route", status, body)
	}
}
