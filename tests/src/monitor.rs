//! Watches for two writable masters at once, as an application would suffer them: every
//! 20 ms it asks every node for its role and writes a probe key (`__bench_probe`) to each that
//! claims master; a round in which two nodes accept it is a moment with two writable masters.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::AsyncCommands;

/// Counts rounds (every 20 ms) in which two nodes claim master and both accept a write.
#[derive(Debug)]
pub struct Monitor {
    stop: Arc<AtomicBool>,
    double: Arc<AtomicU64>,
    /// Microseconds covered by those rounds (each from the round before it).
    double_us: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    /// Watches `nodes` (host:port), with a client from `client` (given the address) made at
    /// each (re)connect, so that it follows a password rotation.
    pub fn start(
        nodes: Vec<String>,
        client: impl Fn(&str) -> redis::Client + Send + Sync + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let double = Arc::new(AtomicU64::new(0));
        let double_us = Arc::new(AtomicU64::new(0));
        let (stop_flag, double_ref, double_us_ref) =
            (stop.clone(), double.clone(), double_us.clone());
        let task = tokio::spawn(async move {
            let mut conns: Vec<Option<redis::aio::MultiplexedConnection>> = vec![None; nodes.len()];
            let mut previous = Instant::now();
            while !stop_flag.load(Ordering::Relaxed) {
                let round = Instant::now();
                let mut writable = 0;
                let probes = nodes.iter().zip(conns.iter_mut()).map(|(addr, conn)| {
                    let client = conn.is_none().then(|| client(addr));
                    async move {
                        if let Some(client) = client {
                            let config = redis::AsyncConnectionConfig::new()
                                .set_connection_timeout(Some(Duration::from_millis(50)))
                                .set_response_timeout(Some(Duration::from_millis(100)));
                            *conn = client
                                .get_multiplexed_async_connection_with_config(&config)
                                .await
                                .ok();
                        }
                        let Some(c) = conn.as_mut() else { return false };
                        let role: redis::RedisResult<redis::Value> =
                            redis::cmd("ROLE").query_async(c).await;
                        let master = match role {
                            Ok(redis::Value::Array(items)) => matches!(
                                items.first(),
                                Some(redis::Value::BulkString(b)) if b.as_slice() == b"master"
                            ),
                            Ok(_) => false,
                            Err(_) => {
                                *conn = None;
                                return false;
                            }
                        };
                        if !master {
                            return false;
                        }
                        let probe: redis::RedisResult<()> = c.set("__bench_probe", 1).await;
                        probe.is_ok()
                    }
                });
                for accepted in futures::future::join_all(probes).await {
                    writable += usize::from(accepted);
                }
                if writable >= 2 {
                    double_ref.fetch_add(1, Ordering::Relaxed);
                    double_us_ref
                        .fetch_add(previous.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                previous = Instant::now();
                let left = Duration::from_millis(20).saturating_sub(round.elapsed());
                tokio::time::sleep(left).await;
            }
        });
        Self {
            stop,
            double,
            double_us,
            task,
        }
    }

    /// Stops, and returns the number of rounds with two writable masters.
    pub async fn finish(self) -> u64 {
        self.finish_timed().await.0
    }

    /// Stops, and returns the rounds with two writable masters and the time they covered.
    pub async fn finish_timed(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.double.load(Ordering::Relaxed),
            Duration::from_micros(self.double_us.load(Ordering::Relaxed)),
        )
    }
}
