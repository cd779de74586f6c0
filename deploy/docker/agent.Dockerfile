# valkey-agent image (the sidecar in every Valkey and Sentinel pod). Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t ghcr.io/buf-red/valkey-agent:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p valkey-agent --bin valkey-agent

# Small runtime, non-root. The pod spec runs `valkey-agent` with its settings in env vars.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/valkey-agent /usr/local/bin/valkey-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/valkey-agent"]
