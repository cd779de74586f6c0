//! The controller's Prometheus metrics: reconciles and errors by reason, failovers by cause,
//! decision latency (a pass that sends commands: from observing to dispatching), connected
//! agents and refused agents, and requests to the Kubernetes API by verb and resource; served as OpenMetrics text on `/metrics`.

use std::{sync::Mutex, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: &'static str,
}

/// A Kubernetes API request: its verb (get, list, watch, create, patch, update, delete) and
/// the resource (`pods`, `failovers/status`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct RequestLabel {
    pub verb: &'static str,
    pub resource: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub failovers: Family<CauseLabel, Counter>,
    pub switchovers: Counter,
    pub api_requests: Family<RequestLabel, Counter>,
    /// The same counts, readable in process (benchmarks, tests).
    counted: Mutex<std::collections::BTreeMap<RequestLabel, u64>>,
    pub decision_seconds: Histogram,
    pub connected_agents: Gauge,
    pub refused_agents: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("valkey_controller");
        let metrics = Metrics {
            registry: Mutex::new(Registry::default()),
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            failovers: Family::default(),
            switchovers: Counter::default(),
            api_requests: Family::default(),
            counted: Mutex::default(),
            decision_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            connected_agents: Gauge::default(),
            refused_agents: Counter::default(),
        };
        registry.register(
            "reconciles",
            "Reconcile passes by result (ok, or the error reason)",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass",
            metrics.reconcile_seconds.clone(),
        );
        registry.register(
            "failovers",
            "Promotions of a new master, by cause",
            metrics.failovers.clone(),
        );
        registry.register(
            "switchovers",
            "Planned switchovers that moved the master",
            metrics.switchovers.clone(),
        );
        registry.register(
            "kube_api_requests",
            "Requests to the Kubernetes API server, by verb and resource",
            metrics.api_requests.clone(),
        );
        registry.register(
            "decision_latency_seconds",
            "From observing the agents' reports to dispatching the commands decided",
            metrics.decision_seconds.clone(),
        );
        registry.register(
            "connected_agents",
            "Agents with an open stream to this controller",
            metrics.connected_agents.clone(),
        );
        registry.register(
            "refused_agents",
            "Agent streams refused (bad or foreign token)",
            metrics.refused_agents.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            ..metrics
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration, error: Option<&str>) {
        self.reconcile_seconds.observe(took.as_secs_f64());
        self.reconciles
            .get_or_create(&ResultLabel {
                result: error.unwrap_or("ok").to_owned(),
            })
            .inc();
    }

    /// The master moved: a switchover, or a failover by its cause (a closed set of labels).
    pub fn master_changed(&self, cause: crate::decide::Cause) {
        if cause == crate::decide::Cause::Switchover {
            self.switchovers.inc();
        } else {
            self.failovers
                .get_or_create(&CauseLabel {
                    cause: cause.label(),
                })
                .inc();
        }
    }

    /// One request to the API server.
    pub fn api_request(&self, verb: &'static str, resource: String) {
        let label = RequestLabel { verb, resource };
        self.api_requests.get_or_create(&label).inc();
        if let Ok(mut counted) = self.counted.lock() {
            *counted.entry(label).or_default() += 1;
        }
    }

    /// API requests counted so far, by verb and resource.
    pub fn requests(&self) -> std::collections::BTreeMap<RequestLabel, u64> {
        self.counted.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn decided(&self, took: Duration) {
        self.decision_seconds.observe(took.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = encode(&mut out, &registry);
        }
        out
    }
}
