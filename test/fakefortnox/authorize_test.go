package fakefortnox

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// The interactive authorize page: GET shows the form with the companies;
// its POST approves as the chosen company and user (the code's token
// names them) or denies with access_denied and a Swedish description.
func TestAuthorizePage(t *testing.T) {
	s := startFake(t, Options{})
	s.SetAuthorizePage([]Company{{"5550001", "Första AB"}, {"5550002", "Andra AB"}})
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	q := authorizeQuery()
	resp, err := noFollow.Get(s.URL() + "/oauth-v1/auth?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(page), "Andra AB (5550002)") || !strings.Contains(string(page), `id="approve"`) {
		t.Fatalf("GET with the page on: %d %s", resp.StatusCode, page)
	}
	post := func(decision, tenant, user string) *url.URL {
		t.Helper()
		form := url.Values{"decision": {decision}, "tenant": {tenant}, "user": {user}}
		for k, vs := range q {
			form["q."+k] = vs
		}
		resp, err := noFollow.PostForm(s.URL()+"/oauth-v1/auth", form)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusSeeOther {
			t.Fatalf("POST %s: %d", decision, resp.StatusCode)
		}
		loc, _ := url.Parse(resp.Header.Get("Location"))
		return loc
	}
	loc := post("approve", "5550002", "42")
	if loc.Query().Get("state") != "xyz" || loc.Query().Get("keep") != "1" {
		t.Errorf("approve redirect %s", loc)
	}
	a := postToken(t, s, codeExchange(clientA, secretA, loc.Query().Get("code"), redirectURI))
	if a.status != http.StatusOK {
		t.Fatalf("code exchange: %d %s", a.status, a.body)
	}
	if p := payload(t, a.str(t, "access_token")); fmt.Sprint(p["tenantId"]) != "5550002" || fmt.Sprint(p["userId"]) != "42" {
		t.Errorf("token claims %v", p)
	}
	loc = post("deny", "5550001", "42")
	if loc.Query().Get("error") != "access_denied" || loc.Query().Get("error_description") != DeniedDescription || loc.Query().Has("code") {
		t.Errorf("deny redirect %s", loc)
	}
	// Off again: GET approves at once, POST is not allowed.
	s.SetAuthorizePage(nil)
	if status, loc := authorize(t, s, q); status != http.StatusFound || loc.Query().Get("code") == "" {
		t.Errorf("GET with the page off: %d %v", status, loc)
	}
	resp, err = noFollow.PostForm(s.URL()+"/oauth-v1/auth", url.Values{})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST with the page off: %d", resp.StatusCode)
	}
}
