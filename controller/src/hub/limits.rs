//! What a client of the hub may cost before and after it authenticates: connection slots, a
//! deadline and a byte budget for getting a Hello accepted, streams per connection, message
//! sizes, HTTP/2 keepalive, and how long an authenticated stream may stay silent. Anyone on
//! the pod network can reach the hub; only a valid token buys more than a few KiB and seconds.

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, warn};

use super::Hub;
use crate::tls::serve::ServerCert;

/// The hub's limits; `Limits::default()` is what both runtimes use.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections, authenticated or not. Each agent holds one.
    pub max_connections: usize,
    /// Connections that have not yet had a Hello accepted; beyond it the oldest of them is
    /// closed for each new one, so that unauthenticated clients cannot use up the
    /// controller's file descriptors, nor keep an agent out.
    pub max_unauthenticated: usize,
    /// From accept to an accepted Hello (TLS, HTTP/2, the Hello and its token check).
    pub auth_deadline: Duration,
    /// Bytes a connection may send before its Hello is accepted.
    pub unauthenticated_bytes: u64,
    /// Streams at once on one connection (an agent uses one).
    pub streams_per_connection: u32,
    /// Streams waiting for their Hello's check, over all connections.
    pub pending_hellos: usize,
    /// The largest message the hub decodes (a report is a few KiB).
    pub max_message: usize,
    /// HTTP/2 pings on an idle connection, and how long an answer may take.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// The HTTP/2 flow-control windows: what a peer may send before the hub reads it.
    pub window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_unauthenticated: 256,
            auth_deadline: Duration::from_secs(10),
            unauthenticated_bytes: 64 * 1024,
            streams_per_connection: 4,
            pending_hellos: 64,
            max_message: 1024 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            window: 256 * 1024,
        }
    }
}

/// What the hub learns of the connection a stream came on: tonic puts it in each request's
/// extensions, and the hub marks it authenticated once a Hello on it is accepted.
#[derive(Debug, Clone)]
pub struct ConnInfo(Arc<AtomicBool>);

impl ConnInfo {
    pub fn authenticated(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_authenticated(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The connection slots; shared by the accept loop and the connections it admits.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    connections: Arc<Semaphore>,
    /// Connections not yet authenticated, oldest first (a dead entry: it authenticated or
    /// closed).
    waiting: Mutex<VecDeque<Weak<Unauthenticated>>>,
}

/// A connection that has not authenticated yet, as the gate sees it: it can be evicted.
#[derive(Debug, Default)]
struct Unauthenticated {
    evicted: AtomicBool,
    /// Who to wake on eviction: the connection's reader, or its TLS handshake.
    waker: Mutex<Option<Waker>>,
    notify: tokio::sync::Notify,
}

impl Unauthenticated {
    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.notify.notify_one();
        if let Some(waker) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            waker.wake();
        }
    }
}

/// A connection's slot, from accept on.
#[derive(Debug)]
pub struct Admission {
    slot: OwnedSemaphorePermit,
    unauthenticated: Arc<Unauthenticated>,
    deadline: tokio::time::Instant,
    budget: u64,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            waiting: Mutex::default(),
            limits,
        })
    }

    /// A slot for a new connection, or None when every connection slot is taken. When the
    /// unauthenticated ones are at their cap, the oldest of them is closed to make room: a
    /// flood cannot keep a restarting agent out, since an agent authenticates within
    /// milliseconds and a flood's connections never do.
    pub fn admit(&self) -> Option<Admission> {
        let slot = self.connections.clone().try_acquire_owned().ok()?;
        let unauthenticated = Arc::new(Unauthenticated::default());
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.retain(|w| w.strong_count() > 0);
            while waiting.len() >= self.limits.max_unauthenticated {
                if let Some(oldest) = waiting.pop_front().and_then(|w| w.upgrade()) {
                    oldest.evict();
                }
            }
            waiting.push_back(Arc::downgrade(&unauthenticated));
        }
        Some(Admission {
            slot,
            unauthenticated,
            deadline: tokio::time::Instant::now() + self.limits.auth_deadline,
            budget: self.limits.unauthenticated_bytes,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.connections.available_permits()
    }

    /// Connections open now that have not authenticated (nor been evicted).
    pub fn unauthenticated(&self) -> usize {
        self.waiting
            .lock()
            .map(|w| {
                w.iter()
                    .filter_map(Weak::upgrade)
                    .filter(|u| !u.evicted.load(Ordering::Acquire))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Admission {
    /// When the connection must have authenticated (its TLS handshake included).
    pub fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }

    /// Resolves when the gate closes this connection for a newer one.
    pub async fn evicted(&self) {
        self.unauthenticated.notify.notified().await
    }

    /// The connection, held to the deadline and byte budget until it authenticates.
    pub fn guard<S>(self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            conn: ConnInfo(Arc::new(AtomicBool::new(false))),
            deadline: Some(Box::pin(tokio::time::sleep_until(self.deadline))),
            budget: self.budget,
            _slot: self.slot,
            unauthenticated: Some(self.unauthenticated),
        }
    }
}

/// A connection of the hub: until a Hello on it is accepted, reading from it fails once
/// the deadline passes, the byte budget is spent, or the gate evicts it, which closes it.
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    conn: ConnInfo,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    budget: u64,
    _slot: OwnedSemaphorePermit,
    unauthenticated: Option<Arc<Unauthenticated>>,
}

impl<S> Guarded<S> {
    /// Ok while the connection may go on reading; it leaves the gate's unauthenticated list
    /// as soon as it has authenticated.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(unauthenticated) = &self.unauthenticated else {
            return Ok(());
        };
        if self.conn.is_authenticated() {
            self.unauthenticated = None;
            self.deadline = None;
            return Ok(());
        }
        if let Ok(mut waker) = unauthenticated.waker.lock() {
            *waker = Some(cx.waker().clone());
        }
        if unauthenticated.evicted.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed for a newer connection: too many unauthenticated ones",
            ));
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no accepted Hello within the deadline",
            ));
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.check(cx)?;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.unauthenticated.is_some() {
            let read = (buf.filled().len() - before) as u64;
            this.budget = this.budget.checked_sub(read).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "too many bytes before an accepted Hello",
                )
            })?;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S> tonic::transport::server::Connected for Guarded<S> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.conn.clone()
    }
}

/// Serves `hub` on `listener`, TLS only with `cert`, within `limits`, until the listener
/// fails for good. Both runtimes (and the tests' cluster) serve the hub through this.
pub async fn serve(
    hub: &Hub,
    listener: TcpListener,
    cert: Arc<ServerCert>,
    gate: Arc<Gate>,
) -> Result<(), tonic::transport::Error> {
    let limits = gate.limits.clone();
    let service = hub
        .server()
        .max_decoding_message_size(limits.max_message)
        .max_encoding_message_size(limits.max_message);
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.streams_per_connection)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .initial_stream_window_size(limits.window)
        .initial_connection_window_size(limits.window)
        .add_service(service)
        .serve_with_incoming(crate::tls::serve::incoming(listener, cert, gate))
        .await
}

/// Logs a refused connection at most once a second: a flood must not flood the log.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    last: Option<std::time::Instant>,
    refused: u64,
}

impl RefusalLog {
    pub(crate) fn refused(&mut self) {
        self.refused += 1;
        if self
            .last
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            warn!(
                refused = self.refused,
                "the hub has no connection slot left; closing new connections"
            );
            self.last = Some(std::time::Instant::now());
            self.refused = 0;
        } else {
            debug!("closing a connection: the hub is full");
        }
    }
}
