package fortnox

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
)

var testStart = time.Now()

// chromiumPath is Debian's chromium (package "chromium"), which the
// browser test drives headless.
const chromiumPath = "/usr/bin/chromium"

// tab is one browser tab in the connect test: its width, language and
// where its screenshots go.
type tab struct {
	t       *testing.T
	ctx     context.Context
	name    string
	shots   string
	phone   bool
	shotNo  *int
	started time.Time
}

// newTab opens a tab of the browser at desktop or phone (390 px) width,
// asking for lang (Accept-Language).
func newTab(t *testing.T, browserCtx context.Context, name, shots string, phone bool, lang string, shotNo *int) *tab {
	t.Helper()
	ctx, cancel := chromedp.NewContext(browserCtx)
	t.Cleanup(cancel)
	width, height, scale := int64(1280), int64(900), 1.0
	if phone {
		width, height, scale = 390, 844, 2
	}
	viewport := chromedp.EmulateViewport(width, height, chromedp.EmulateScale(scale))
	if phone {
		viewport = chromedp.EmulateViewport(width, height, chromedp.EmulateScale(scale), chromedp.EmulateMobile)
	}
	err := chromedp.Do(ctx, viewport, chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
		if _, err := cdp.Call(ctx, tg, network.Enable, network.EnableParams{}); err != nil {
			return err
		}
		_, err := cdp.Call(ctx, tg, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{Headers: network.Headers{"Accept-Language": lang}})
		return err
	}))
	if err != nil {
		t.Fatalf("opening tab %s: %v", name, err)
	}
	return &tab{t: t, ctx: ctx, name: name, shots: shots, phone: phone, shotNo: shotNo, started: testStart}
}

// do runs steps in the tab, within 15 s.
func (b *tab) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 15*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		loc, _ := chromedp.Run(b.ctx, chromedp.Location())
		html, _ := chromedp.Run(b.ctx, chromedp.Evaluate[string](`document.body ? document.body.innerText.slice(0, 300) : ""`))
		b.t.Fatalf("%s: %s: %v (at %s: %q)", b.name, what, err, loc, html)
	}
}

// page waits for one of the connect pages and returns its text, after a
// screenshot named what.
func (b *tab) page(what string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 15*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, chromedp.WaitVisible(chromedp.CSS("main .card"))); err != nil {
		loc, _ := chromedp.Run(ctx, chromedp.Location())
		b.t.Fatalf("%s: %s: no connect page at %s: %v", b.name, what, loc, err)
	}
	text, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("main")))
	if err != nil {
		b.t.Fatalf("%s: %s: %v", b.name, what, err)
	}
	b.screenshot(what)
	if b.phone {
		// Readable at 390 px: nothing wider than the screen.
		wide, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`document.documentElement.scrollWidth > window.innerWidth`))
		if err != nil || wide {
			b.t.Errorf("%s: %s: the page is wider than the phone's screen (%v)", b.name, what, err)
		}
	}
	return text
}

func (b *tab) screenshot(what string) {
	b.t.Helper()
	png, err := chromedp.Run(b.ctx, chromedp.CaptureScreenshot())
	if err != nil {
		b.t.Errorf("screenshot %s: %v", what, err)
		return
	}
	*b.shotNo++
	name := fmt.Sprintf("%02d-%s-%s.png", *b.shotNo, b.name, regexp.MustCompile(`[^a-z0-9]+`).ReplaceAllString(strings.ToLower(what), "-"))
	file := filepath.Join(b.shots, name)
	if err := os.WriteFile(file, png, 0o644); err != nil {
		b.t.Errorf("screenshot %s: %v", what, err)
		return
	}
	b.t.Logf("screenshot: %s (%s)", file, time.Since(b.started).Round(time.Millisecond))
}

// history goes back or forward in the tab's history.
func (b *tab) history(way string) {
	b.t.Helper()
	if _, err := chromedp.Run(b.ctx, chromedp.Evaluate[any]("history."+way+"()")); err != nil {
		b.t.Fatalf("%s: history.%s(): %v", b.name, way, err)
	}
}

// location is the tab's address.
func (b *tab) location() string {
	b.t.Helper()
	loc, err := chromedp.Run(b.ctx, chromedp.Location())
	if err != nil {
		b.t.Fatal(err)
	}
	return loc
}

