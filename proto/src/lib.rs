//! The versioned gRPC contract between `valkey-agent` and `valkey-controller`.
//!
//! Generated from `proto/valkey/agent/v1/agent.proto` at build time with protox, so building
//! needs no system `protoc`.

#![allow(missing_debug_implementations, clippy::all)]

/// `valkey.agent.v1`: the agent stream, the local state query and their messages.
pub mod v1 {
    tonic::include_proto!("valkey.agent.v1");
}
