// Command caddy is Caddy with its standard modules and the fortnox plugin.
// xcaddy.sh builds it with `go build` when xcaddy is not installed.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-fortnox/caddy-fortnox"
)

func main() {
	caddycmd.Main()
}
