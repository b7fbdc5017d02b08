//! `fly-emulator`: the Fly Machines API emulator as a program.
//!
//! Prints exactly one line, `fly-emulator listening on http://ADDR`, to stdout once it
//! serves; logs go to stderr. SIGINT or SIGTERM stops every machine process (its stop
//! signal, then SIGKILL after its grace period) and exits 0.

#[path = "fly-emulator/config.rs"]
mod config;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use machines::emulator::{Emulator, EmulatorConfig, EmulatorError, ImageMap, RateLimit};
use tokio::signal::unix::{signal, SignalKind};

/// Exit status for a bad setting (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    init_logging();
    let cli = match config::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match config::Config::from_cli(cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fly-emulator: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let images = match ImageMap::load(&config.image_map) {
        Ok(images) => images,
        Err(e) => {
            eprintln!("fly-emulator: {}: {:#}", config::IMAGE_MAP_VAR, anyhow::Error::from(e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fly-emulator: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, images)) {
        Ok(()) => ExitCode::SUCCESS,
        // A state directory that cannot be used is a bad setting, like a missing one.
        Err(e) if matches!(e.downcast_ref(), Some(EmulatorError::State(_))) => {
            eprintln!("fly-emulator: {}: {e:#}", config::STATE_DIR_VAR);
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("fly-emulator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,machines=info,fly_emulator=info")
    });
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(config: config::Config, images: ImageMap) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let mut emulator = EmulatorConfig::new(&config.token, images, &config.state_dir);
    emulator.listen = config.listen;
    emulator.region = config.region;
    emulator.settings.rate_limit = config.rate_limit.then(RateLimit::default);
    emulator.settings.reassign_address_on_start = config.reassign_addresses;
    let handle = Emulator::start(emulator).await.context("starting the emulator")?;

    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        url = %handle.url(),
        state_dir = %config.state_dir.display(),
        "fly-emulator started"
    );
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "fly-emulator listening on {}", handle.url()).context("writing to stdout")?;
    stdout.flush().context("writing to stdout")?;
    drop(stdout);

    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::info!("fly-emulator stopping: machines get their stop signal and grace period");
    handle.shutdown().await;
    Ok(())
}
