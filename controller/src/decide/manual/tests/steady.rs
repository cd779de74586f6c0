//! Policy manual, steady state: replicas pointed at the master, live settings, a master
//! scaled away switched over first.

use super::*;

#[test]
fn steady_state_does_nothing() {
    let d = desired(3);
    let obs = observed(&[
        ("n0", master(5, 100)),
        ("n1", replica(7000, 100)),
        ("n2", replica(7000, 90)),
    ]);
    assert_eq!(decide(&d, &at("n0", 1), &obs, 0), Plan::default());
}

#[test]
fn wrong_master_and_returning_old_master_are_repointed() {
    let d = desired(3);
    let obs = observed(&[
        ("n0", master(5, 100)),
        ("n1", replica(7002, 100)),
        ("n2", master(5, 80)),
    ]);
    let plan = decide(&d, &at("n0", 2), &obs, 0);
    assert_eq!(plan.durable, None, "no role change, nothing to persist");
    assert_eq!(replicaofs(&plan), [("n1", 7000), ("n2", 7000)]);
    assert!(promotes(&plan).is_empty());
}

#[test]
fn scaling_the_master_away_asks_for_a_switchover_first() {
    let mut d = desired(3);
    d.nodes[2].retiring = true;
    let obs = observed(&[
        ("n0", replica(7002, 100)),
        ("n1", replica(7002, 120)),
        ("n2", master(5, 120)),
    ]);
    let plan = decide(&d, &at("n2", 1), &obs, 0);
    assert_eq!(plan.switchover.as_deref(), Some("n1"));
    assert!(plan.commands.is_empty() && plan.durable.is_none());
    // A retiring node is never a candidate.
    let obs = observed(&[
        ("n0", down(master(5, 100))),
        ("n1", replica(7000, 10)),
        ("n2", replica(7000, 120)),
    ]);
    assert_eq!(promotes(&decide(&d, &at("n0", 1), &obs, 0)), ["n1"]);
}

#[test]
fn live_config_drift_is_set() {
    let mut d = desired(2);
    d.live_config = BTreeMap::from([
        ("min-replicas-to-write".into(), "1".into()),
        ("min-replicas-max-lag".into(), "10".into()),
    ]);
    let obs = observed(&[("n0", master(1, 1)), ("n1", replica(7000, 1))]);
    let plan = decide(&d, &at("n0", 1), &obs, 0);
    let sets: Vec<&str> = plan
        .commands
        .iter()
        .filter(|(_, a)| matches!(a, Action::ConfigSet(c) if c.params.len() == 2))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(sets, ["n0", "n1"]);
}
