//! The master's write lease: a master keeps taking writes only while its agent can show that it
//! still holds the role, through the controller's grants or its replicas' acknowledgements.
//! Without either for the lease's length the agent pauses writes (fences), so that a master cut
//! off from everyone stops before another node can be promoted. Only this agent's monotonic
//! clock is used here; the controller keeps its own side on its own clock (docs/failover.md,
//! "The write lease").

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};
use valkey_proto::v1::{ProcessState, Role};

use crate::{config::Config, snapshot::Shared, snapshot::Snapshot, valkey::Valkey};

/// How often the fence is checked.
const TICK: Duration = Duration::from_millis(50);
/// How often a master asks its replicas for a fresh acknowledgement, and how long it waits.
const RENEW_EVERY: Duration = Duration::from_millis(250);
/// The channel a master publishes on to get an acknowledgement (PUBLISH is replicated, and
/// WAIT then waits for a replica to confirm it).
const RENEW_CHANNEL: &str = "__valkey-agent:lease";

#[derive(Debug, Default)]
struct State {
    /// 0 until the controller grants a first lease: only then is the agent under the rule.
    lease_ms: u64,
    /// Until when the controller's last grant holds.
    granted_until: Option<Instant>,
    /// When a replica last confirmed (at the latest: when the request it answered was sent), or
    /// when this node became master.
    evidence_at: Option<Instant>,
    fenced: bool,
    /// When the fence's pause was last (re)issued.
    paused_at: Option<Instant>,
}

/// Shared between the controller link (requests and grants), the renewal and the fence.
#[derive(Debug)]
pub struct Lease {
    base: Instant,
    state: Mutex<State>,
}

impl Default for Lease {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            state: Mutex::default(),
        }
    }
}

impl Lease {
    /// The stamp a report or heartbeat carries to ask for a lease: this agent's monotonic
    /// milliseconds (never 0).
    pub fn request_stamp(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    /// A grant: the lease holds until `lease_ms` after the request it answers was sent.
    pub fn grant(&self, request_ms: u64, lease_ms: u32) {
        let Some(sent) = request_ms
            .checked_sub(1)
            .map(|ms| self.base + Duration::from_millis(ms))
        else {
            return;
        };
        if let Ok(mut state) = self.state.lock() {
            state.lease_ms = u64::from(lease_ms);
            let until = sent + Duration::from_millis(u64::from(lease_ms));
            state.granted_until = Some(state.granted_until.map_or(until, |u| u.max(until)));
        }
    }

    /// A replica confirmed the role: its acknowledgement answered a request sent at `sent`.
    fn evidence(&self, sent: Instant) {
        if let Ok(mut state) = self.state.lock() {
            state.evidence_at = Some(state.evidence_at.map_or(sent, |e| e.max(sent)));
        }
    }

    /// Writes are paused because the lease lapsed.
    pub fn fenced(&self) -> bool {
        self.state.lock().map(|s| s.fenced).unwrap_or(false)
    }

    /// Whether to ask the replicas now: under the rule, and the controller's grant has less
    /// than half a lease left (grants come every heartbeat, so this means it is not heard).
    /// Asking only then keeps the replication stream, and the offsets, still while idle.
    fn wants_acknowledgements(&self, now: Instant) -> bool {
        self.state
            .lock()
            .map(|s| {
                let half = Duration::from_millis(s.lease_ms / 2);
                s.lease_ms > 0 && !s.fenced && s.granted_until.is_none_or(|u| u < now + half)
            })
            .unwrap_or(false)
    }
}

/// What the fence should do at `now`, given whether the node is a serving master.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Nothing,
    /// The lease lapsed: pause writes for this many ms.
    Fence(u64),
    /// Still fenced: the pause is renewed before it runs out.
    Pause(u64),
    Unpause,
}

/// What the local Valkey is, as far as the fence cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serving {
    Master,
    Replica,
    /// Down, hung or not read yet: nothing is sent to it (a command queued in a hung Valkey
    /// would run when it resumes).
    Unknown,
}

