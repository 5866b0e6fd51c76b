#!/usr/bin/env bash
# Builds ./caddy and runs the sidecar on http://127.0.0.1:8080.
#
# With FORTNOX_CLIENT_ID and FORTNOX_CLIENT_SECRET set, it runs
# Caddyfile.example against the real Fortnox. Without them, it runs the demo:
# the bundled fake Fortnox on 127.0.0.1:8099 and demo/Caddyfile, so you can
# try the sidecar with no Fortnox account.
set -euo pipefail
cd "$(dirname "$0")"

./xcaddy.sh

if [ -n "${FORTNOX_CLIENT_ID:-}" ] && [ -n "${FORTNOX_CLIENT_SECRET:-}" ]; then
	echo "run.sh: FORTNOX_CLIENT_ID is set: running Caddyfile.example against Fortnox" >&2
	echo "run.sh: try: curl -H 'X-Fortnox-Tenant: <TenantId>' http://127.0.0.1:8080/3/companyinformation" >&2
	exec ./caddy run --config Caddyfile.example
fi

echo "run.sh: no Fortnox credentials in the environment: running the demo against the bundled fake Fortnox" >&2
mkdir -p .demo bin
go build -o bin/fakefortnox ./test/fakefortnox/cmd/fakefortnox
export FORTNOX_CLIENT_ID=demo-client FORTNOX_CLIENT_SECRET=demo-secret
bin/fakefortnox -addr 127.0.0.1:8099 -client-id "$FORTNOX_CLIENT_ID" -client-secret "$FORTNOX_CLIENT_SECRET" \
	-tenants 1234567,7654321 &
fake_pid=$!
caddy_pid=
stop() { kill $caddy_pid "$fake_pid" 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT TERM

cat >&2 <<'TXT'

  The sidecar listens on http://127.0.0.1:8080; the fake Fortnox knows tenants
  1234567 (alias "demo") and 7654321. In another terminal, try:

    curl -s -H 'X-Fortnox-Tenant: 1234567' http://127.0.0.1:8080/3/companyinformation
    curl -s -H 'X-Fortnox-Tenant: demo'    http://127.0.0.1:8080/3/companyinformation
    curl -s -H 'X-Fortnox-Tenant: 5550001' http://127.0.0.1:8080/3/companyinformation   # no consent: 403
    curl -s http://127.0.0.1:8080/3/companyinformation                                  # no tenant: 400

  Ctrl-C stops both.

TXT
# In the background with `wait`, so that a signal to this script stops both.
./caddy run --config demo/Caddyfile &
caddy_pid=$!
wait "$caddy_pid"
