# valkey-controller image (the operator: `run` in a cluster). Build from the repository root:
#   docker build -f deploy/docker/controller.Dockerfile -t ghcr.io/buf-red/valkey-controller:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p valkey-controller --bin valkey-controller

# Small runtime, non-root (uid 65532, as deploy/base/controller.yaml runs it). The Deployment
# passes `run` and its settings in env vars.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/valkey-controller /usr/local/bin/valkey-controller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/valkey-controller"]
