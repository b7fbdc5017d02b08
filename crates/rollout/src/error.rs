//! Errors that stop a rollout before or between waves. A single machine's failure is
//! not one of these: it is recorded in the [`crate::Outcome`].

use machines::FlyError;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("rollout database: could not {op}")]
    Database {
        op: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("Fly Machines API: could not {op} of app {app}")]
    Fly {
        op: &'static str,
        app: String,
        #[source]
        source: FlyError,
    },

    #[error("another deploy of app {app} is running (it holds the deploy lock)")]
    Busy { app: String },

    #[error(
        "app {app} has an unfinished rollout {run} of {image}; run that deploy again to finish it"
    )]
    OtherRunActive { app: String, run: uuid::Uuid, image: String },

    #[error("the image {image:?} is not pinned by digest (expected name@sha256:...)")]
    NotPinned { image: String },

    #[error("rollout database: TLS settings")]
    DatabaseTls(#[source] crate::pg_tls::PgTlsError),
}
