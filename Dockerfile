# The caddy-fortnox sidecar image.
#   docker build -t caddy-fortnox .
#   docker run -e FORTNOX_CLIENT_ID=... -e FORTNOX_CLIENT_SECRET=... -v fortnox-data:/data caddy-fortnox
# The build stage runs ./xcaddy.sh, the same command .ci/run runs, so CI
# proves the build on every change.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN OUTPUT=/out/caddy ./xcaddy.sh && mkdir -p /out/data

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
EXPOSE 8080 2019
ENTRYPOINT ["/usr/bin/caddy"]
CMD ["run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
