//! What both paths of the Kubernetes runtime stand on: the per-instance state they share
//! (`context`), the writes they make (`apply`) and the Events they publish (`events`), the
//! metrics and the API request counter, leader election, agent authentication (TokenReviews
//! and their cache) and the hub's TLS. `k8s::run` wires them with the hot and cold paths.

pub mod apply;
pub mod auth;
pub mod context;
pub mod events;
pub mod hub_tls;
pub mod leader;
pub mod metrics;
pub mod requests;
pub mod token_cache;
