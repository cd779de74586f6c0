//! A connection held to its gate's limits: until it is proven, reading from it fails once the
//! deadline passes, the byte budget is spent, or the gate evicts it; and at any time, reading
//! or writing fails once it has been idle too long. The error closes the connection.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::OwnedSemaphorePermit,
    time::{Instant, Sleep},
};

use crate::gate::{Admission, Unproven};

/// What a server learns of the connection a request came on: tonic puts it in each request's
/// extensions. The server marks it proven (the hub: a Hello on it was accepted).
#[derive(Debug, Clone, Default)]
pub struct ConnInfo(Arc<ConnState>);

#[derive(Debug, Default)]
struct ConnState {
    proven: AtomicBool,
    /// A request of this connection holds its turn (see [`ConnInfo::turn`]).
    busy: AtomicBool,
}

/// The one turn an unproven connection has (see [`ConnInfo::turn`]); given back on drop.
#[derive(Debug)]
pub struct Turn(Option<ConnInfo>);

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(conn) = &self.0 {
            conn.0.busy.store(false, Ordering::Release);
        }
    }
}

impl ConnInfo {
    /// From now on the connection is trusted: no deadline, budget, or eviction.
    pub fn prove(&self) {
        self.0.proven.store(true, Ordering::Release);
    }

    pub fn is_proven(&self) -> bool {
        self.0.proven.load(Ordering::Acquire)
    }

    /// A turn at proving itself: always once proven, and before that one request at a time
    /// (None for any other), so that an unproven connection holds one slot of the server's
    /// however many streams it opens.
    pub fn turn(&self) -> Option<Turn> {
        if self.is_proven() {
            return Some(Turn(None));
        }
        (!self.0.busy.swap(true, Ordering::AcqRel)).then(|| Turn(Some(self.clone())))
    }
}

/// A connection of a gated listener.
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    conn: ConnInfo,
    deadline: Option<Pin<Box<Sleep>>>,
    budget: Option<u64>,
    idle: Option<(std::time::Duration, Pin<Box<Sleep>>)>,
    _slot: OwnedSemaphorePermit,
    unproven: Option<Arc<Unproven>>,
}

impl<S> Guarded<S> {
    pub(crate) fn new(inner: S, admission: Admission) -> Self {
        let idle = admission
            .limits
            .idle
            .map(|d| (d, Box::pin(tokio::time::sleep(d))));
        Self {
            inner,
            conn: admission.conn,
            deadline: admission
                .deadline
                .map(|at| Box::pin(tokio::time::sleep_until(at))),
            budget: admission.limits.budget,
            idle,
            _slot: admission.slot,
            unproven: Some(admission.unproven),
        }
    }

    pub fn conn(&self) -> &ConnInfo {
        &self.conn
    }

    /// Ok while the connection may go on; it leaves the gate's unproven list as soon as it
    /// is proven.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some((_, idle)) = self.idle.as_mut()
            && idle.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "closed after being idle too long",
            ));
        }
        let Some(unproven) = &self.unproven else {
            return Ok(());
        };
        if self.conn.is_proven() {
            self.unproven = None;
            self.deadline = None;
            self.budget = None;
            return Ok(());
        }
        if let Ok(mut waker) = unproven.waker.lock() {
            *waker = Some(cx.waker().clone());
        }
        if unproven.is_evicted() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed for a newer connection: too many unproven ones",
            ));
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "not proven within the deadline",
            ));
        }
        Ok(())
    }

    /// Some bytes went through: the idle clock starts again.
    fn active(&mut self) {
        if let Some((after, idle)) = self.idle.as_mut() {
            idle.as_mut().reset(Instant::now() + *after);
        }
    }

    /// A write that could not go on: fails it instead once the connection is idle too long
    /// or evicted, so that a client that never reads cannot hold it.
    fn stalled<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_pending() {
            self.check(cx)?;
        }
        polled
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
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            this.active();
        }
        if this.unproven.is_some()
            && let Some(budget) = this.budget.as_mut()
        {
            *budget = budget.checked_sub(read).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "too many bytes before being proven",
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
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            this.active();
        }
        this.stalled(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.stalled(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            this.active();
        }
        this.stalled(cx, polled)
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
