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

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/caddy /usr/bin/caddy
COPY --from=build --chown=nonroot:nonroot /out/data /data
COPY Caddyfile.example /etc/caddy/Caddyfile
# Caddy's storage (tokens and refresh tokens) and config dirs. Mount a
# volume at /data; share it between replicas (or use a networked storage
# module) so that refresh tokens are refreshed under one lock.
ENV XDG_DATA_HOME=/data XDG_CONFIG_HOME=/data/config
VOLUME /data
USER nonroot:nonroot
# No EXPOSE: nothing here is meant to be reached from outside the pod or
# the app's network namespace. The proxy (8080) listens on 127.0.0.1
# because whoever reaches it calls Fortnox as any of your customers, and
# the admin API (2019) on localhost. The app reaches both over loopback
# (--network container:<app>, or the same Kubernetes pod).
ENTRYPOINT ["/usr/bin/caddy"]
CMD ["run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
