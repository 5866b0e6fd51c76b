#!/usr/bin/env bash
# Builds ./caddy: Caddy with its standard modules and this plugin.
#
#   ./xcaddy.sh                          -> ./caddy, with xcaddy if installed
#   OUTPUT=/usr/bin/caddy ./xcaddy.sh
#   XCADDY=1 ./xcaddy.sh                 # xcaddy or fail (CI, the Dockerfile)
#   XCADDY=0 ./xcaddy.sh                 # plain `go build ./cmd/caddy`
#
# With xcaddy it runs the README's line, `xcaddy build --with
# github.com/caddy-fortnox/caddy-fortnox`, plus the Caddy version of go.mod
# and a replace with this checkout (`@v0.0.0=.`: the version only names the
# replaced module, so that Go does not ask the module proxy for versions of
# a module it may not serve). Without xcaddy, `go build ./cmd/caddy` with
# the flags xcaddy v0.4.5 passes to `go build` (read from its builder.go),
# so both builds, and the test binary test/replicas builds, compile Caddy's
# packages once and share them in Go's build cache.
#
# The first build compiles all of Caddy: a few minutes on 2 cores. Later
# builds take seconds.
set -euo pipefail
cd "$(dirname "$0")"
output="${OUTPUT:-./caddy}"

# What xcaddy v0.4.5 passes to `go build` (builder.go) and its cgo default
# (cgo only when CGO_ENABLED=1). Keep in step with xcaddy's version in
# .ci/run and the Dockerfile, and with test/replicas (TestBuildFlagsAgree).
export CGO_ENABLED="${CGO_ENABLED:-0}"
go_build_flags=(-ldflags "-w -s" -trimpath -tags nobadger,nomysql,nopgx)

say() { printf 'xcaddy.sh: %s\n' "$*" >&2; }

# A line every 20 s while xcaddy or the compiler runs, so that a cold
# build does not look stuck. Stopped (with its sleep) when the build ends.
heartbeat_pid=
start_heartbeat() {
	(
		trap 'kill "$s" 2>/dev/null; exit 0' TERM
		started=$SECONDS
		while :; do
			sleep 20 &
			s=$!
			wait "$s"
			say "  still building ($((SECONDS - started))s so far; the first build compiles all of Caddy: a few minutes)"
		done
	) &
	heartbeat_pid=$!
}
stop_heartbeat() {
	if [ -n "$heartbeat_pid" ]; then
		kill "$heartbeat_pid" 2>/dev/null || true
		wait "$heartbeat_pid" 2>/dev/null || true
		heartbeat_pid=
	fi
}
trap stop_heartbeat EXIT

use_xcaddy=0
case "${XCADDY:-auto}" in
0) ;;
1)
	command -v xcaddy >/dev/null 2>&1 || {
		say "XCADDY=1 but xcaddy is not on PATH: go install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5"
		exit 1
	}
	use_xcaddy=1
	;;
auto) command -v xcaddy >/dev/null 2>&1 && use_xcaddy=1 ;;
*)
	say "XCADDY must be 0, 1 or auto, not ${XCADDY}"
	exit 2
	;;
esac

started=$SECONDS
caddy_version="$(go list -m -f '{{.Version}}' github.com/caddyserver/caddy/v2)"
if [ "$use_xcaddy" = 1 ]; then
	say "[1/2] building $output with xcaddy $(xcaddy version 2>/dev/null | awk 'NR == 1 { print $1 }') (Caddy $caddy_version, CGO_ENABLED=$CGO_ENABLED): its stages follow"
	start_heartbeat
	xcaddy build "$caddy_version" --output "$output" --with github.com/caddy-fortnox/caddy-fortnox@v0.0.0=.
else
	if [ "${XCADDY:-auto}" = auto ]; then
		say "xcaddy is not installed: using go build (go install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5 to use xcaddy)"
	fi
	say "[1/2] building $output with go build ./cmd/caddy (Caddy $caddy_version, CGO_ENABLED=$CGO_ENABLED, ${go_build_flags[*]})"
	start_heartbeat
	go build "${go_build_flags[@]}" -o "$output" ./cmd/caddy
fi
stop_heartbeat

say "[2/2] checking that $output lists the plugin's modules"
modules="$("$output" list-modules)"
for m in http.handlers.fortnox http.handlers.fortnox_connect http.handlers.fortnox_webhook http.handlers.fortnox_handover admin.api.fortnox; do
	grep -qx "$m" <<<"$modules" || {
		say "$output does not list $m"
		exit 1
	}
done
say "built $output in $((SECONDS - started))s: it lists http.handlers.fortnox, http.handlers.fortnox_connect, http.handlers.fortnox_webhook, http.handlers.fortnox_handover and admin.api.fortnox"
