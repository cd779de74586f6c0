//! Leader election on a coordination.k8s.io Lease, so that two controller replicas can run and
//! only one writes. Optimistic concurrency does the locking: every write carries the Lease's
//! resourceVersion, so of two replicas racing for it one gets a conflict.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, api::PostParams};

#[derive(Debug, Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Elector {
    /// `identity` is this replica's pod name; `duration` how long a lease lasts unrenewed.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Elector {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// Takes the lease if it is free or expired, renews it if ours; true while we lead.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = self.duration.as_secs().max(1) as i32;
        let existing = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let lasts = SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds.unwrap_or(seconds),
            ));
            t.0 + lasts < now
        });
        if !ours && !expired {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Gives the lease up (on shutdown), so that the other replica takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await?
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.renew_time = None;
            spec.holder_identity = None;
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_fake_client::ClientBuilder;

    async fn api() -> Api<Lease> {
        let client = ClientBuilder::new().build().await.expect("fake client");
        Api::namespaced(client, "valkey-system")
    }

    #[tokio::test]
    async fn one_leader_until_it_lets_go_or_its_lease_expires() {
        let api = api().await;
        let a = Elector::new(
            api.clone(),
            "valkey-controller",
            "a",
            Duration::from_secs(15),
        );
        let b = Elector::new(
            api.clone(),
            "valkey-controller",
            "b",
            Duration::from_secs(15),
        );
        assert!(a.try_acquire_or_renew().await.expect("a"));
        assert!(!b.try_acquire_or_renew().await.expect("b"));
        assert!(a.try_acquire_or_renew().await.expect("a renews"));
        a.release().await.expect("release");
        assert!(b.try_acquire_or_renew().await.expect("b takes over"));
        assert!(!a.try_acquire_or_renew().await.expect("a waits"));
        // b stops renewing: once its lease has run out, a takes over.
        let mut lease = api.get("valkey-controller").await.expect("lease");
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(MicroTime(Timestamp::now() - SignedDuration::from_secs(16)));
        }
        api.replace("valkey-controller", &PostParams::default(), &lease)
            .await
            .expect("age the lease");
        assert!(
            a.try_acquire_or_renew()
                .await
                .expect("a takes the expired lease")
        );
        let lease = api.get("valkey-controller").await.expect("lease");
        let spec = lease.spec.expect("spec");
        assert_eq!(
            (spec.holder_identity.as_deref(), spec.lease_transitions),
            (Some("a"), Some(2))
        );
    }
}
