package fakefortnox

import (
	"html/template"
	"net/http"
	"net/url"
	"strings"
)

// The authorize page as a person meets it: with SetAuthorizePage, GET
// /oauth-v1/auth shows a form (choose the company and the user, then
// approve or deny) whose POST sends the browser back to redirect_uri with
// a code or with error=access_denied, as Fortnox does. Without it, GET
// approves at once (SetAuthorizeAs, SetAuthorizeDeny), for tests that
// need no browser.

// Company is one company the authorize page offers.
type Company struct {
	TenantID string
	Name     string
}

// DeniedDescription is the error_description the authorize page sends
// back when the person denies (Swedish, as Fortnox's are).
const DeniedDescription = "Användaren nekade åtkomst till företagets uppgifter i Fortnox"

// SetAuthorizePage turns the interactive authorize page on, offering
// companies (nil turns it off: GET approves at once again).
func (s *Server) SetAuthorizePage(companies []Company) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.companies = append([]Company(nil), companies...)
	if companies == nil {
		s.companies = nil
	}
}

var authorizePage = template.Must(template.New("authorize").Parse(`<!doctype html>
<html lang="sv"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fortnox (fake) – Godkänn integration</title>
<style>body{font:16px/1.5 sans-serif;max-width:30rem;margin:2rem auto;padding:0 1rem}label{display:block;margin:.4rem 0}
button{font-size:1rem;padding:.5rem 1rem;margin:.75rem .5rem 0 0}</style></head>
<body><h1>Fake Fortnox</h1>
<p>Integrationen <strong>{{.ClientID}}</strong> vill ansluta till ditt företag{{if .Service}} som servicekonto{{end}}.</p>
<p>Behörigheter: {{.Scope}}</p>
<form method="post" action="/oauth-v1/auth">
{{range $k, $vs := .Query}}{{range $vs}}<input type="hidden" name="q.{{$k}}" value="{{.}}">{{end}}{{end}}
<fieldset><legend>Företag</legend>
{{range $i, $c := .Companies}}<label><input type="radio" name="tenant" id="company-{{$c.TenantID}}" value="{{$c.TenantID}}"{{if eq $i 0}} checked{{end}}> {{$c.Name}} ({{$c.TenantID}})</label>{{end}}
</fieldset>
<label>Användare (userId) <input name="user" id="user" value="{{.User}}"></label>
<button type="submit" name="decision" value="approve" id="approve">Godkänn</button>
<button type="submit" name="decision" value="deny" id="deny">Neka</button>
</form></body></html>
`))

// showAuthorizePage writes the form when the page is on; false: it is
// off, approve at once.
func (s *Server) showAuthorizePage(w http.ResponseWriter, q url.Values) bool {
	s.mu.Lock()
	companies, user := s.companies, s.authorizeUser
	s.mu.Unlock()
	if companies == nil {
		return false
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_ = authorizePage.Execute(w, map[string]any{
		"ClientID": q.Get("client_id"), "Scope": q.Get("scope"), "Service": q.Get("account_type") == "service",
		"Query": q, "Companies": companies, "User": user,
	})
	return true
}

// serveAuthorizeDecision is the form's POST: back to redirect_uri with a
// code of the chosen company and user, or with access_denied.
func (s *Server) serveAuthorizeDecision(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	on := s.companies != nil
	s.mu.Unlock()
	if !on { // no page, no form to post
		allowMethod(w, r, http.MethodGet)
		return
	}
	if err := r.ParseForm(); err != nil {
		http.Error(w, "Fake Fortnox: bad form", http.StatusBadRequest)
		return
	}
	q := url.Values{}
	for k, vs := range r.PostForm {
		if name, ok := strings.CutPrefix(k, "q."); ok {
			q[name] = vs
		}
	}
	s.stats.setLastQuery(q)
	redirect, ok := s.authorizeRedirect(w, q)
	if !ok {
		return
	}
	tenant, user := r.PostForm.Get("tenant"), strings.TrimSpace(r.PostForm.Get("user"))
	answer := redirect.Query()
	if r.PostForm.Get("decision") != "approve" {
		answer.Set("error", "access_denied")
		answer.Set("error_description", DeniedDescription)
	} else {
		if !isTenantID(tenant) || user == "" {
			http.Error(w, "Fake Fortnox: choose a company and a user", http.StatusBadRequest)
			return
		}
		code := randomHex(16)
		s.mu.Lock()
		s.codes[code] = authCode{
			clientID: q.Get("client_id"), tenant: tenant, userID: user, redirectURI: q.Get("redirect_uri"),
			scopes: strings.Fields(q.Get("scope")), service: q.Get("account_type") == "service", issuedAt: s.Now(),
		}
		s.dropExpiredCodesLocked()
		s.mu.Unlock()
		answer.Set("code", code)
	}
	answer.Set("state", q.Get("state"))
	redirect.RawQuery = answer.Encode()
	http.Redirect(w, r, redirect.String(), http.StatusSeeOther)
}
