//! The controller's Prometheus metrics: reconciles and errors by reason, failovers by cause,
//! decision latency (a pass that sends commands: from observing to dispatching), connected
//! agents and refused agents; served as OpenMetrics text on `/metrics`.

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
    pub cause: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub failovers: Family<CauseLabel, Counter>,
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

    pub fn failover(&self, cause: &str) {
        // Causes are short fixed phrases from the core; keep the label set bounded.
        let cause: String = cause.chars().take(40).collect();
        self.failovers.get_or_create(&CauseLabel { cause }).inc();
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