// approve chooses company on the fake's authorize page and approves (or
// denies).
func (b *tab) decide(company, decision string) {
	b.t.Helper()
	b.do("on Fortnox's page", chromedp.WaitVisible(chromedp.ID("approve")))
	b.screenshot("fortnox " + decision)
	b.do(decision, chromedp.Click(chromedp.ID("company-"+company)), chromedp.Click(chromedp.ID(decision)))
}

func wantText(t *testing.T, what, text string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(text, w) {
			t.Errorf("%s: the page does not say %q:\n%s", what, w, text)
		}
	}
}

// The connect flow as a customer's administrator walks it, in Debian's
// chromium (headless), at desktop width in English and at phone width
// (390 px) in Swedish: approve, deny, two tabs, reload and back/forward
// after success, an expired flow, a link opened on another host name, and
// an account link whose company is not the one chosen at Fortnox.
// Screenshots of each page are kept under the system's temp dir (paths in
// the test log).
func TestConnectInBrowser(t *testing.T) {
	if _, err := os.Stat(chromiumPath); err != nil {
		if p, lerr := exec.LookPath("chromium"); lerr == nil {
			t.Fatalf("chromium is at %s, not %s: the browser test expects Debian's package", p, chromiumPath)
		}
		t.Fatalf("the browser test needs Debian's chromium at %s (apt-get install chromium): %v", chromiumPath, err)
	}
	testStart = time.Now()
	deadline := testStart.Add(60 * time.Second)
	fake := startFake(t, fakefortnox.Options{RateLimit: -1})
	fake.SetAuthorizePage([]fakefortnox.Company{{TenantID: "5550601", Name: "Exempel AB"}, {TenantID: "5550602", Name: "Andra Bolaget AB"}, {TenantID: "1234567", Name: "Demo AB"}})
	sc, port := pagesSite(t, fake, "")
	public := fmt.Sprintf("http://127.0.0.1:%d", port)

	shots, err := os.MkdirTemp("", "fortnox-connect-screenshots-")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshots in %s", shots)
	profile, err := os.MkdirTemp("", "fx-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(profile) })
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath),
		chromedp.Flag("headless", true),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.NoFirstRun,
		chromedp.UserDataDir(profile),
		// Pages come back from history by loading them again, whose DOM
		// chromedp follows (a page restored from the back/forward cache
		// keeps node ids it no longer tracks).
		chromedp.Flag("disable-features", "Translate,BlinkGenPropertyTrees,BackForwardCache"),
	)
	// The whole browser lives at most a minute: a hung step fails the
	// test instead of holding the suite.
	bounded, cancelBound := context.WithDeadline(context.Background(), deadline)
	t.Cleanup(cancelBound)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(bounded, opts...)
	t.Cleanup(cancelAlloc)
	browserCtx, cancelBrowser := chromedp.NewContext(allocCtx)
	t.Cleanup(cancelBrowser)
	if err := chromedp.Do(browserCtx); err != nil { // starts the browser
		t.Fatalf("starting %s: %v", chromiumPath, err)
	}
	shotNo := 0

	// Approve, at both widths and in both languages; then reload, and
	// back to Fortnox's page and approve again (the state returns).
	for _, tc := range []struct {
		phone                       bool
		lang, company               string
		done, close, already, label string
	}{
		{false, "en-GB,en;q=0.9", "5550601", "Done – connected to Fortnox", "You may close this window.", "Already connected", "desktop-en"},
		{true, "sv-SE,sv;q=0.9,en;q=0.5", "5550602", "Klart – anslutet till Fortnox", "Du kan stänga det här fönstret.", "Redan anslutet", "phone-sv"},
	} {
		b := newTab(t, browserCtx, tc.label, shots, tc.phone, tc.lang, &shotNo)
		b.do("open the connect link", chromedp.Navigate(public+"/fortnox/connect"))
		b.decide(tc.company, "approve")
		text := b.page("connected")
		wantText(t, tc.label+" approve", text, tc.done, tc.close, tc.company, "Bokföringsappen")
		if !strings.HasPrefix(b.location(), public+"/fortnox/callback?result=") {
			t.Errorf("%s: the result is at %s", tc.label, b.location())
		}
		if !fake.RefreshTokenValid(sc.storedRecord(tc.company).RefreshToken) {
			t.Errorf("%s: the stored refresh token is not the live one", tc.label)
		}
		b.do("reload", chromedp.Reload())
		wantText(t, tc.label+" reload", b.page("reloaded"), tc.done, tc.company)
		// Back and forward as a person does (the page may come from the
		// back/forward cache, which fires no load event).
		b.history("back")
		b.decide(tc.company, "approve")
		wantText(t, tc.label+" approve again from history", b.page("approved again"), tc.already, tc.close)
		b.history("back")
		b.do("on Fortnox's page", chromedp.WaitVisible(chromedp.ID("approve")))
		b.history("forward")
		wantText(t, tc.label+" forward", b.page("forward"), tc.already)
	}

	// Deny, in both languages: Fortnox's own words, and a way to start again.
	for _, tc := range []struct {
		phone              bool
		lang, label        string
		heading, startText string
	}{
		{true, "sv", "phone-sv", "Anslutningen avbröts", "Börja om"},
		{false, "en", "desktop-en", "The connection was cancelled", "Start again"},
	} {
		b := newTab(t, browserCtx, tc.label+"-deny", shots, tc.phone, tc.lang, &shotNo)
		b.do("open the connect link", chromedp.Navigate(public+"/fortnox/connect"))
		b.decide("5550601", "deny")
		wantText(t, tc.label+" deny", b.page("denied"), tc.heading, fakefortnox.DeniedDescription, tc.startText)
		b.do("start again", chromedp.Click(chromedp.ID("start-again")))
		b.do("on Fortnox's page again", chromedp.WaitVisible(chromedp.ID("approve")))
	}

	// Two tabs, each with a flow on Fortnox's page; the second finishes
	// first, then the first.
	first := newTab(t, browserCtx, "tab-1", shots, false, "en", &shotNo)
	second := newTab(t, browserCtx, "tab-2", shots, false, "en", &shotNo)
	first.do("open", chromedp.Navigate(public+"/fortnox/connect"))
	second.do("open", chromedp.Navigate(public+"/fortnox/connect"))
	second.decide("1234567", "approve")
	wantText(t, "second tab", second.page("connected"), "Done – connected to Fortnox", "1234567")
	first.decide("5550601", "approve")
	wantText(t, "first tab", first.page("connected"), "Done – connected to Fortnox", "5550601")

	// A link opened on another host name lands on redirect_uri's.
	other := newTab(t, browserCtx, "other-host", shots, true, "en", &shotNo)
	other.do("open on localhost", chromedp.Navigate(fmt.Sprintf("http://localhost:%d/fortnox/connect", port)))
	other.decide("5550602", "approve")
	wantText(t, "other host", other.page("connected"), "Done – connected to Fortnox", "5550602")
	if loc := other.location(); !strings.HasPrefix(loc, public+"/") {
		t.Errorf("other host: the result is at %s", loc)
	}

	// A flow that takes longer than its state lives.
	slow := newTab(t, browserCtx, "expired", shots, true, "sv-SE", &shotNo)
	slow.do("open", chromedp.Navigate(public+"/fortnox/connect"))
	slow.do("on Fortnox's page", chromedp.WaitVisible(chromedp.ID("approve")))
	advance(fake, stateLifetime+time.Second)
	slow.decide("5550601", "approve")
	wantText(t, "expired flow", slow.page("took too long"), "Det tog för lång tid", "10 minuter", "Börja om")

	// An account link for one company, and another chosen at Fortnox.
	sc.extraSites = strings.Replace(sc.extraSites, "app_name Bokföringsappen", "app_name Bokföringsappen\n\t\taccount_type off", 1)
	if err := sc.load(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		phone       bool
		lang, label string
		wants       []string
	}{
		{false, "en", "mismatch-en", []string{"Another company was chosen", "the company chosen on Fortnox's page was 5550602", "choose the company 1234567", "Start again"}},
		{true, "sv", "mismatch-sv", []string{"Fel företag valt", "valdes på Fortnox sida var 5550602", "välj företaget 1234567", "Börja om"}},
	} {
		b := newTab(t, browserCtx, tc.label, shots, tc.phone, tc.lang, &shotNo)
		b.do("open the signed link", chromedp.Navigate(signLink(t, public+"/fortnox/connect?account=anna&tenant=1234567", time.Hour)))
		b.decide("5550602", "approve")
		wantText(t, tc.label, b.page("tenant mismatch"), tc.wants...)
	}
	if _, err := os.Stat(sc.accountRecordPath("1234567", "anna")); err == nil {
		t.Error("a token of another company was stored under anna")
	}
	t.Logf("the browser walked every case in %s", time.Since(testStart).Round(time.Millisecond))
}
