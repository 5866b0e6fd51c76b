package fortnox

import (
	"bytes"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// emittedErrorCodes finds every "error" code the plugin's sources can
// write: the string literals passed to writeJSONError, writeAppError and
// apiError or the core's opErrorf, set as the code of a resolveError,
// adminError or tokens.OpError, or returned by an ErrorCode method (the
// root and internal/tokens, internal/redisstate). A new code written any of these ways is found
// without a list to keep up to date.
func emittedErrorCodes(t *testing.T) map[string][]string {
	t.Helper()
	var files []string
	for _, dir := range []string{".", "internal/tokens", "internal/redisstate"} {
		more, err := filepath.Glob(filepath.Join(dir, "*.go"))
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, more...)
	}
	fset := token.NewFileSet()
	codes := map[string][]string{}
	add := func(e ast.Expr) {
		if bl, ok := e.(*ast.BasicLit); ok && bl.Kind == token.STRING {
			s, err := strconv.Unquote(bl.Value)
			if err != nil {
				t.Fatal(err)
			}
			codes[s] = append(codes[s], fset.Position(bl.Pos()).String())
		}
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(file, func(n ast.Node) bool {
			switch x := n.(type) {
			case *ast.CallExpr:
				if id, ok := x.Fun.(*ast.Ident); ok {
					switch {
					case (id.Name == "writeJSONError" || id.Name == "writeAppError") && len(x.Args) > 2:
						add(x.Args[2])
					case (id.Name == "apiError" || id.Name == "opErrorf") && len(x.Args) > 1:
						add(x.Args[1])
					}
				}
			case *ast.CompositeLit:
				id, ok := x.Type.(*ast.Ident)
				if !ok || (id.Name != "resolveError" && id.Name != "adminError" && id.Name != "OpError") {
					return true
				}
				for i, el := range x.Elts {
					if kv, ok := el.(*ast.KeyValueExpr); ok {
						if k, ok := kv.Key.(*ast.Ident); ok && (k.Name == "code" || k.Name == "Code") {
							add(kv.Value)
						}
					} else if id.Name == "resolveError" && i == 1 {
						add(el)
					}
				}
			case *ast.FuncDecl:
				if (x.Name.Name == "errorCode" || x.Name.Name == "ErrorCode") && x.Body != nil {
					ast.Inspect(x.Body, func(n ast.Node) bool {
						if r, ok := n.(*ast.ReturnStmt); ok && len(r.Results) == 1 {
							add(r.Results[0])
						}
						return true
					})
				}
			}
			return true
		})
	}
	return codes
}

// Every error code the plugin can write has its own number in Fortnox's
// shape, in our range, and docs/clients.md lists each code with it.
func TestErrorNumbers(t *testing.T) {
	codes := emittedErrorCodes(t)
	if len(codes) < 30 {
		t.Fatalf("found only %d error codes in the sources: the scan is broken", len(codes))
	}
	for code, where := range codes {
		if _, ok := errorNumbers[code]; !ok {
			t.Errorf("error code %q (%s) has no number in errorNumbers (answers.go)", code, strings.Join(where, ", "))
		}
	}
	byNumber := map[int]string{}
	for code, n := range errorNumbers {
		if other, ok := byNumber[n]; ok {
			t.Errorf("%q and %q share the number %d", code, other, n)
		}
		byNumber[n] = code
		if n <= unlistedErrorNumber || n > 9100599 {
			t.Errorf("%q has %d, outside 9100001-9100599", code, n)
		}
		if _, ok := codes[code]; !ok {
			t.Errorf("errorNumbers lists %q, which nothing writes: drop it (and never reuse its number)", code)
		}
	}
	doc, err := os.ReadFile("docs/clients.md")
	if err != nil {
		t.Fatal(err)
	}
	for code, n := range errorNumbers {
		row := regexp.MustCompile("(?m)^\\| *" + strconv.Itoa(n) + " *\\| *`" + regexp.QuoteMeta(code) + "`")
		if !row.Match(doc) {
			t.Errorf("docs/clients.md has no table row | %d | `%s` |", n, code)
		}
	}
}

// fortnoxSDKError is what Fortnox's SDKs decode from an error answer.
type fortnoxSDKError struct {
	ErrorInformation *struct {
		Error   int    `json:"error"`
		Message string `json:"message"`
		Code    int    `json:"code"`
	} `json:"ErrorInformation"`
}

