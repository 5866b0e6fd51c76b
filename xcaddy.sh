#!/usr/bin/env bash
# Builds ./caddy: Caddy with its standard modules and this plugin.
# Uses xcaddy when it is installed (XCADDY=0 to skip it), and otherwise plain
# `go build` of cmd/caddy, so a machine with Go alone can build it.
#   ./xcaddy.sh              -> ./caddy
#   OUTPUT=/usr/bin/caddy ./xcaddy.sh
set -euo pipefail
cd "$(dirname "$0")"
output="${OUTPUT:-./caddy}"
if [ "${XCADDY:-1}" != 0 ] && command -v xcaddy >/dev/null 2>&1; then
	caddy_version="$(go list -m -f '{{.Version}}' github.com/caddyserver/caddy/v2)"
	echo "xcaddy.sh: building $output with xcaddy (Caddy $caddy_version)" >&2
	xcaddy build "$caddy_version" --output "$output" \
		--with github.com/caddy-fortnox/caddy-fortnox=.
else
	echo "xcaddy.sh: xcaddy not found; building $output with go build ./cmd/caddy" >&2
	CGO_ENABLED="${CGO_ENABLED:-0}" go build -trimpath -o "$output" ./cmd/caddy
fi
modules="$("$output" list-modules)"
grep -qx 'http.handlers.fortnox' <<<"$modules" || {
	echo "xcaddy.sh: $output does not list http.handlers.fortnox" >&2
	exit 1
}
echo "xcaddy.sh: built $output" >&2
