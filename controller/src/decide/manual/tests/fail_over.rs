//! Policy manual, fail over: which replica is promoted.

use super::*;

#[test]
fn a_crashed_master_fails_over_at_once_to_the_highest_offset() {
    let d = desired(3);
    let obs = observed(&[
        ("n0", down(master(5, 100))),
        ("n1", lost_master(replica(7000, 90))),
        ("n2", lost_master(replica(7000, 95))),
    ]);
    let plan = decide(&d, &at("n0", 4), &obs, 1234);
    let durable = plan.durable.clone().expect("durable");
    assert_eq!((durable.epoch, durable.master.as_deref()), (5, Some("n2")));
    let record = durable.last_failover.expect("record");
    assert_eq!(
        (record.at_ms, record.from.as_deref(), record.to.as_str()),
        (1234, Some("n0"), "n2")
    );
    assert!(record.reason.contains("gone"));
    assert_eq!(promotes(&plan), ["n2"]);
    assert_eq!(replicaofs(&plan), [("n1", 7002)]);
}

#[test]
fn candidates_exclude_empty_never_synced_and_priority_zero() {
    let d = desired(4);
    let empty = with(replica(7000, 500), |o| data_mut(o).restarted_empty = true);
    let fresh = with(replica(7000, 400), |o| data_mut(o).never_synced = true);
    let zero = with(replica(7000, 300), |o| data_mut(o).replica_priority = 0);
    let obs = observed(&[
        ("n0", down(master(5, 100))),
        ("n1", empty.clone()),
        ("n2", fresh.clone()),
        ("n3", zero.clone()),
    ]);
    let plan = decide(&d, &at("n0", 1), &obs, 0);
    assert_eq!(plan.durable, None);
    assert!(promotes(&plan).is_empty());
    assert!(plan.notes[0].contains("no candidate"), "{:?}", plan.notes);

    let ok = replica(7000, 1);
    let obs = observed(&[
        ("n0", down(master(5, 100))),
        ("n1", empty),
        ("n2", fresh),
        ("n3", ok),
    ]);
    assert_eq!(promotes(&decide(&d, &at("n0", 1), &obs, 0)), ["n3"]);
}

#[test]
fn priority_then_ordinal_break_offset_ties() {
    let d = desired(4);
    let p = |prio: u32| with(replica(7000, 100), |o| data_mut(o).replica_priority = prio);
    let obs = observed(&[
        ("n0", down(master(1, 100))),
        ("n1", p(100)),
        ("n2", p(10)),
        ("n3", p(10)),
    ]);
    assert_eq!(promotes(&decide(&d, &at("n0", 1), &obs, 0)), ["n2"]);
}

#[test]
fn a_master_restarted_empty_is_never_the_sync_source() {
    let d = desired(3);
    let empty_master = with(master(0, 0), |o| data_mut(o).restarted_empty = true);
    // Its replicas lost their link when it died and have not resynced yet.
    let waiting = |off| with(replica(7000, off), |o| data_mut(o).master_link_up = false);
    let obs = observed(&[
        ("n0", empty_master),
        ("n1", waiting(100)),
        ("n2", waiting(120)),
    ]);
    let plan = decide(&d, &at("n0", 1), &obs, 0);
    assert_eq!(
        plan.durable.clone().expect("durable").master.as_deref(),
        Some("n2")
    );
    assert_eq!(promotes(&plan), ["n2"]);
    let mut repoint = replicaofs(&plan);
    repoint.sort();
    assert_eq!(
        repoint,
        [("n0", 7002), ("n1", 7002)],
        "the empty node syncs from the new master"
    );
}