fn step(state: &mut State, serving: Serving, now: Instant) -> Step {
    match serving {
        Serving::Unknown => return Step::Nothing,
        Serving::Replica if state.fenced => {
            state.fenced = false;
            return Step::Unpause;
        }
        Serving::Replica => return Step::Nothing,
        Serving::Master => {}
    }
    let lease = Duration::from_millis(state.lease_ms);
    let granted = state.granted_until.is_some_and(|u| u > now);
    let acknowledged = state.evidence_at.is_some_and(|e| e + lease > now);
    if state.fenced {
        // Only the controller lifts a fence: a replica that comes back may already have been
        // told to follow another master.
        if granted {
            state.fenced = false;
            return Step::Unpause;
        }
        if state.paused_at.is_none_or(|at| now >= at + lease) {
            state.paused_at = Some(now);
            return Step::Pause(pause_ms(state.lease_ms));
        }
        return Step::Nothing;
    }
    if state.lease_ms == 0 || granted || acknowledged {
        return Step::Nothing;
    }
    state.fenced = true;
    state.paused_at = Some(now);
    Step::Fence(pause_ms(state.lease_ms))
}

/// A fence's pause outlasts a few renewals, so that it ends by itself if this agent dies.
fn pause_ms(lease_ms: u64) -> u64 {
    lease_ms * 4
}

fn serving(snapshot: &Snapshot) -> Serving {
    let report = &snapshot.report;
    match report.data.as_ref().map(|d| d.role()) {
        _ if report.process() != ProcessState::Up => Serving::Unknown,
        Some(Role::Master) => Serving::Master,
        Some(Role::Replica) => Serving::Replica,
        _ => Serving::Unknown,
    }
}

/// Runs the fence (and the replicas' renewals) for the agent's life.
pub async fn run(
    config: Arc<Config>,
    shared: Arc<Shared>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let (mut fence_conn, renew_conn) = match (
        Valkey::new(&config, config.probe_timeout),
        Valkey::new(&config, RENEW_EVERY * 2),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(err), _) | (_, Err(err)) => {
            warn!(error = %err, "write lease: no local client; this master will not fence itself");
            return;
        }
    };
    let renewing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(renew(renew_conn, shared.clone(), renewing.clone()));
    let mut was_replica = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = snapshots.changed() => if changed.is_err() { return },
        }
        let serving = serving(&snapshots.borrow());
        let now = Instant::now();
        match serving {
            Serving::Master if was_replica => {
                // Just promoted by an authority (the controller or Sentinel): that is
                // evidence, and gives the replicas a lease's length to link. (A hung master
                // that comes back was not promoted: it gets none.)
                shared.lease.evidence(now);
                was_replica = false;
            }
            Serving::Master => {}
            Serving::Replica => was_replica = true,
            Serving::Unknown => {}
        }
        let master = serving == Serving::Master;
        renewing.store(
            master && shared.lease.wants_acknowledgements(now),
            std::sync::atomic::Ordering::Relaxed,
        );
        let Ok(action) = shared
            .lease
            .state
            .lock()
            .map(|mut s| step(&mut s, serving, now))
        else {
            return;
        };
        let cmd = match action {
            Step::Nothing => continue,
            Step::Fence(ms) | Step::Pause(ms) => {
                let mut cmd = redis::cmd("CLIENT");
                cmd.arg("PAUSE").arg(ms).arg("WRITE");
                cmd
            }
            Step::Unpause => {
                if shared.writes_paused() {
                    // The controller's own pause (a switchover) runs out by itself.
                    continue;
                }
                let mut cmd = redis::cmd("CLIENT");
                cmd.arg("UNPAUSE");
                cmd
            }
        };
        match fence_conn.query::<String>(&cmd).await {
            Ok(_) => match action {
                Step::Fence(_) => warn!(
                    "no grant from the controller and no acknowledgement from a replica within the write lease; writes paused"
                ),
                Step::Unpause => info!("write lease granted again; writes resumed"),
                _ => debug!(?action, "write fence renewed"),
            },
            Err(err) => {
                warn!(error = %err, ?action, "cannot apply the write fence; trying again");
                if matches!(action, Step::Fence(_) | Step::Pause(_))
                    && let Ok(mut state) = shared.lease.state.lock()
                {
                    // The next tick pauses again.
                    state.paused_at = None;
                }
            }
        }
        // The next report says so.
        shared.probe_now.notify_one();
    }
}

