//! `cargo xtask`: the project's own commands.
//!
//! `dev` runs the whole Matrix topology on this machine; `test` installs what the tests
//! need and runs exactly what CI runs. One module per subcommand.

mod deploy;
mod dev;
mod mcp_check;
mod nix_checks;
mod push;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and ship the Matrix deploy toolkit")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole topology locally: PostgreSQL, an S3 server, the Fly Machines
    /// emulator running real daemons, and the router on https://localhost:8443.
    Dev(dev::Args),
    /// Install what the tests need (on Debian as root), then fmt, clippy and every test.
    Test(test::Args),
    /// Check the MCP servers pinned in deploy/daemon/mcp offline (part of `test`).
    McpCheck,
    /// Parse and format-check every Nix file (part of `test`).
    NixCheck,
    /// Format every Nix file in place.
    NixFmt,
    /// Build an image (flake attribute or OCI layout) and push it to the registry.
    Push(push::Args),
    /// Build, push, and roll the image out to every per-user machine of the app.
    Deploy(deploy::Args),
}

fn main() -> std::process::ExitCode {
    forget_cargo_run_env();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // `.env` configures what a person runs; the tests stay hermetic and never see it.
    let reads_settings =
        matches!(cli.command, Command::Dev(_) | Command::Push(_) | Command::Deploy(_));
    if reads_settings {
        load_dotenv()?;
    }
    let sh = xshell::Shell::new()?;
    sh.change_dir(project_root());

    match cli.command {
        Command::Dev(args) => dev::run(&sh, args),
        Command::Test(args) => test::run(&sh, args),
        Command::McpCheck => mcp_check::run(&sh),
        Command::NixCheck => nix_checks::run(&sh),
        Command::NixFmt => nix_checks::format(&sh),
        Command::Push(args) => push::run(&sh, args),
        Command::Deploy(args) => deploy::run(&sh, args),
    }
}

/// The repository root (xtask lives one level below it).
pub fn project_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// `cargo run` gives xtask its own package's `CARGO_PKG_*` and `CARGO_MANIFEST_*`
/// variables. Passed on to a nested `cargo build`, they change what some build scripts see
/// (ring's, for one), which rebuilds half the dependency tree on every `cargo xtask` call.
///
/// Called first in `main`, while the process has one thread.
fn forget_cargo_run_env() {
    let inherited = std::env::vars_os().filter_map(|(key, _)| key.into_string().ok()).filter(|k| {
        k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(k.as_str(), "CARGO_BIN_NAME" | "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE")
    });
    let inherited: Vec<String> = inherited.collect();
    for key in inherited {
        std::env::remove_var(key);
    }
}

/// Reads `.env` from the repository root, if there is one; the environment wins.
fn load_dotenv() -> anyhow::Result<()> {
    match dotenvy::from_path(project_root().join(".env")) {
        Ok(()) => Ok(()),
        Err(dotenvy::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::anyhow!(".env: {e}")),
    }
}
