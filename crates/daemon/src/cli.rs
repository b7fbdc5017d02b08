//! The command line: subcommands, logging set-up and exit statuses.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, Mode};
use crate::init::{self, InitOutcome};
use crate::layout::DataDir;
use crate::server::{self, Background};
use crate::snapshot::{self, PushOutcome};
use crate::store::SnapshotStore;
use crate::supervisor::SupervisorError;
use crate::{datalock, link, restore, supervisor};

/// Exit status for bad configuration (EX_CONFIG is 78; 64 is EX_USAGE, which the project uses).
const EXIT_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;

/// The per-user Matrix daemon. Configuration is read from the environment.
#[derive(Debug, Parser)]
#[command(name = "matrixd", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve {
        /// Leave the background work to a separate `matrixd executor` (dual mode).
        #[arg(long)]
        front_door: bool,
    },
    /// Lay out the data directory and restore the latest snapshot when the volume is new
    /// or behind; safe to run any number of times.
    Init,
    /// Push or restore snapshots.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Run the front door and the executor as two supervised processes.
    Dual,
    /// Run the intents and the periodic snapshots without the API; used by `dual`.
    Executor,
}

#[derive(Debug, Subcommand)]
enum SnapshotAction {
    /// Push the volume as the next generation (nothing happens when it is unchanged).
    Push,
    /// Restore the latest generation over the volume.
    Restore,
}

/// Runs the command line and returns the exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("matrixd: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("matrixd: starting the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(run(cli.command, &config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let config_error = e.chain().any(|cause| {
                cause.is::<ConfigError>()
                    || matches!(
                        cause.downcast_ref::<SupervisorError>(),
                        Some(SupervisorError::ChildConfig { .. })
                    )
            });
            eprintln!("matrixd: {e:#}");
            ExitCode::from(if config_error { EXIT_CONFIG } else { EXIT_FAILURE })
        }
    }
}

async fn run(command: Option<Command>, config: &Config) -> anyhow::Result<()> {
    let command = command.unwrap_or(Command::Serve { front_door: false });
    // Every command works on the volume: a wrong MATRIX_DATA_DIR stops it here, with 64.
    config.check_data_dir()?;
    match command {
        Command::Serve { front_door: false } if config.mode == Mode::Dual => {
            anyhow::bail!(
                "MATRIX_MODE is dual: run `matrixd dual`, which starts the front door itself"
            )
        }
        Command::Serve { front_door } => {
            config.daemon_token()?;
            if front_door {
                supervisor::stop_with_supervisor()?;
            }
            let background = if front_door { Background::Skip } else { Background::Run };
            server::serve(config, background).await?;
        }
        Command::Init => {
            if config.s3.is_none() {
                tracing::info!("snapshots are off: no S3_* variables are set");
            }
            let _writer = datalock::acquire(&DataDir::new(&config.data_dir)).await?;
            let outcome = init::init(config).await.map_err(anyhow::Error::from)?;
            let root = config.data_dir.display();
            match outcome {
                InitOutcome::Ready { generation } => {
                    println!("matrixd init: {root} ready at generation {generation}")
                }
                InitOutcome::Restored { generation } => {
                    println!("matrixd init: {root} restored generation {generation}")
                }
                InitOutcome::KeptLocal { local, remote } => println!(
                    "matrixd init: {root} kept local changes at generation {local}; the store \
                        has {remote}"
                ),
            }
        }
        Command::Snapshot { action } => {
            let s3 = config.s3()?;
            let store = SnapshotStore::new(s3, config.user_id)?;
            let data = DataDir::new(&config.data_dir);
            // A running daemon writes the tree and pushes on its own: refuse rather than
            // archive a journal mid-write or restore under a live writer.
            let _writer = datalock::try_acquire(&data)?;
            match action {
                SnapshotAction::Push => match snapshot::push(&data, &store, config.snapshot_keep)
                    .await?
                {
                    PushOutcome::Pushed { generation, size } => {
                        println!("matrixd snapshot push: generation {generation} ({size} bytes)")
                    }
                    PushOutcome::Unchanged { generation } => {
                        println!("matrixd snapshot push: unchanged since generation {generation}")
                    }
                },
                SnapshotAction::Restore => {
                    let latest = store.latest().await?.ok_or_else(|| {
                        anyhow::anyhow!("the store holds no snapshot for this user")
                    })?;
                    restore::restore(&data, &store, &latest).await?;
                    println!("matrixd snapshot restore: generation {}", latest.generation);
                }
            }
        }
        Command::Dual => {
            // The children would only fail the same way, over and over.
            config.daemon_token()?;
            check_executor_socket(config)?;
            supervisor::supervise().await?
        }
        Command::Executor => {
            supervisor::stop_with_supervisor()?;
            check_executor_socket(config)?;
            server::run_executor(config).await?
        }
    }
    Ok(())
}

/// The executor's socket lives under the data directory; its path must fit a socket address.
fn check_executor_socket(config: &Config) -> Result<(), ConfigError> {
    let socket = link::socket_path(&DataDir::new(&config.data_dir));
    if link::fits_socket_address(&socket) {
        return Ok(());
    }
    Err(ConfigError::DataDir {
        path: config.data_dir.display().to_string(),
        problem: format!(
            "is too long a path for dual mode: the executor socket {} must be under 108 bytes",
            socket.display()
        ),
    })
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,matrixd=info"));
    // rust-s3 warns on every retry with the store's whole XML answer; the error that ends a
    // call reaches the log through matrixd's own message. `RUST_LOG=s3=...` still asks for it.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("s3")) {
        filter = filter.add_directive("s3=error".parse().expect("a static directive"));
    }
    // Colour only for a person at a terminal: piped logs (the emulator, a log shipper) get
    // plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
}
