# pgfold in a container: a small Debian image with the binary and CA certificates.
#
#   docker build -t pgfold .
#   docker run --rm -e DATABASE_URL=postgres://pgfold:...@db:5432/shop \
#     -e PGFOLD_HTTP__LISTEN=0.0.0.0:9187 -p 9187:9187 pgfold
#
# Configuration is by environment variables (PGFOLD_<SECTION>__<KEY>, DATABASE_URL);
# a file can still be mounted and named with `run --config /path`. docs/deploy.md.

FROM rust:1-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in a layer of their own, built against stand-in sources: a
# change to pgfold's code then recompiles pgfold alone, not every crate. Cargo
# refuses a manifest whose declared targets are missing, even to build only the
# binary, so every directory that Cargo.toml declares a target in (the [[bench]]
# in benches/) comes along; auto-discovered ones (tests/, examples/) need not.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin pgfold \
 && rm -rf src

# Everything the binary is compiled from. migrations/*.sql and config/default.toml
# are embedded with include_str!.
COPY src ./src
COPY migrations ./migrations
COPY config ./config
# COPY keeps the files' own mtimes, which can be older than the stand-in build;
# touching the crate roots makes cargo rebuild pgfold from the real sources.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin pgfold \
 && install -D -m 0755 target/release/pgfold /out/pgfold

FROM debian:bookworm-slim
# ca-certificates: the roots for TLS to PostgreSQL (sslmode=verify-full). Not pinned
# to a version: the image should pick up the distribution's updates to the roots.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid, so Kubernetes can check runAsNonRoot without a passwd lookup
# and a volume's ownership can be set to it.
RUN groupadd --system --gid 10001 pgfold \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin pgfold
COPY --from=build /out/pgfold /usr/local/bin/pgfold

USER 10001:10001
# Container logs are not a terminal: no colour escapes in the text format.
ENV NO_COLOR=1
# /healthz, /readyz and /metrics when PGFOLD_HTTP__LISTEN=0.0.0.0:9187 is set.
EXPOSE 9187
# SIGTERM (docker stop, Kubernetes) lets the batch in flight commit, then exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgfold"]
CMD ["run"]

LABEL org.opencontainers.image.title="pgfold" \
      org.opencontainers.image.description="A projection daemon for event stores kept in one PostgreSQL table" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
