#!/usr/bin/env bash
# Builds ./caddy and runs the sidecar on http://127.0.0.1:8080.
#
# With FORTNOX_CLIENT_ID and FORTNOX_CLIENT_SECRET set, it runs
# Caddyfile.example against the real Fortnox. Without them, it runs the demo:
# the bundled fake Fortnox on 127.0.0.1:8099 and demo/Caddyfile, so you can
# try the sidecar, and the migration of a refresh-token customer, with no
# Fortnox account. The first build takes a few minutes; later ones seconds.
#
# Caddy's admin endpoint is the unix socket .demo/admin/admin.sock, in a
# directory only your user can open (CADDY_ADMIN, which both Caddyfiles and
# `./caddy fortnox` read). The demo's ports move with FORTNOX_DEMO_PORT (the
# proxy, 8080) and FORTNOX_FAKE_PORT (the fake Fortnox, 8099).
set -euo pipefail
cd "$(dirname "$0")"

./xcaddy.sh

# The admin endpoint can read every secret and token of the sidecar: a
# socket in a 0700 directory, never a TCP port.
admin_dir=.demo/admin
admin_socket="$admin_dir/admin.sock"
mkdir -p "$admin_dir"
chmod 0700 "$admin_dir"
export CADDY_ADMIN="unix/$admin_socket"

if [ -n "${FORTNOX_CLIENT_ID:-}" ] && [ -n "${FORTNOX_CLIENT_SECRET:-}" ]; then
	echo "run.sh: FORTNOX_CLIENT_ID is set: running Caddyfile.example against Fortnox" >&2
	echo "run.sh: try: curl -H 'X-Fortnox-Tenant: <TenantId>' http://127.0.0.1:8080/3/companyinformation" >&2
	echo "run.sh: the admin endpoint is the socket $admin_socket: export CADDY_ADMIN=$CADDY_ADMIN, then ./caddy fortnox tenants" >&2
	exec ./caddy run --config Caddyfile.example
fi

echo "run.sh: no Fortnox credentials in the environment: running the demo against the bundled fake Fortnox" >&2
# The fake forgets everything when it stops, so tokens stored by an earlier
# demo mean nothing to this one.
rm -rf .demo/storage
mkdir -p .demo bin
go build -o bin/fakefortnox ./test/fakefortnox/cmd/fakefortnox
export FORTNOX_CLIENT_ID=demo-client FORTNOX_CLIENT_SECRET=demo-secret
# Signs the connect pages' state cookies; a fresh one each run is fine here.
FORTNOX_COOKIE_SECRET="demo-cookie-secret-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export FORTNOX_COOKIE_SECRET
export FORTNOX_DEMO_PORT="${FORTNOX_DEMO_PORT:-8080}" FORTNOX_FAKE_PORT="${FORTNOX_FAKE_PORT:-8099}"
export FORTNOX_CONNECT_PORT="${FORTNOX_CONNECT_PORT:-8081}"
demo_port=$FORTNOX_DEMO_PORT fake_port=$FORTNOX_FAKE_PORT connect_port=$FORTNOX_CONNECT_PORT

