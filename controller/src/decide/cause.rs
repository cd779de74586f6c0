//! Why a master changed, as a closed set: Event reasons and metric labels come from here, so
//! that a label never carries a pod name or a timing (the message does).

use serde::{Deserialize, Serialize};

/// What made the master change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Cause {
    /// The first master of an instance.
    Bootstrap,
    /// The master's process is gone (its agent says so).
    ProcessGone,
    /// The master restarted with an empty dataset.
    RestartedEmpty,
    /// The master stopped answering and its replicas lost it.
    Unresponsive,
    /// A planned switchover (asked for, a scale-down, a roll, a terminating master).
    Switchover,
    /// Sentinel chose a new master.
    Sentinel,
    /// Read back from a state written before causes were recorded.
    #[default]
    Unknown,
}

impl Cause {
    /// The metric label and Event reason suffix: bounded, stable.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Bootstrap => "bootstrap",
            Cause::ProcessGone => "process_gone",
            Cause::RestartedEmpty => "restarted_empty",
            Cause::Unresponsive => "unresponsive",
            Cause::Switchover => "switchover",
            Cause::Sentinel => "sentinel",
            Cause::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_lowercase() {
        let all = [
            Cause::Bootstrap,
            Cause::ProcessGone,
            Cause::RestartedEmpty,
            Cause::Unresponsive,
            Cause::Switchover,
            Cause::Sentinel,
            Cause::Unknown,
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(|c| c.label()).collect();
        assert_eq!(labels.len(), all.len());
        assert!(
            labels
                .iter()
                .all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
    }
}
