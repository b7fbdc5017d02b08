//! `cargo xtask test`: exactly what CI runs.

use anyhow::Context;
use xshell::{cmd, Shell};

use crate::{mcp_check, nix_checks, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Skip installing missing programs (report them instead, through the tests' skips).
    #[arg(long)]
    no_install: bool,
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Arguments passed on to the test runner (a filter, for example).
    #[arg(last = true)]
    runner_args: Vec<String>,
}

pub fn run(sh: &Shell, args: Args) -> anyhow::Result<()> {
    // 1. Programs the tests start: PostgreSQL, the S3 server, Nix, the registry, ...
    if !args.no_install {
        setup::ensure(sh, setup::DEV)?;
        setup::ensure(sh, setup::TEST)?;
    }

    // 2. Formatting and lints, as CI enforces them.
    if !args.no_lint {
        step("cargo fmt --check");
        cmd!(sh, "cargo fmt --all -- --check").run().context("rustfmt found unformatted code")?;
        step("cargo clippy");
        cmd!(sh, "cargo clippy --workspace --all-targets --locked -- -D warnings")
            .run()
            .context("clippy found warnings")?;
    }

    // 3. Every binary first: integration tests start the router, daemon and emulator.
    step("cargo build --workspace --bins");
    cmd!(sh, "cargo build --workspace --bins --locked").run().context("building the binaries")?;

    // 4. Checks that are not cargo tests: Nix files, and the MCP servers offline.
    step("nix files: parse and format");
    nix_checks::run(sh).context("Nix checks")?;
    step("MCP servers from their locks, offline");
    mcp_check::run(sh).context("MCP server check")?;

    // 5. Every test, with nextest where present.
    step("tests");
    let runner_args = &args.runner_args;
    if harness::tools::find("cargo-nextest").is_some() {
        cmd!(sh, "cargo nextest run --workspace --locked --no-fail-fast {runner_args...}")
            .run()
            .context("tests failed")?;
    } else {
        cmd!(sh, "cargo test --workspace --locked --no-fail-fast {runner_args...}")
            .run()
            .context("tests failed")?;
    }
    Ok(())
}

fn step(name: &str) {
    eprintln!("\n==> {name}");
}
