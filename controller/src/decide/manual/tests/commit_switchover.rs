//! Policy manual, first phase: a pending switchover is committed once its target serves,
//! or dropped.

use super::*;

#[test]
fn a_pending_switchover_is_left_alone_then_committed_or_dropped() {
    let d = desired(2);
    let pending = Durable {
        switchover: Some(PendingSwitchover {
            from: "n0".into(),
            to: "n1".into(),
            epoch: 3,
        }),
        ..at("n0", 2)
    };
    let mut obs = observed(&[("n0", replica(7001, 100)), ("n1", master(5, 100))]);
    obs.switchover_in_flight = true;
    assert_eq!(decide(&d, &pending, &obs, 0), Plan::default());

    obs.switchover_in_flight = false;
    let done = decide(&d, &pending, &obs, 77).durable.expect("durable");
    assert_eq!(
        (done.epoch, done.master.as_deref(), done.switchover.as_ref()),
        (3, Some("n1"), None)
    );
    assert_eq!(
        done.last_failover.expect("record").reason,
        "planned switchover"
    );

    let obs = observed(&[("n0", master(5, 100)), ("n1", replica(7000, 100))]);
    let dropped = decide(&d, &pending, &obs, 0).durable.expect("durable");
    assert_eq!(
        (
            dropped.epoch,
            dropped.master.as_deref(),
            dropped.switchover.as_ref()
        ),
        (3, Some("n0"), None)
    );
}
