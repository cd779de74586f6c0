//! Which durable changes count as a master change, and why.

use super::*;
use crate::decide::model::FailoverRecord;

fn at(master: Option<&str>, epoch: u64, cause: Option<Cause>) -> Durable {
    Durable {
        epoch,
        master: master.map(Into::into),
        last_failover: cause.map(|cause| FailoverRecord {
            at_ms: epoch as i64,
            from: None,
            to: master.unwrap_or_default().into(),
            reason: format!("{cause:?}"),
            cause,
        }),
        switchover: None,
    }
}

#[test]
fn the_first_master_is_a_bootstrap() {
    assert_eq!(
        master_change(&at(None, 0, None), &at(Some("a"), 1, None)),
        Some(Cause::Bootstrap)
    );
}

#[test]
fn a_failover_carries_the_cause_the_core_recorded() {
    let before = at(Some("a"), 1, None);
    let after = at(Some("b"), 2, Some(Cause::ProcessGone));
    assert_eq!(master_change(&before, &after), Some(Cause::ProcessGone));
}

#[test]
fn an_aborted_switchover_bumps_the_epoch_but_is_no_change() {
    // The core drops a switchover that did not happen by moving the epoch past its intent.
    let before = at(Some("a"), 2, Some(Cause::ProcessGone));
    let after = at(Some("a"), 3, Some(Cause::ProcessGone));
    assert_eq!(master_change(&before, &after), None);
}