/// While this node is an unfenced master the controller is not heard granting: a replicated
/// PUBLISH and `WAIT 1`, every [`RENEW_EVERY`]; an acknowledgement renews the lease from the
/// moment the request was sent.
async fn renew(
    mut conn: Valkey,
    shared: Arc<Shared>,
    renewing: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !renewing.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        let sent = Instant::now();
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH")
            .arg(RENEW_CHANNEL)
            .arg(0)
            .ignore()
            .cmd("WAIT")
            .arg(1)
            .arg(RENEW_EVERY.as_millis() as u64);
        match conn.pipe::<(i64,)>(&pipe).await {
            Ok((acked,)) if acked >= 1 => shared.lease.evidence(sent),
            Ok(_) => {}
            Err(err) => debug!(error = %err, "write lease: renewal through the replicas failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed(now: Instant) -> State {
        State {
            lease_ms: 1500,
            granted_until: Some(now + Duration::from_millis(1500)),
            ..State::default()
        }
    }

    #[test]
    fn a_master_without_grant_or_acknowledgement_for_the_lease_pauses_writes() {
        let t0 = Instant::now();
        let mut state = armed(t0);
        assert_eq!(step(&mut state, Serving::Master, t0), Step::Nothing);
        assert_eq!(
            step(
                &mut state,
                Serving::Master,
                t0 + Duration::from_millis(1499)
            ),
            Step::Nothing
        );
        assert_eq!(
            step(
                &mut state,
                Serving::Master,
                t0 + Duration::from_millis(1500)
            ),
            Step::Fence(6000)
        );
        assert!(state.fenced);
        // Renewed before it runs out, not on every tick.
        assert_eq!(
            step(
                &mut state,
                Serving::Master,
                t0 + Duration::from_millis(1600)
            ),
            Step::Nothing
        );
        assert_eq!(
            step(
                &mut state,
                Serving::Master,
                t0 + Duration::from_millis(3000)
            ),
            Step::Pause(6000)
        );
    }

    #[test]
    fn replicas_acknowledgements_alone_keep_writes_going() {
        let t0 = Instant::now();
        let mut state = armed(t0);
        state.evidence_at = Some(t0 + Duration::from_millis(1400));
        assert_eq!(
            step(
                &mut state,
                Serving::Master,
                t0 + Duration::from_millis(2800)
            ),
            Step::Nothing
        );
        assert_eq!(
            step(
                &mut state,
                Serving::Master,
                t0 + Duration::from_millis(2900)
            ),
            Step::Fence(6000)
        );
    }

    #[test]
    fn only_a_grant_or_a_demotion_lifts_the_fence() {
        let t0 = Instant::now();
        let mut state = armed(t0);
        let later = t0 + Duration::from_millis(2000);
        assert!(matches!(
            step(&mut state, Serving::Master, later),
            Step::Fence(_)
        ));
        state.evidence_at = Some(later);
        assert_ne!(step(&mut state, Serving::Master, later), Step::Unpause);
        state.granted_until = Some(later + Duration::from_millis(100));
        assert_eq!(step(&mut state, Serving::Master, later), Step::Unpause);
        assert!(!state.fenced);

        let mut state = armed(t0);
        assert!(matches!(
            step(&mut state, Serving::Master, later),
            Step::Fence(_)
        ));
        // Hung or down: nothing is queued for it, and the fence stays.
        assert_eq!(step(&mut state, Serving::Unknown, later), Step::Nothing);
        assert!(state.fenced);
        assert_eq!(step(&mut state, Serving::Replica, later), Step::Unpause);
    }

    #[test]
    fn replicas_are_asked_only_when_the_controller_is_not_heard() {
        let lease = Lease::default();
        let now = Instant::now();
        // Never granted: not under the rule.
        assert!(!lease.wants_acknowledgements(now));
        lease.grant(lease.request_stamp(), 1500);
        assert!(!lease.wants_acknowledgements(Instant::now()));
        // Less than half the lease left: the controller's grants stopped coming.
        assert!(lease.wants_acknowledgements(Instant::now() + Duration::from_millis(800)));
    }

    #[test]
    fn an_agent_never_granted_a_lease_does_not_fence() {
        let t0 = Instant::now();
        let mut state = State::default();
        assert_eq!(
            step(&mut state, Serving::Master, t0 + Duration::from_secs(60)),
            Step::Nothing
        );
    }

    #[test]
    fn a_late_grant_counts_from_when_its_request_was_sent() {
        let lease = Lease::default();
        let sent = lease.request_stamp();
        lease.grant(sent, 1500);
        let until = lease.state.lock().map(|s| s.granted_until).ok().flatten();
        assert!(until.is_some_and(|u| u <= Instant::now() + Duration::from_millis(1500)));
        // A stale grant (an old request delivered late) never shortens a newer one.
        lease.grant(1, 1500);
        assert_eq!(
            lease.state.lock().map(|s| s.granted_until).ok().flatten(),
            until
        );
    }
}