fake_pid=
caddy_pid=
stop() { kill $caddy_pid $fake_pid 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT TERM

# listening <port>: whether something accepts connections on 127.0.0.1:<port>.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for <what> <port> <pid>: until the port accepts connections; fails
# when the process exits first or after 30 s.
wait_for() {
	local i
	for i in $(seq 300); do
		listening "$2" && return 0
		if ! kill -0 "$3" 2>/dev/null; then
			echo "run.sh: $1 exited before listening on 127.0.0.1:$2 (see its output above)" >&2
			return 1
		fi
		sleep 0.1
	done
	echo "run.sh: $1 does not listen on 127.0.0.1:$2 after 30 s" >&2
	return 1
}

for port in "$fake_port" "$demo_port" "$connect_port"; do
	if listening "$port"; then
		echo "run.sh: something already listens on 127.0.0.1:$port (an earlier ./run.sh? or set FORTNOX_DEMO_PORT, FORTNOX_CONNECT_PORT and FORTNOX_FAKE_PORT)" >&2
		exit 1
	fi
done
if [ -S "$admin_socket" ] && command -v curl >/dev/null && curl -s --max-time 2 --unix-socket "$admin_socket" -o /dev/null http://admin/config/ 2>/dev/null; then
	echo "run.sh: a Caddy already answers on $admin_socket (an earlier ./run.sh?): stop it first" >&2
	exit 1
fi
rm -f "$admin_socket" # left behind by a Caddy that was killed

# socket_ready <pid>: until Caddy's admin socket exists; fails when Caddy
# exits first or after 30 s.
socket_ready() {
	local i
	for i in $(seq 300); do
		[ -S "$admin_socket" ] && return 0
		if ! kill -0 "$1" 2>/dev/null; then
			echo "run.sh: Caddy exited before opening its admin socket $admin_socket (see its output above)" >&2
			return 1
		fi
		sleep 0.1
	done
	echo "run.sh: Caddy has no admin socket $admin_socket after 30 s" >&2
	return 1
}

# Tenants 1234567 and 7654321 have a service-account consent; 5550003 has
# only a refresh token (as a customer of an integration that still runs on
# refresh tokens), written to .demo/refresh-token-5550003. Its authorize page
# lets you connect 5550001, which has neither yet, as its administrator would.
bin/fakefortnox -addr "127.0.0.1:$fake_port" -client-id "$FORTNOX_CLIENT_ID" -client-secret "$FORTNOX_CLIENT_SECRET" \
	-tenants 1234567,7654321 -refresh-tenants 5550003 -refresh-token-dir .demo \
	-authorize-page '5550001=Ny Kund AB,1234567=Demo AB,7654321=Exempel AB' &
fake_pid=$!
wait_for "the fake Fortnox" "$fake_port" "$fake_pid"

# In the background with `wait`, so that a signal to this script stops both.
./caddy run --config demo/Caddyfile &
caddy_pid=$!
wait_for "Caddy" "$demo_port" "$caddy_pid"
socket_ready "$caddy_pid"

proxy="http://127.0.0.1:$demo_port"
connect="http://127.0.0.1:$connect_port/fortnox/connect"
sed -e "s|@PROXY@|$proxy|g" -e "s|@CONNECT@|$connect|g" -e "s|@ADMIN@|$CADDY_ADMIN|g" -e "s|@SOCKET@|$admin_socket|g" >&2 <<'TXT'

  The sidecar listens on @PROXY@. Its admin endpoint is the unix socket
  @SOCKET@, in a directory only your user can open: the app
  beside a sidecar never reaches it. The fake Fortnox knows tenants 1234567
  (alias "demo") and 7654321, which have a service-account consent, and 5550003,
  which has only a refresh token. In another terminal, in this directory, try:

    export CADDY_ADMIN=@ADMIN@   # where ./caddy fortnox finds the admin socket
    curl -s -H 'X-Fortnox-Tenant: 1234567' @PROXY@/3/companyinformation
    curl -s -H 'X-Fortnox-Tenant: demo'    @PROXY@/3/companyinformation
    curl -s -H 'X-Fortnox-Tenant: 5550001' @PROXY@/3/companyinformation   # no consent: 403
    curl -s @PROXY@/3/companyinformation                                  # no tenant: 400
    ./caddy fortnox tenants                                                            # what the sidecar knows

  Connect customer 5550001 as its administrator would: open this in a browser,
  choose "Ny Kund AB" on the fake Fortnox's page and approve:

    @CONNECT@

    curl -s -H 'X-Fortnox-Tenant: 5550001' @PROXY@/3/companyinformation   # 200 once connected

  Move the refresh-token customer 5550003 to the sidecar: the app hands its
  refresh token over on the proxy's hand-over route (never the admin socket):

    curl -s -H 'X-Fortnox-Tenant: 5550003' @PROXY@/3/companyinformation   # 403: no token yet
    curl -s -X PUT @PROXY@/fortnox/handover/tenants/5550003/refresh_token -d "{\"refresh_token\":\"$(cat .demo/refresh-token-5550003)\"}"
    curl -s -H 'X-Fortnox-Tenant: 5550003' @PROXY@/3/companyinformation   # 200, on the refresh token
    ./caddy fortnox tenants

  Ctrl-C stops both.

TXT
wait "$caddy_pid"
