//! `matrix-router`: reads its configuration from the environment and serves until SIGINT or
//! SIGTERM, then stops accepting and drains open requests and streams for at most
//! `ROUTER_SHUTDOWN_GRACE_SECS` before it exits 0. Everything else lives in the library.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Exit status for bad configuration (sysexits `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    // Colour codes only on a terminal: piped logs (`cargo xtask dev`, a log collector) stay
    // plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,matrix_router=info")),
        )
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();

    let config = match matrix_router::config::Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("matrix-router: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let self_signed = config.tls == matrix_router::config::TlsSource::SelfSigned;
    let grace = config.shutdown_grace;

    let router = match matrix_router::start(config).await {
        Ok(router) => router,
        Err(e) => {
            let config_error = e.variable().is_some();
            eprintln!("matrix-router: {:#}", anyhow::Error::from(e));
            return if config_error { ExitCode::from(EXIT_CONFIG) } else { ExitCode::FAILURE };
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen.addr = %router.addr,
        "matrix-router started",
    );
    if self_signed {
        tracing::info!(
            sha256 = %router.fingerprint,
            "serving a self-signed certificate (dev mode)",
        );
    }
    println!("matrix-router listening on https://{}", router.addr);

    shutdown_signal().await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "matrix-router shutting down: draining open requests and streams"
    );
    tokio::select! {
        drained = router.shutdown(grace) => {
            if drained {
                tracing::info!("matrix-router drained");
            }
        }
        // A second signal cuts what is open instead of waiting for the grace period.
        () = shutdown_signal() => tracing::warn!("second signal: cutting open streams"),
    }
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
