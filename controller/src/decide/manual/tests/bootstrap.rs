//! Policy manual, bootstrap: the first master, chosen once every node reports.

use super::*;

#[test]
fn bootstrap_waits_for_every_node_then_picks_the_most_data() {
    let d = desired(3);
    let partial = observed(&[("n0", master(0, 0)), ("n1", master(5, 0))]);
    assert_eq!(
        decide(&d, &Durable::default(), &partial, 0),
        Plan::default()
    );

    let cases = [
        // (keys, offsets) per node -> chosen
        ([(0, 0), (5, 0), (3, 90)], "n1"),
        ([(5, 10), (5, 20), (5, 20)], "n1"),
        ([(0, 0), (0, 0), (0, 0)], "n0"),
        ([(1, 0), (0, 0), (1, 0)], "n0"),
    ];
    for (nodes, chosen) in cases {
        let obs = observed(&[
            ("n0", master(nodes[0].0, nodes[0].1)),
            ("n1", master(nodes[1].0, nodes[1].1)),
            ("n2", master(nodes[2].0, nodes[2].1)),
        ]);
        let plan = decide(&d, &Durable::default(), &obs, 0);
        let durable = plan.durable.clone().expect("persisted first");
        assert_eq!(
            (durable.epoch, durable.master.as_deref()),
            (1, Some(chosen)),
            "{nodes:?}"
        );
        assert!(
            promotes(&plan).is_empty(),
            "already a master: nothing to promote"
        );
        let port = d.node(chosen).expect("node").port;
        let mut others = replicaofs(&plan);
        others.sort();
        let expected: Vec<(&str, u32)> = ["n0", "n1", "n2"]
            .into_iter()
            .filter(|n| *n != chosen)
            .map(|n| (n, u32::from(port)))
            .collect();
        assert_eq!(others, expected);
    }
}

#[test]
fn bootstrap_promotes_a_chosen_replica() {
    let d = desired(2);
    let obs = observed(&[("n0", replica(9999, 50)), ("n1", master(0, 0))]);
    let plan = decide(&d, &Durable::default(), &obs, 0);
    assert_eq!(
        plan.durable.clone().expect("durable").master.as_deref(),
        Some("n0")
    );
    assert_eq!(promotes(&plan), ["n0"]);
    assert_eq!(replicaofs(&plan), [("n1", 7000)]);
}

#[test]
fn a_single_empty_node_stays_master() {
    let d = desired(1);
    let obs = observed(&[(
        "n0",
        with(master(0, 0), |o| data_mut(o).restarted_empty = true),
    )]);
    let plan = decide(&d, &at("n0", 1), &obs, 0);
    assert_eq!(plan.durable, None);
    assert!(plan.commands.is_empty());
    assert!(plan.notes[0].contains("stays master"), "{:?}", plan.notes);
}
