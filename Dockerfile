# syntax=docker/dockerfile:1
# audotics-trainer, CPU image.
#
#   docker build -t audotics-trainer:latest \
#     --build-arg VERSION="$(git describe --tags --always)" --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm audotics-trainer:latest --help
#
# The CUDA build is Dockerfile.cuda. Both images run as uid/gid 10001 and start the retrain worker
# (`worker`); any other command replaces CMD: `docker run audotics-trainer:latest train --epochs 5`.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- build ----------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0

# 1. Dependencies only, cached until Cargo.toml or Cargo.lock changes: build the locked dependency
#    graph against an empty library, a stub binary and a stub build script.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src migrations \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > build.rs \
    && cargo build --release --locked --bin audotics-trainer \
    && rm -rf src build.rs target/release/audotics-trainer* target/release/deps/audotics_trainer-* \
        target/release/deps/libaudotics_trainer-* target/release/.fingerprint/audotics-trainer-* \
        target/release/build/audotics-trainer-*

# 2. The crate itself. sqlx::migrate! embeds migrations/ at compile time; build.rs tracks it. The
#    stub's fingerprints are gone, so cargo rebuilds the crate whatever the copied files' mtimes.
COPY build.rs ./
COPY migrations ./migrations
COPY src ./src
RUN cargo build --release --locked --bin audotics-trainer \
    && install -D -m 0755 target/release/audotics-trainer /out/audotics-trainer

# ---- runtime --------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="audotics-trainer" \
      org.opencontainers.image.description="Event-driven trainer for the Audotics content-based track embedding model (CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="Audotics"

# ca-certificates: TLS to S3, RabbitMQ (amqps) and Postgres verifies against the system roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 audotics \
    && useradd --system --uid 10001 --gid 10001 --no-log-init \
        --home-dir /var/lib/audotics-trainer --create-home --shell /usr/sbin/nologin audotics

COPY --from=builder /out/audotics-trainer /usr/local/bin/audotics-trainer

# The working directory is the home of the default MODEL_STORE_URL (./models) for local runs; the
# worker normally publishes to s3:// and writes nothing here (Kubernetes mounts the root read-only).
WORKDIR /var/lib/audotics-trainer
USER 10001:10001
EXPOSE 8080

# The worker's /healthz on the port of WORKER_HTTP_ADDR (default 8080), spoken through bash's
# /dev/tcp so the image needs no curl. Only `worker` serves HTTP: one-shot commands (train, seed,
# retrain, migrate) finish before the first check, or run with --no-healthcheck / healthcheck disabled.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["bash", "-c", "port=\"${WORKER_HTTP_ADDR##*:}\"; exec 3<>\"/dev/tcp/127.0.0.1/${port:-8080}\" && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

# SIGTERM: the worker stops consuming, checkpoints at the next batch, releases its lease and exits
# within WORKER_GRACE_SECONDS (default 60): give `docker stop` more than that (-t 90).
STOPSIGNAL SIGTERM
ENTRYPOINT ["audotics-trainer"]
CMD ["worker"]
