//! A role-following TCP proxy, standing in for the read-write Service: each new connection
//! goes to the node that routing names master at that moment, and open connections stay where
//! they are, as kube-proxy leaves them. Routing here is the controller's status, polled every
//! few milliseconds (in a cluster: role labels, EndpointSlices and kube-proxy, slower).

use std::{
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use valkey_controller::local::control::{self, Request};

/// How often the route is looked up.
const ROUTE_POLL: Duration = Duration::from_millis(2);

/// The proxy; stops (and drops every proxied connection) on drop.
#[derive(Debug)]
pub struct RoleProxy {
    pub port: u16,
    route: Arc<Mutex<Option<String>>>,
    stop: watch::Sender<bool>,
}

impl RoleProxy {
    /// Routes to the master that `route` names ("host:port"), once it names one.
    pub async fn start<F, Fut>(route: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Option<String>> + Send,
    {
        let proxy = Self::follow(route, ROUTE_POLL).await;
        crate::wait_for(
            "the proxy to know a master",
            Duration::from_secs(30),
            || async { proxy.routes_to() },
        )
        .await;
        proxy
    }

    /// Routes each new connection to where `route`, asked every `poll`, last named; refuses
    /// connections while it names nothing.
    pub async fn follow<F, Fut>(route: F, poll: Duration) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Option<String>> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (stop, stopped) = watch::channel(false);
        let current: Arc<Mutex<Option<String>>> = Arc::default();
        let (known, mut stop_rx) = (current.clone(), stopped.clone());
        tokio::spawn(async move {
            loop {
                let found = tokio::time::timeout(Duration::from_secs(1), route()).await;
                if let Ok(Some(addr)) = found {
                    *known.lock().unwrap() = Some(addr);
                }
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop_rx.changed() => return,
                }
            }
        });
        let (routes, mut stop_rx) = (current.clone(), stopped.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop_rx.changed() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                let (routes, mut stop_rx) = (routes.clone(), stopped.clone());
                tokio::spawn(async move {
                    let Some(addr) = routes.lock().unwrap().clone() else {
                        return;
                    };
                    let Ok(mut upstream) = TcpStream::connect(&addr).await else {
                        return;
                    };
                    // As a userspace proxy should: no Nagle delay on relayed small writes.
                    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = stop_rx.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            route: current,
            stop,
        }
    }

    /// Routes to the master the local runtime's status names.
    pub async fn for_local(dir: PathBuf) -> Self {
        Self::start(move || {
            let dir = dir.clone();
            async move {
                control::request(&dir, &Request::Status)
                    .await
                    .ok()?
                    .status?
                    .master_addr
            }
        })
        .await
    }

    /// Where new connections go now.
    pub fn routes_to(&self) -> Option<String> {
        self.route.lock().unwrap().clone()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for RoleProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
