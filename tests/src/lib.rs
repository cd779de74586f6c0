//! Test harness for end-to-end tests against real processes on loopback: valkey-server,
//! valkey-sentinel and valkey-agent on free ports in temp dirs, killed on drop with their logs
//! printed when the test fails, and a minimal in-process controller hub.
//!
//! This crate is test support: it panics with a clear message where a test could not go on.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

pub mod apiserver;
pub mod cluster;
pub mod flood;
pub mod hub;
pub mod k8s;
pub mod kubelet;
pub mod local;
pub mod monitor;
pub mod netns;
pub mod partition;
pub mod procs;
pub mod proxy;
pub mod soak;

use std::{future::Future, net::TcpListener, time::Duration};

/// A port nobody listens on right now, below Linux's ephemeral range (32768-60999) so that no
/// outgoing connection or `:0` listener can take it before the process that is given it binds
/// it; and apart from the local runtime's range (20000-32000).
pub fn free_port() -> u16 {
    use rand::RngExt;
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let port = rng.random_range(10_000..20_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 10000..20000");
}

/// Polls `check` until it yields a value or `timeout` passes; panics naming `what` then.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET over plain HTTP/1.0 (enough for /metrics), returning the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}
