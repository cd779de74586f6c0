//! Events that say what happened. kube-runtime's Recorder folds every Event of one reason about
//! one object into a single series that keeps its first note, so on a real API server a
//! failover after a bootstrap showed as the bootstrap's note counted twice, and a switchover's
//! end as its start. This recorder keys a series by its note too, as client-go aggregates: the
//! same note again within [`SERIES_TTL`] bumps the series (one patch), a new note is a new
//! Event (one create).

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{EventType, Reporter},
};
use tokio::sync::Mutex;

/// How long a series stays open for its note to be counted again (kube-runtime's, too).
pub const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// What the Event was about: the action taken, as every Event of this controller names it.
const ACTION: &str = "Reconcile";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    type_: &'static str,
    reason: String,
    note: String,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

/// Publishes Events for one controller (cheap to clone: the open series are shared).
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    series: Arc<Mutex<HashMap<Key, Event>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("reporter", &self.reporter)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorder {
            client,
            reporter,
            series: Arc::default(),
        }
    }

    /// Records that `reason` happened to `regarding`, as `note` (at most 1,000 characters).
    pub async fn publish(
        &self,
        type_: EventType,
        reason: &str,
        note: &str,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let note: String = note.chars().take(1000).collect();
        let type_ = match type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let key = Key {
            type_,
            reason: reason.to_owned(),
            note: note.clone(),
            namespace: regarding.namespace.clone(),
            name: regarding.name.clone(),
            uid: regarding.uid.clone(),
        };
        let events: Api<Event> = Api::namespaced(
            self.client.clone(),
            regarding.namespace.as_deref().unwrap_or("default"),
        );
        // One publish at a time: a series is bumped from the count it last had.
        let mut series = self.series.lock().await;
        series.retain(|_, event| last_seen(event).is_some_and(|t| t + SERIES_TTL > now));
        let event = match series.get(&key) {
            Some(open) => {
                let count = open.series.as_ref().map_or(2, |s| s.count + 1);
                let bump = EventSeries {
                    count,
                    last_observed_time: MicroTime(now),
                };
                let patch = serde_json::json!({ "series": bump });
                let name = open.metadata.name.clone().unwrap_or_default();
                events
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                Event {
                    series: Some(bump),
                    ..open.clone()
                }
            }
            None => {
                let event = self.event(type_, reason, note, regarding, now);
                events.create(&PostParams::default(), &event).await?
            }
        };
        series.insert(key, event);
        Ok(())
    }

    fn event(
        &self,
        type_: &str,
        reason: &str,
        note: String,
        regarding: &ObjectReference,
        now: Timestamp,
    ) -> Event {
        let name = regarding
            .name
            .as_deref()
            .unwrap_or(&self.reporter.controller);
        Event {
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                ..ObjectMeta::default()
            },
            action: Some(ACTION.into()),
            reason: Some(reason.into()),
            note: Some(note),
            type_: Some(type_.into()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            ..Event::default()
        }
    }
}

fn last_seen(event: &Event) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or(event.event_time.as_ref().map(|t| t.0))
}
