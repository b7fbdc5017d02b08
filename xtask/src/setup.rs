//! Installing what `dev` and `test` need, shared by both.
//!
//! On a Debian-like system as root, missing programs are installed with apt-get or pip,
//! saying what is installed; elsewhere the exact commands are printed and the command
//! stops. Installing is idempotent: a present program is never reinstalled.

use anyhow::{bail, Context};
use xshell::{cmd, Shell};

/// One program a command needs and where it comes from.
#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    /// The program looked up on `PATH` (and in Debian's PostgreSQL directory).
    pub program: &'static str,
    /// How it is installed.
    pub source: Source,
    /// Why it is needed, for the message.
    pub why: &'static str,
}

/// Where a program comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A Debian package.
    Debian(&'static str),
    /// A PyPI requirement, installed with `python3 -m pip`.
    Pip(&'static str),
}

/// What `cargo xtask dev` needs.
pub const DEV: &[Requirement] = &[
    Requirement {
        program: "initdb",
        source: Source::Debian("postgresql"),
        why: "the user -> machine store",
    },
    Requirement {
        program: "moto_server",
        source: Source::Pip("moto[server]==5.2.1"),
        why: "the S3-compatible snapshot store",
    },
];

/// What `cargo xtask test` needs on top of [`DEV`].
pub const TEST: &[Requirement] = &[
    Requirement { program: "psql", source: Source::Debian("postgresql-client"), why: "tests" },
    Requirement {
        program: "shellcheck",
        source: Source::Debian("shellcheck"),
        why: "checking the entrypoint",
    },
    Requirement { program: "nix-build", source: Source::Debian("nix-bin"), why: "image builds" },
    Requirement { program: "skopeo", source: Source::Debian("skopeo"), why: "reading images" },
    Requirement { program: "umoci", source: Source::Debian("umoci"), why: "unpacking images" },
    Requirement {
        program: "docker-registry",
        source: Source::Debian("docker-registry"),
        why: "the OCI registry for push tests",
    },
    Requirement {
        program: "htpasswd",
        source: Source::Debian("apache2-utils"),
        why: "registry basic auth",
    },
    Requirement { program: "unshare", source: Source::Debian("util-linux"), why: "offline checks" },
    Requirement { program: "node", source: Source::Debian("nodejs"), why: "npm MCP servers" },
    Requirement { program: "npm", source: Source::Debian("npm"), why: "npm MCP servers" },
    Requirement { program: "uv", source: Source::Pip("uv==0.13.9"), why: "Python MCP servers" },
];

/// Makes sure every requirement is present, installing what is missing where allowed.
pub fn ensure(sh: &Shell, requirements: &[Requirement]) -> anyhow::Result<()> {
    let missing: Vec<&Requirement> =
        requirements.iter().filter(|r| harness::tools::find(r.program).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }

    if !can_install() {
        eprintln!("Missing programs:");
        for r in &missing {
            eprintln!("  {:<16} ({}): {}", r.program, r.why, install_command(r.source));
        }
        bail!("install the programs above, then run the command again");
    }

    let debian: Vec<&str> = missing
        .iter()
        .filter_map(|r| match r.source {
            Source::Debian(package) => Some(package),
            Source::Pip(_) => None,
        })
        .collect();
    let pip: Vec<&str> = missing
        .iter()
        .filter_map(|r| match r.source {
            Source::Pip(spec) => Some(spec),
            Source::Debian(_) => None,
        })
        .collect();

    if !debian.is_empty() {
        eprintln!("xtask: installing Debian packages: {}", debian.join(" "));
        cmd!(sh, "apt-get update -qq").run().context("apt-get update")?;
        cmd!(sh, "apt-get install -y -qq --no-install-recommends {debian...}")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
            .context("apt-get install")?;
    }
    if !pip.is_empty() {
        eprintln!("xtask: installing from PyPI: {}", pip.join(" "));
        cmd!(sh, "python3 -m pip install --quiet --disable-pip-version-check {pip...}")
            .run()
            .context("pip install")?;
    }

    let still: Vec<&str> = missing
        .iter()
        .filter(|r| harness::tools::find(r.program).is_none())
        .map(|r| r.program)
        .collect();
    if !still.is_empty() {
        bail!("still missing after installing: {}", still.join(", "));
    }
    Ok(())
}

/// Installing is allowed on Debian-like systems when running as root.
fn can_install() -> bool {
    let debian = std::path::Path::new("/etc/debian_version").exists();
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false) || euid_is_root();
    debian && root
}

fn euid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn install_command(source: Source) -> String {
    match source {
        Source::Debian(package) => format!("sudo apt-get install {package}"),
        Source::Pip(spec) => format!("python3 -m pip install '{spec}'"),
    }
}
