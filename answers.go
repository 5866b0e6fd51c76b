package fortnox

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/metrics"
)

// Fortnox's SDKs read errors from Fortnox's own shape,
// {"ErrorInformation":{"error":1,"message":"…","code":2000423}}, and cannot
// read {"error","message"}. Every JSON error the sidecar writes itself
// carries both: ErrorInformation beside error and message.
//
// The numbers are ours, not Fortnox's. Fortnox's codes are seven digits
// starting with 1 or 2 (1000003, 2000423, 2001304); ours are seven digits
// starting with 91 (9100001 to 9100599), so an app can tell at a glance
// that the sidecar answered, not Fortnox, and no number can be mistaken
// for one of Fortnox's. docs/clients.md has the table for readers;
// TestErrorNumbers checks that every code the plugin can emit has a
// number here, and that no two share one.

// unlistedErrorNumber is given to an error code missing from the table (a
// defect the tests catch): the answer stays readable.
const unlistedErrorNumber = 9100000

// errorNumbers maps each "error" code to its ErrorInformation.code. Groups:
// 91000xx the request itself (the app can fix it), 91001xx the tenant's
// or account's authorization (the customer or user must act), 91002xx
// Fortnox or the token endpoint, 91003xx the sidecar's own limits and
// stores, 91004xx fortnox_webhook, 91005xx the admin API and
// fortnox_handover (which shares its routes' answers). A number, once
// given, is never reused for another code.
var errorNumbers = map[string]int{
	// The request (400, 403).
	"missing_tenant":     9100001,
	"invalid_tenant":     9100002,
	"ambiguous_tenant":   9100003,
	"tenant_not_allowed": 9100004,
	"invalid_account":    9100005,
	"ambiguous_account":  9100006,

	// Authorization: the customer or the user must authorize (403, 409).
	"tenant_not_authorized":  9100101,
	"refresh_token_rejected": 9100102,
	"consent_revoked":        9100103,
	"account_not_authorized": 9100104,
	"tenant_mismatch":        9100105,
	"account_user_mismatch":  9100106,

	// Fortnox's token endpoint (502, 503).
	"invalid_client_credentials": 9100201,
	"bad_token_response":         9100202,
	"token_endpoint_unavailable": 9100203,
	"refresh_in_progress":        9100204,

	// The sidecar's own limits and stores (429, 500, 503).
	"rate_limited":              9100301,
	"request_cancelled":         9100302,
	"token_wait_cancelled":      9100303,
	"token_storage_unavailable": 9100304,
	"shared_state_unavailable":  9100305,
	"redis_unavailable":         9100306,

	// fortnox_webhook (consent events from Fortnox).
	"method_not_allowed":  9100401,
	"too_many_signatures": 9100402,
	"body_too_large":      9100403,
	"bad_signature":       9100404,
	"bad_event":           9100405,
	"bad_timestamp":       9100406,
	"event_too_old":       9100407,
	"event_in_future":     9100408,
	"stale_event":         9100409,

	// The admin API.
	"bad_body":           9100501,
	"bad_refresh_token":  9100502,
	"client_id_required": 9100503,
	"invalid_id":         9100504,
	"no_handler":         9100505,
	"no_such_route":      9100506,
	"not_cluster_mode":   9100507,
	"not_ready":          9100508,
	"record_unreadable":  9100509,
	"revoke_failed":      9100510,
	"unknown_account":    9100511,
	"unknown_id":         9100512,
	"unknown_tenant":     9100513,
	"no_encryption_key":  9100514,
	"live_refresh_token": 9100515,
	"tenant_unknown":     9100516,
	"handler_ambiguous":  9100517,
	"internal_error":     9100518,
}

// errorNumber is code's ErrorInformation.code.
func errorNumber(code string) int {
	if n, ok := errorNumbers[code]; ok {
		return n
	}
	return unlistedErrorNumber
}

// errorInformation is Fortnox's error object, as its SDKs read it.
type errorInformation struct {
	Error   int    `json:"error"` // always 1, as Fortnox sends
	Message string `json:"message"`
	Code    int    `json:"code"`
}

func newErrorInformation(code, message string) *errorInformation {
	return &errorInformation{Error: 1, Message: code + ": " + message, Code: errorNumber(code)}
}

// errorBody is the JSON answer the app gets when the sidecar refuses a
// request: ours, and Fortnox's own shape beside it (errorNumbers).
type errorBody struct {
	Error            string            `json:"error"`
	Message          string            `json:"message"`
	ErrorInformation *errorInformation `json:"ErrorInformation,omitempty"`
}

// writeJSONError writes the DESIGN's error answer. retryAfter > 0 adds a
// Retry-After header in whole seconds.
func writeJSONError(w http.ResponseWriter, status int, code, message string, retryAfter time.Duration) {
	metrics.ErrorAnswered(code)
	body, _ := json.Marshal(errorBody{Error: code, Message: message, ErrorInformation: newErrorInformation(code, message)})
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Content-Type-Options", "nosniff")
	if retryAfter > 0 {
		hdr.Set("Retry-After", strconv.Itoa(max(1, int((retryAfter+time.Second-1)/time.Second))))
	}
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

// writeAppError is writeJSONError for a request the fortnox handler
// answers in Fortnox's stead (counted in caddy_fortnox_requests_total).
func writeAppError(w http.ResponseWriter, status int, code, message string, retryAfter time.Duration) {
	metrics.SidecarAnswered(status)
	writeJSONError(w, status, code, message, retryAfter)
}
