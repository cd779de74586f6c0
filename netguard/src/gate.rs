//! A listener's connection slots: a hard cap on open connections, and a smaller one on
//! connections that have not proven themselves, beyond which the oldest connection of the
//! address holding the most is closed for each new one.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    task::Waker,
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::guarded::{ConnInfo, Guarded};

/// What a listener admits.
#[derive(Debug, Clone)]
pub struct GateLimits {
    /// Open connections, proven or not; beyond it new ones are closed at once.
    pub max_open: usize,
    /// Connections that have not proven themselves (the hub: no accepted Hello yet; the
    /// agent's ports: every connection). Beyond it, for each new one, the oldest of the
    /// address that holds the most is closed: a flood from one address closes only its own
    /// connections.
    pub max_unproven: usize,
    /// How long a connection may stay unproven.
    pub deadline: Option<Duration>,
    /// Bytes a connection may send before it is proven.
    pub budget: Option<u64>,
    /// How long a connection may go with no byte read or written before it is closed.
    pub idle: Option<Duration>,
}

/// The connection slots; shared by the accept loop and the connections it admits.
#[derive(Debug)]
pub struct Gate {
    limits: GateLimits,
    open: Arc<Semaphore>,
    /// Unproven connections, oldest first (a dead entry: it was proven, evicted, or closed).
    waiting: Mutex<VecDeque<Weak<Unproven>>>,
}

/// A connection that has not proven itself, as the gate sees it: it can be evicted.
#[derive(Debug)]
pub(crate) struct Unproven {
    peer: IpAddr,
    conn: ConnInfo,
    evicted: AtomicBool,
    /// Who to wake on eviction: the connection's reader or writer.
    pub(crate) waker: Mutex<Option<Waker>>,
    notify: tokio::sync::Notify,
}

impl Unproven {
    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// Still one of the unproven: neither proven nor evicted.
    fn waiting(&self) -> bool {
        !self.is_evicted() && !self.conn.is_proven()
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.notify.notify_one();
        if let Some(waker) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            waker.wake();
        }
    }
}

/// The position in `waiting` of the oldest connection of the address holding the most.
fn busiest_oldest(waiting: &VecDeque<Weak<Unproven>>) -> Option<usize> {
    let peers: Vec<Option<IpAddr>> = waiting
        .iter()
        .map(|w| w.upgrade().map(|u| u.peer))
        .collect();
    let mut held: HashMap<IpAddr, usize> = HashMap::new();
    for peer in peers.iter().flatten() {
        *held.entry(*peer).or_default() += 1;
    }
    let most = held.values().copied().max()?;
    peers
        .iter()
        .position(|p| p.is_some_and(|p| held.get(&p) == Some(&most)))
}

/// A connection's slot, from accept on.
#[derive(Debug)]
pub struct Admission {
    pub(crate) slot: OwnedSemaphorePermit,
    pub(crate) unproven: Arc<Unproven>,
    pub(crate) conn: ConnInfo,
    pub(crate) limits: GateLimits,
    pub(crate) deadline: Option<tokio::time::Instant>,
}

impl Gate {
    pub fn new(limits: GateLimits) -> Arc<Self> {
        Arc::new(Self {
            open: Arc::new(Semaphore::new(limits.max_open)),
            waiting: Mutex::default(),
            limits,
        })
    }

    pub fn limits(&self) -> &GateLimits {
        &self.limits
    }

    /// A slot for a new connection from `peer`, or None when every slot is taken. When the
    /// unproven ones are at their cap, one of them is closed to make room: the oldest of the
    /// address holding the most. Even a flood from as many addresses as there are clients
    /// cannot keep a client out for long, since a real client proves itself within
    /// milliseconds (or, on the agent's ports, is done within milliseconds) and a flood's
    /// connections never do.
    pub fn admit(&self, peer: IpAddr) -> Option<Admission> {
        let slot = self.open.clone().try_acquire_owned().ok()?;
        let conn = ConnInfo::default();
        let unproven = Arc::new(Unproven {
            peer,
            conn: conn.clone(),
            evicted: AtomicBool::new(false),
            waker: Mutex::default(),
            notify: tokio::sync::Notify::new(),
        });
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.retain(|w| w.upgrade().is_some_and(|u| u.waiting()));
            while waiting.len() >= self.limits.max_unproven.max(1) {
                let Some(at) = busiest_oldest(&waiting) else {
                    break;
                };
                if let Some(oldest) = waiting.remove(at).and_then(|w| w.upgrade()) {
                    oldest.evict();
                }
            }
            waiting.push_back(Arc::downgrade(&unproven));
        }
        Some(Admission {
            slot,
            unproven,
            conn,
            limits: self.limits.clone(),
            deadline: self
                .limits
                .deadline
                .map(|d| tokio::time::Instant::now() + d),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_open - self.open.available_permits()
    }

    /// Connections open now that have not proven themselves (nor been evicted).
    pub fn unproven(&self) -> usize {
        self.waiting
            .lock()
            .map(|w| {
                w.iter()
                    .filter_map(Weak::upgrade)
                    .filter(|u| u.waiting())
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Admission {
    /// Resolves when the gate closes this connection for a newer one.
    pub async fn evicted(&self) {
        self.unproven.notify.notified().await
    }

    /// When the connection must have proven itself, if ever.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    /// The connection, held to the gate's limits.
    pub fn guard<S>(self, inner: S) -> Guarded<S> {
        Guarded::new(inner, self)
    }
}
