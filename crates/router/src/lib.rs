//! `matrix-router`: the only public door of a Matrix deployment.
//!
//! A request is verified ([`auth`]), mapped to the user's machine ([`store`]), which is
//! provisioned or woken as needed ([`fleet`]), and streamed to the daemon on it ([`proxy`]).
//! [`start`] runs all of it on a bound socket, for `main` and for the tests.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod daemon_token;
pub mod deprovision;
pub mod drain;
pub mod error;
pub mod fleet;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod service;
pub mod store;
pub mod template;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::Config;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading the TLS certificate")]
    Tls(#[from] tls::TlsError),
    #[error("preparing the database")]
    Store(#[from] store::StoreError),
    #[error("{}: loading the machine template", config::ROUTER_DAEMON_TEMPLATE)]
    Template(#[from] template::TemplateError),
    #[error("configuring the Fly Machines API client")]
    Fly(#[from] machines::FlyError),
    #[error("binding {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

impl StartError {
    /// The configuration variable at fault, when a configured file is unusable: `main` exits
    /// 64 for these, as for a malformed variable.
    pub fn variable(&self) -> Option<&'static str> {
        match self {
            StartError::Tls(e) => e.variable(),
            StartError::Template(_) => Some(config::ROUTER_DAEMON_TEMPLATE),
            StartError::Store(store::StoreError::Tls(_)) => Some(config::PGSSLROOTCERT),
            _ => None,
        }
    }
}

/// A running router; dropping it closes the listener and every connection at once, and stops
/// the idle suspender. [`RunningRouter::shutdown`] lets open work finish first.
pub struct RunningRouter {
    /// The bound address (the kernel's choice when the configured port was 0).
    pub addr: SocketAddr,
    /// SHA-256 fingerprint of the served certificate.
    pub fingerprint: String,
    pub metrics: Arc<metrics::Metrics>,
    drain: drain::Drain,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningRouter {
    /// Stops accepting connections, lets in-flight requests and open streams (SSE,
    /// WebSocket) finish for at most `grace`, then cuts what is left. Returns whether
    /// everything finished within the grace period.
    pub async fn shutdown(self, grace: Duration) -> bool {
        let finished = self.drain.drain(grace).await;
        if !finished {
            tracing::warn!(open = self.drain.open(), "grace period over: cutting open streams");
        }
        finished
    }
}

impl Drop for RunningRouter {
    fn drop(&mut self) {
        self.drain.cut();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Prepares everything (TLS, migrations, template, clients), binds, and serves.
pub async fn start(config: Config) -> Result<RunningRouter, StartError> {
    // Two rustls providers are compiled into the workspace; the process must pick one.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let tls = tls::load(&config.tls)?;
    // The template before the database: a configuration error is reported before any
    // connection is made.
    let template = template::MachineTemplate::load(&config.daemon.template)?;
    template.check()?;
    let store = store::Store::new(
        &config.database_url,
        config.database_timeout,
        config.database_root_cert.as_deref(),
    )?;
    store.migrate().await?;
    let fly =
        machines::FlyClient::new(&config.fly.api_url, &config.fly.api_token, &config.fly.app_name)?;

    let metrics = Arc::new(metrics::Metrics::default());
    let drain = drain::Drain::default();
    let jwks = Arc::new(auth::JwksCache::new(config.auth.jwks_url.clone()));
    let fleet = fleet::Fleet::new(fleet::FleetParts {
        fly,
        store,
        template,
        tokens: daemon_token::DaemonTokens::new(&config.daemon.token_secret),
        daemon: config.daemon.clone(),
        region: config.fly.region.clone(),
        wake: config.wake.clone(),
        metrics: metrics.clone(),
    });
    let state = Arc::new(service::AppState {
        auth: auth::Authenticator::new(&config.auth, jwks),
        fleet: fleet.clone(),
        upstream: proxy::Upstream::new(&config.limits, drain.clone()),
        metrics: metrics.clone(),
        wake_token: config.wake_token.clone(),
        admin_token: config.admin_token.clone(),
        metrics_token: config.metrics_token.clone(),
        max_body_bytes: config.limits.max_body_bytes,
    });

    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .map_err(|source| StartError::Bind { addr: config.listen_addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr: config.listen_addr, source })?;

    let serve = server::serve(listener, tls.config, state, config.limits.clone(), drain.clone());
    drain.spawn(serve);
    let sweeper = deprovision::run_sweeper(fleet.clone(), metrics.clone());
    let tasks = vec![tokio::spawn(fleet.run_idle_suspender()), tokio::spawn(sweeper)];
    Ok(RunningRouter { addr, fingerprint: tls.fingerprint, metrics, drain, tasks })
}
