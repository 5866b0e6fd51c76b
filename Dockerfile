# The caddy-fortnox sidecar image.
#
#   docker build -t caddy-fortnox .
#
# It runs beside an app, in the app's network namespace, because the proxy
# listens on loopback only (Caddyfile.example: bind 127.0.0.1):
#
#   docker run -d --name app my-app
#   docker run -d --name fortnox --network container:app \
#     -e FORTNOX_CLIENT_ID=... -e FORTNOX_CLIENT_SECRET=... -v fortnox-data:/data caddy-fortnox
#
# The app then calls http://127.0.0.1:8080/3/... (docs/deploy.md).
#
# The build stage runs ./xcaddy.sh with xcaddy, the same command .ci/run
# runs, so CI proves the build on every change.

FROM golang:1.26-bookworm AS build
# The xcaddy that .ci/run installs (TestXcaddyPinnedAlike).
RUN go install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN XCADDY=1 OUTPUT=/out/caddy ./xcaddy.sh && mkdir -p /out/data
# The admin socket's directory: the runtime stage has no shell to make it.
# Mode 0700, owned by the image's user: no other user opens the socket.
RUN install -d -m 0700 /out/run/caddy-fortnox

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/caddy /usr/bin/caddy
COPY --from=build --chown=nonroot:nonroot /out/data /data
COPY --from=build --chown=nonroot:nonroot /out/run/ /run/
COPY Caddyfile.example /etc/caddy/Caddyfile
# Caddy's storage (tokens and refresh tokens) and config dirs. Mount a
# volume at /data; share it between replicas (or use a networked storage
# module) so that refresh tokens are refreshed under one lock.
ENV XDG_DATA_HOME=/data XDG_CONFIG_HOME=/data/config
# Caddy's admin endpoint: a unix socket in that directory, never a TCP port
# the app shares (whoever reaches the admin endpoint can read the client
# secret and every token). The image's Caddyfile reads it, and so does
# `caddy fortnox <command>`, which finds the socket with no flag.
ENV CADDY_ADMIN=unix//run/caddy-fortnox/admin.sock
VOLUME /data
USER nonroot:nonroot
# No EXPOSE: the proxy (8080) listens on 127.0.0.1 because whoever reaches
# it calls Fortnox as any of your customers; the app reaches it over
# loopback (--network container:<app>, or the same Kubernetes pod). The
# admin endpoint is the socket above, which only this image's user opens.
# The metrics site (9180) is for Prometheus, in the pod's network.
ENTRYPOINT ["/usr/bin/caddy"]
CMD ["run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
