// Command caddy-test is Caddy with the fortnox plugin and the test-only
// Redis storage module, for the multi-process tests in test/replicas.
// The plugin itself is the same as in ./cmd/caddy.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-fortnox/caddy-fortnox"
	_ "github.com/caddy-fortnox/caddy-fortnox/test/redisstorage"
)

func main() {
	caddycmd.Main()
}
