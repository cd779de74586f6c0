//! The Kubernetes runtime's error: one enum whose variant names are the Event reasons (and
//! the reconcile metric's labels). An error the user must fix (an invalid spec, a missing
//! Secret) waits for a change; the others are retried in seconds.

use crate::validate::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidSpec(Invalid),
    #[error("{field}: Secret {name:?} not found in namespace {namespace}")]
    MissingSecret {
        field: &'static str,
        name: String,
        namespace: String,
    },
    #[error("spec.access.ports: NodePort {port} is already used by Service {service}")]
    NodePortInUse { port: i32, service: String },
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status: {0}")]
    Status(#[source] kube::Error),
    #[error("updating the finalizer: {0}")]
    Finalizer(#[source] kube::Error),
    #[error("cleaning up: {0}")]
    Cleanup(#[source] kube::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{field}: Secret {name:?}: {message}")]
    InvalidSecret {
        field: &'static str,
        name: String,
        message: String,
    },
    #[error("the controller's work dir: {0}")]
    WorkDir(String),
}

impl Error {
    /// The Event reason: the variant's name.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::MissingSecret { .. } => "MissingSecret",
            Error::NodePortInUse { .. } => "NodePortInUse",
            Error::Read { .. } => "Read",
            Error::Apply { .. } => "Apply",
            Error::Status(_) => "Status",
            Error::Finalizer(_) => "Finalizer",
            Error::Cleanup(_) => "Cleanup",
            Error::Tls(_) => "Tls",
            Error::InvalidSecret { .. } => "InvalidSecret",
            Error::WorkDir(_) => "WorkDir",
        }
    }

    /// The user must change something: wait for them rather than retrying fast.
    pub fn is_users(&self) -> bool {
        matches!(
            self,
            Error::InvalidSpec(_)
                | Error::MissingSecret { .. }
                | Error::InvalidSecret { .. }
                | Error::NodePortInUse { .. }
        )
    }
}