// sdkReadable checks that an error answer reads both ways: ours
// ({"error","message"}) and Fortnox's (ErrorInformation), and that the
// two agree.
func sdkReadable(t *testing.T, what string, status int, resp *http.Response, body []byte) errorBody {
	t.Helper()
	e := errorAnswer(t, resp, body)
	var f fortnoxSDKError
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&f); err != nil {
		t.Fatalf("%s: not readable as Fortnox's error: %v: %s", what, err, body)
	}
	switch info := f.ErrorInformation; {
	case info == nil:
		t.Errorf("%s (%d): no ErrorInformation: %s", what, status, body)
	case info.Error != 1 || info.Message != e.Error+": "+e.Message || info.Code != errorNumbers[e.Error] || info.Code == 0:
		t.Errorf("%s (%d): ErrorInformation = %+v, want error 1, message %q, code %d", what, status, *info, e.Error+": "+e.Message, errorNumbers[e.Error])
	}
	return e
}

// Each status the sidecar answers itself (400, 403, 409, 429, 502, 503 on
// the proxied path; 405 from fortnox_webhook; 404 from the admin API)
// reads both ways over real HTTP.
func TestErrorAnswersFortnoxShape(t *testing.T) {
	t.Setenv("FORTNOX_TEST_WEBHOOK_SECRET", testWebhookSecret)
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.GrantConsent(testClientID, "2222222")
	fake.GrantConsent(testClientID, "3333333")
	fake.GrantConsent(testClientID, "4444444")
	sc := startSidecar(t, fake, "rate_limit 1 5s\nmax_wait 100ms")
	webhookPort := freePort(t)
	sc.extraSites = webhookSite(webhookPort, fake, "")
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	writeRecord(t, sc, "1234567", tokens.Record{Tenant: "1234567", ClientID: testClientID, Mode: tokens.GrantRefreshToken,
		RefreshToken: fake.IssueRefreshToken(testClientID, "7654321")})

	type answer struct {
		status int
		code   string
	}
	check := func(what string, want answer, status int, body []byte, resp *http.Response) {
		t.Helper()
		if status != want.status {
			t.Fatalf("%s: %d %s, want %d", what, status, body, want.status)
		}
		if e := sdkReadable(t, what, status, resp, body); e.Error != want.code {
			t.Errorf("%s: error %q, want %q", what, e.Error, want.code)
		}
	}
	for _, c := range []struct {
		what   string
		want   answer
		before func()
		tenant string
	}{
		{"no tenant header", answer{400, "missing_tenant"}, nil, ""},
		{"no consent", answer{403, "tenant_not_authorized"}, nil, "5550001"},
		{"another tenant's refresh token", answer{409, "tenant_mismatch"}, nil, "1234567"},
		{"a second request in the window", answer{429, "rate_limited"}, func() {
			if status, body, _ := sc.get("/3/companyinformation", "2222222"); status != http.StatusOK {
				t.Fatalf("first request: %d %s", status, body)
			}
		}, "2222222"},
		{"client secret rejected", answer{502, "invalid_client_credentials"}, func() {
			fake.SetFault(fakefortnox.Fault{Status: 401, ContentType: "application/json", Body: `{"error":"invalid_client","error_description":"bad"}`})
		}, "3333333"},
		{"token endpoint down", answer{503, "token_endpoint_unavailable"}, func() {
			advance(fake, 2*time.Minute)
			fake.SetFault(fakefortnox.Fault{Status: 503})
		}, "4444444"},
	} {
		if c.before != nil {
			c.before()
		}
		status, body, resp := sc.get("/3/companyinformation", c.tenant)
		check(c.what, c.want, status, body, resp)
		if status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable {
			if resp.Header.Get("Retry-After") == "" {
				t.Errorf("%s: %d without Retry-After", c.what, status)
			}
		}
	}
	fake.ClearFault()

	// fortnox_webhook writes the same answer.
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/fortnox/webhook", webhookPort))
	if err != nil {
		t.Fatal(err)
	}
	body := readAll(t, resp)
	check("GET on the webhook", answer{405, "method_not_allowed"}, resp.StatusCode, body, resp)

	// And so does the admin API.
	status, adminBody := sc.admin(http.MethodGet, "/fortnox/no-such-thing", "")
	var f fortnoxSDKError
	if err := json.Unmarshal([]byte(adminBody), &f); err != nil || status != http.StatusNotFound || f.ErrorInformation == nil ||
		f.ErrorInformation.Code != errorNumbers["no_such_route"] || !strings.HasPrefix(f.ErrorInformation.Message, "no_such_route: ") {
		t.Errorf("admin API: %d %s", status, adminBody)
	}
}

func readAll(t *testing.T, resp *http.Response) []byte {
	t.Helper()
	defer resp.Body.Close()
	var b bytes.Buffer
	if _, err := b.ReadFrom(resp.Body); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}
