//! Policy manual, why the master failed: gone, hung, unseen or back, and whether that is
//! a reason to fail over yet.

use super::*;

#[test]
fn a_crashed_master_waits_for_its_replicas_final_offsets_for_a_while() {
    let d = desired(3);
    // n2 still reports its link up: its offset may be a heartbeat old, though it may hold the
    // last acknowledged writes.
    let waiting = observed(&[
        ("n0", just_down(master(5, 100))),
        ("n1", lost_master(replica(7000, 95))),
        ("n2", replica(7000, 90)),
    ]);
    let plan = decide(&d, &at("n0", 4), &waiting, 0);
    assert_eq!(plan.durable, None, "{plan:?}");
    assert!(promotes(&plan).is_empty());
    assert!(
        plan.notes.iter().any(|n| n.contains("final offsets")),
        "{plan:?}"
    );

    // n2 reports losing it, with its final offset, the highest: it is the one promoted.
    let settled = observed(&[
        ("n0", just_down(master(5, 100))),
        ("n1", lost_master(replica(7000, 95))),
        ("n2", lost_master(replica(7000, 99))),
    ]);
    assert_eq!(promotes(&decide(&d, &at("n0", 4), &settled, 0)), ["n2"]);

    // A link-down report from before the master died (n2 was still in its first sync) is
    // not final: its offset may be behind the writes it acknowledged since.
    let stale = observed(&[
        ("n0", just_down(master(5, 100))),
        ("n1", lost_master(replica(7000, 95))),
        (
            "n2",
            with(replica(7000, 1), |o| data_mut(o).master_link_up = false),
        ),
    ]);
    assert!(promotes(&decide(&d, &at("n0", 4), &stale, 0)).is_empty());

    // A replica that never reports does not hold the failover up for long.
    let mut late = waiting.clone();
    if let Some(r) = late.nodes.get_mut("n0").and_then(|o| o.report.as_mut()) {
        r.down_for_ms = OFFSETS_SETTLE_MS;
    }
    assert_eq!(promotes(&decide(&d, &at("n0", 4), &late, 0)), ["n1"]);
}

#[test]
fn a_lost_agent_alone_is_no_reason_to_fail_over() {
    let d = desired(3);
    let lost = with(master(5, 100), |o| {
        o.connected = false;
        o.unhealthy_ms = 60_000;
    });
    let obs = observed(&[
        ("n0", lost),
        ("n1", replica(7000, 100)),
        ("n2", replica(7000, 100)),
    ]);
    assert_eq!(decide(&d, &at("n0", 1), &obs, 0), Plan::default());
}

#[test]
fn a_hung_master_fails_over_only_after_the_timeout_and_when_replicas_agree() {
    let d = desired(3);
    let hung = |ms| {
        with(master(5, 100), |o| {
            if let Some(r) = o.report.as_mut() {
                r.set_process(ProcessState::Hung);
            }
            o.unhealthy_ms = ms;
        })
    };
    let silent = |s| with(replica(7000, 100), |o| data_mut(o).master_last_io_s = s);
    let cases = [
        (2_000, 5, 5, false), // not long enough
        (3_000, 5, 1, false), // one replica still hears it
        (3_000, 5, 5, true),  // timed out and both replicas lost it
        (3_000, 1, 1, false), // replicas still hear it: only the probe is stuck
    ];
    for (ms, io1, io2, fails_over) in cases {
        let obs = observed(&[("n0", hung(ms)), ("n1", silent(io1)), ("n2", silent(io2))]);
        let plan = decide(&d, &at("n0", 1), &obs, 0);
        assert_eq!(
            plan.durable.is_some(),
            fails_over,
            "{ms} {io1} {io2}: {plan:?}"
        );
        assert_eq!(promotes(&plan).len(), usize::from(fails_over));
    }
    // A link reported down (for long enough that the master fenced itself) counts as lost.
    let obs = observed(&[
        ("n0", hung(5_000)),
        (
            "n1",
            with(replica(7000, 1), |o| {
                data_mut(o).master_link_up = false;
                data_mut(o).master_link_down_s = 2;
            }),
        ),
    ]);
    assert_eq!(
        promotes(&decide(&desired(2), &at("n0", 1), &obs, 0)),
        ["n1"]
    );
    // No reachable replica: nobody confirms, nothing happens.
    let obs = observed(&[("n0", hung(60_000))]);
    assert_eq!(decide(&desired(2), &at("n0", 1), &obs, 0), Plan::default());
}

#[test]
fn an_unseen_master_after_a_controller_restart_is_no_reason_to_fail_over() {
    let d = desired(3);
    // The controller just restarted: the master's agent has not said hello yet, and the
    // replicas came back following nobody.
    let nobody = || with(replica(1, 100), |o| data_mut(o).master_link_up = false);
    let obs = observed(&[("n1", nobody()), ("n2", nobody())]);
    let plan = decide(&d, &at("n0", 4), &obs, 0);
    assert!(
        plan.durable.is_none() && promotes(&plan).is_empty(),
        "{plan:?}"
    );
}

#[test]
fn a_restarted_master_is_promoted_back_unless_it_came_back_empty() {
    let d = desired(3);
    // Every node starts as a replica of nobody: here the master came back with its data.
    let nobody = |keys: u64, offset| {
        with(replica(1, offset), |o| {
            let d = data_mut(o);
            d.master_link_up = false;
            d.key_count = keys;
        })
    };
    let obs = observed(&[
        ("n0", nobody(5, 100)),
        ("n1", nobody(5, 100)),
        ("n2", nobody(5, 90)),
    ]);
    let plan = decide(&d, &at("n0", 3), &obs, 0);
    assert_eq!(plan.durable, None, "same master, same epoch");
    assert_eq!(promotes(&plan), ["n0"]);

    // Came back empty: a replica holding data takes over instead.
    let empty = with(nobody(0, 0), |o| data_mut(o).restarted_empty = true);
    let obs = observed(&[("n0", empty), ("n1", nobody(5, 100)), ("n2", nobody(5, 90))]);
    let plan = decide(&d, &at("n0", 3), &obs, 0);
    assert_eq!(plan.durable.clone().expect("durable").epoch, 4);
    assert_eq!(promotes(&plan), ["n1"]);

    // Came back with no keys, its agent unaware it ever held any (it crashed right after its
    // first writes), while the replicas hold keys: not promoted back either.
    let unaware = nobody(0, 0);
    let obs = observed(&[
        ("n0", unaware),
        ("n1", nobody(5, 100)),
        ("n2", nobody(5, 90)),
    ]);
    let plan = decide(&d, &at("n0", 3), &obs, 0);
    assert_eq!(promotes(&plan), ["n1"]);

    // Fresh and empty everywhere (nothing was ever written): it is promoted back.
    let fresh = || with(nobody(0, 0), |o| data_mut(o).never_synced = true);
    let obs = observed(&[("n0", fresh()), ("n1", fresh()), ("n2", fresh())]);
    assert_eq!(promotes(&decide(&d, &at("n0", 1), &obs, 0)), ["n0"]);
}
