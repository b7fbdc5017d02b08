//! `cargo xtask deploy`: build and push the image, then roll it out (by digest) to every
//! per-user machine of the app, a canary first, then waves, health-gated and resumable.

use std::io::IsTerminal;
use std::sync::Mutex;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use machines::FlyClient;
use rollout::{MachineResult, Progress, Rollout, RolloutConfig, Store};
use xshell::Shell;

use crate::push::{self, required, EXIT_CONFIG, FLY_API_TOKEN, FLY_APP_NAME};

/// The Fly Machines API base URL (the emulator's URL under `cargo xtask dev`).
pub const FLY_API_URL: &str = "FLY_API_URL";
/// The PostgreSQL database where rollout progress and the desired image are kept.
pub const DATABASE_URL: &str = "DATABASE_URL";

#[derive(clap::Args)]
pub struct Args {
    /// The image to deploy: a flake attribute (`daemon` = `.#daemon-image`) or an OCI
    /// layout directory.
    #[arg(long, default_value = "daemon")]
    image: String,
    /// The Fly app whose machines are updated (default: $FLY_APP_NAME).
    #[arg(long)]
    app: Option<String>,
    /// Machines in the canary wave.
    #[arg(long, default_value_t = 1)]
    canary: usize,
    /// Machines per wave after the canary.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Seconds a restarted machine may take to pass its checks and answer `/healthz`.
    #[arg(long, default_value_t = 120)]
    health_timeout: u64,
    /// Do not probe the daemon's `/healthz` on the machine's private address (for a deploy
    /// run outside the private network); Fly's health checks still gate each machine.
    #[arg(long)]
    no_daemon_healthz: bool,
    /// Print the plan and change nothing (no push, no update).
    #[arg(long)]
    dry_run: bool,
}

pub fn run(sh: &Shell, args: Args) -> anyhow::Result<()> {
    // 1. Settings first: a missing one stops here, before any build.
    let app = args.app.clone().unwrap_or_else(|| required(FLY_APP_NAME));
    let api_url = required(FLY_API_URL);
    let token = required(FLY_API_TOKEN);
    let database_url = required(DATABASE_URL);
    if args.batch == 0 {
        eprintln!("error: --batch must be at least 1");
        std::process::exit(EXIT_CONFIG);
    }

    // 2. Build, and push unless this is a dry run; the rollout pins the digest.
    let layout = push::image_layout(sh, &args.image)?;
    let target = push::default_target(&layout, &app)?;
    let image = if args.dry_run {
        target.with_reference(&push::layout_digest(&layout)?).to_string()
    } else {
        push::push(&layout, &target, None)?.reference.to_string()
    };

    // 3. Roll it out.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let fly = FlyClient::new(&api_url, &token, &app)
            .with_context(|| format!("{FLY_API_URL} or {FLY_API_TOKEN} is not usable"))?;
        let store = Store::connect(&database_url).await?;
        let config =
            RolloutConfig { canary: args.canary, batch: args.batch, ..RolloutConfig::default() };
        let mut rollout = Rollout::new(fly, store, config);

        if args.dry_run {
            print!("{}", rollout.plan(&image).await?);
            return Ok(());
        }
        let progress = WaveProgress::new();
        let outcome = rollout.run(&image, &progress).await?;
        print!("{outcome}");
        anyhow::ensure!(!outcome.failed(), "the deploy of {image} to {app} failed");
        Ok(())
    })
}

/// A progress bar per wave on a terminal; plain lines otherwise (CI logs).
struct WaveProgress {
    bar: Mutex<Option<ProgressBar>>,
    terminal: bool,
}

impl WaveProgress {
    fn new() -> Self {
        Self { bar: Mutex::new(None), terminal: std::io::stderr().is_terminal() }
    }

    fn with_bar(&self, f: impl FnOnce(&mut Option<ProgressBar>)) {
        f(&mut self.bar.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Progress for WaveProgress {
    fn wave_started(&self, name: &str, machines: usize) {
        if !self.terminal {
            eprintln!("{name}: updating {machines} machines");
            return;
        }
        let bar = ProgressBar::new(machines as u64);
        let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(name.to_owned());
        self.with_bar(|slot| *slot = Some(bar));
    }

    fn machine_finished(&self, machine: &str, result: MachineResult) {
        if !self.terminal {
            eprintln!("  {machine}: {}", result.as_str());
            return;
        }
        self.with_bar(|slot| {
            if let Some(bar) = slot {
                bar.set_message(format!("{machine} {}", result.as_str()));
                bar.inc(1);
            }
        });
    }

    fn wave_finished(&self, name: &str, ok: bool) {
        let verdict = if ok { "done" } else { "FAILED" };
        if !self.terminal {
            eprintln!("{name}: {verdict}");
            return;
        }
        self.with_bar(|slot| {
            if let Some(bar) = slot.take() {
                bar.finish_with_message(verdict);
            }
        });
    }

    fn rolling_back(&self, machines: usize) {
        eprintln!("rolling back {machines} machines to their previous image");
    }
}
