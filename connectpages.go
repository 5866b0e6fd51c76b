package fortnox

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"html/template"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/caddy-fortnox/caddy-fortnox/internal/tokens"
	"go.uber.org/zap"
)

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
		if err != nil || checkLink(c.linkKey, q, tokens.Clock.Now()) != "" {
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
