//! `cargo xtask deploy`: build and push the image, then roll it out (by digest) to every
//! per-user machine of the app, a canary first, then waves, health-gated and resumable.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use machines::FlyClient;
use rollout::{MachineResult, Progress, Rollout, RolloutConfig, Store};
use xshell::Shell;

use crate::push::{self, config_error, required, FLY_API_TOKEN};

/// The Fly Machines API base URL (the emulator's URL under `cargo xtask dev`).
pub const FLY_API_URL: &str = "FLY_API_URL";
/// The PostgreSQL database where rollout progress and the desired image are kept.
pub const DATABASE_URL: &str = "DATABASE_URL";

/// The longest `--health-timeout` taken: a day. Longer is a typo, not a plan.
const MAX_HEALTH_TIMEOUT_SECS: u64 = 24 * 60 * 60;

#[derive(clap::Args)]
pub struct Args {
    /// The image to deploy: a flake attribute (`daemon` = `.#daemon-image`) or an OCI
    /// layout directory.
    #[arg(long, default_value = "daemon")]
    image: String,
    /// The Fly app whose machines are updated (default: $FLY_APP_NAME).
    #[arg(long)]
    app: Option<String>,
    /// Machines in the canary wave (at least 1; see --no-canary).
    #[arg(long, default_value_t = 1)]
    canary: usize,
    /// Start with a full wave instead of a canary: a bad image then reaches a whole
    /// wave before the rollout halts.
    #[arg(long, conflicts_with = "canary")]
    no_canary: bool,
    /// Machines per wave after the canary.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Seconds a restarted machine may take to pass its checks and answer `/healthz`
    /// (1 to 86400).
    #[arg(long, default_value_t = 120)]
    health_timeout: u64,
    /// Do not probe the daemon's `/healthz` on the machine's private address (for a deploy
    /// run outside the private network); Fly's health checks still gate each machine.
    #[arg(long)]
    no_daemon_healthz: bool,
    /// Print the plan and change nothing: no push, no machine update, no database write.
    /// It still needs FLY_API_URL, FLY_API_TOKEN and DATABASE_URL: it lists the machines
    /// and reads (read-only) the unfinished rollout and the desired image, if any.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(sh: &Shell, args: Args) -> anyhow::Result<()> {
    // 1. Settings first: a missing or malformed one stops here (exit 64), before any build.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rollout_config(&args).unwrap_or_else(|problem| config_error(&problem));
    let app = push::app_name(args.app.as_deref());
    let registry = push::registry_host();
    let fly = FlyClient::new(&required(FLY_API_URL), &required(FLY_API_TOKEN), &app)
        .unwrap_or_else(|e| config_error(&format!("{FLY_API_URL} or {FLY_API_TOKEN}: {e}")));
    let database_url = required(DATABASE_URL);
    if Store::check_url(&database_url).is_err() {
        config_error(&format!("{DATABASE_URL} is not a PostgreSQL connection string"));
    }

    // 2. Build, and push unless this is a dry run; the rollout pins the digest.
    let layout = push::image_layout(sh, &args.image)?;
    let target = push::default_target(&layout, &registry, &app)?;
    let image = if args.dry_run {
        target.with_reference(&push::layout_digest(&layout)?).to_string()
    } else {
        push::push(&layout, &target, None)?.reference.to_string()
    };

    // 3. Roll it out (or show what that would do).
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        if args.dry_run {
            return dry_run(fly, &database_url, config, &image).await;
        }
        let store = Store::connect(&database_url).await?;
        let mut rollout = Rollout::new(fly, store, config);
        let progress = WaveProgress::new();
        let outcome = rollout.run(&image, &progress).await?;
        print!("{outcome}");
        anyhow::ensure!(!outcome.failed(), "the deploy of {image} to {app} did not finish");
        Ok(())
    })
}

/// The rollout settings the flags ask for, or what is wrong with them.
fn rollout_config(args: &Args) -> Result<RolloutConfig, String> {
    if args.batch == 0 {
        return Err("--batch must be at least 1".to_owned());
    }
    if args.canary == 0 && !args.no_canary {
        return Err("--canary must be at least 1 (or pass --no-canary to start with a full \
                    wave)"
            .to_owned());
    }
    if !(1..=MAX_HEALTH_TIMEOUT_SECS).contains(&args.health_timeout) {
        return Err(format!(
            "--health-timeout must be 1 to {MAX_HEALTH_TIMEOUT_SECS} seconds, not {}",
            args.health_timeout
        ));
    }
    let defaults = RolloutConfig::default();
    Ok(RolloutConfig {
        canary: if args.no_canary { 0 } else { args.canary },
        batch: args.batch,
        health_timeout: Duration::from_secs(args.health_timeout),
        health_path: if args.no_daemon_healthz { None } else { defaults.health_path.clone() },
        ..defaults
    })
}

/// Prints the plan, and what the database says, without writing anything anywhere.
async fn dry_run(
    fly: FlyClient,
    database_url: &str,
    config: RolloutConfig,
    image: &str,
) -> anyhow::Result<()> {
    let store = Store::connect_read_only(database_url).await?;
    let app = fly.app().to_owned();
    let unfinished = store.active_run(&app).await?;
    let desired = store.desired_image(&app).await?;
    let rollout = Rollout::new(fly, store, config);
    print!("{}", rollout.plan(image).await?);
    match desired {
        Some(desired) => println!("new machines get {desired} now"),
        None => println!("no desired image is recorded yet"),
    }
    if let Some(run) = unfinished {
        let resumes = if run.image == image { "would be resumed" } else { "blocks this deploy" };
        println!("unfinished rollout {} of {} {resumes}", run.id, run.image);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn config(flags: &[&str]) -> Result<RolloutConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("deploy").chain(flags.iter().copied()))
            .map_err(|e| e.to_string())?;
        rollout_config(&cli.args)
    }

    #[test]
    fn health_flags_reach_the_rollout() {
        let got = config(&["--health-timeout", "7", "--no-daemon-healthz"]).expect("valid");
        assert_eq!(got.health_timeout, Duration::from_secs(7));
        assert_eq!(got.health_path, None);
        let got = config(&["--canary", "2", "--batch", "3"]).expect("valid");
        assert_eq!((got.canary, got.batch), (2, 3));
        assert_eq!(got.health_timeout, Duration::from_secs(120));
        assert_eq!(got.health_path.as_deref(), Some("/healthz"));
        assert_eq!(config(&["--no-canary"]).expect("valid").canary, 0);
    }

    #[test]
    fn absurd_flags_are_refused_naming_the_flag() {
        for (flags, named) in [
            (&["--health-timeout", "18446744073709551615"][..], "--health-timeout"),
            (&["--health-timeout", "86401"][..], "--health-timeout"),
            (&["--health-timeout", "0"][..], "--health-timeout"),
            (&["--canary", "0"][..], "--canary"),
            (&["--batch", "0"][..], "--batch"),
        ] {
            let problem = config(flags).expect_err("refused");
            assert!(problem.contains(named), "{flags:?}: {problem}");
        }
    }
}
