package testproc

import (
	"testing"

	"github.com/caddy-fortnox/caddy-fortnox/test/fakefortnox"
)

// StartFake starts the fake Fortnox (in this process, on 127.0.0.1) with
// opts, and closes it when the test ends. (test/fakefortnox's own tests
// cannot use it: testproc imports fakefortnox.)
func StartFake(t testing.TB, opts fakefortnox.Options) *fakefortnox.Server {
	t.Helper()
	fake, err := fakefortnox.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fake.Close)
	return fake
}
