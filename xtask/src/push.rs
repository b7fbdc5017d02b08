//! `cargo xtask push <image> [--to REF]`: build an image with `nix build` (or take an OCI
//! layout directory) and push it to the registry.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use registry::{Client, ClientConfig, Credentials, Pushed, Reference};
use xshell::{cmd, Shell};

/// The registry host images are pushed to (`registry.example`, or `127.0.0.1:5000`).
pub const MATRIX_REGISTRY: &str = "MATRIX_REGISTRY";
/// The registry user; the Fly registry takes `x`.
pub const MATRIX_REGISTRY_USER: &str = "MATRIX_REGISTRY_USER";
/// The registry password; the Fly registry takes the Fly API token (the default).
pub const MATRIX_REGISTRY_PASSWORD: &str = "MATRIX_REGISTRY_PASSWORD";
/// The Fly API token, the registry password when none is set.
pub const FLY_API_TOKEN: &str = "FLY_API_TOKEN";
/// The app whose repository images go to when `--to` is not given.
pub const FLY_APP_NAME: &str = "FLY_APP_NAME";

/// The exit status of a missing or malformed setting.
pub const EXIT_CONFIG: i32 = 64;

#[derive(clap::Args)]
pub struct Args {
    /// A flake attribute (`daemon-image`, `.#daemon-image`, or `daemon`), built with
    /// `nix build`; or the path of an OCI image layout directory.
    image: String,
    /// Where to push, `registry/repository[:tag]`. Default:
    /// `$MATRIX_REGISTRY/$FLY_APP_NAME:<short digest>`.
    #[arg(long)]
    to: Option<String>,
    /// A repository of the same registry to mount shared layers from.
    #[arg(long)]
    mount_from: Option<String>,
}

pub fn run(sh: &Shell, args: Args) -> anyhow::Result<()> {
    let layout = image_layout(sh, &args.image)?;
    let target = match &args.to {
        Some(to) => Reference::parse(to)?,
        None => default_target(&layout, &required(FLY_APP_NAME))?,
    };
    let pushed = push(&layout, &target, args.mount_from)?;
    println!("{}", pushed.reference);
    Ok(())
}

/// The OCI layout for `image`: a directory as given, or the output of `nix build`.
pub fn image_layout(sh: &Shell, image: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(image);
    if path.join("oci-layout").is_file() {
        return Ok(path.to_owned());
    }
    if path.exists() {
        anyhow::bail!("{image} is not an OCI image layout (it has no oci-layout file)");
    }
    let looks_like_path = image.contains('/') && !image.starts_with(".#");
    if looks_like_path {
        anyhow::bail!("{image}: no such OCI image layout directory");
    }

    let attribute = flake_attribute(image);
    let out_link = crate::project_root().join("target/xtask").join(format!("result-{attribute}"));
    let installable = format!(".#{attribute}");
    eprintln!("building {installable} with nix");
    let out = cmd!(sh, "nix build {installable} --out-link {out_link} --print-out-paths")
        .read()
        .with_context(|| format!("nix build {installable}"))?;
    let built = PathBuf::from(out.lines().next().unwrap_or_default().trim());
    anyhow::ensure!(
        built.join("oci-layout").is_file(),
        "nix build {installable} made {}, which is not an OCI image layout",
        built.display()
    );
    Ok(built)
}

/// `daemon` -> `daemon-image`; `.#daemon-image` -> `daemon-image`.
fn flake_attribute(image: &str) -> String {
    let bare = image.trim_start_matches(".#").trim_start_matches('#');
    if bare.ends_with("-image") {
        bare.to_owned()
    } else {
        format!("{bare}-image")
    }
}

/// The manifest digest of the layout's image, read without any network I/O.
pub fn layout_digest(layout: &Path) -> anyhow::Result<String> {
    let opened = registry::layout::Layout::open(layout)?;
    Ok(opened.select(None)?.digest.clone())
}

/// `$MATRIX_REGISTRY/<app>:<first 12 hex of the digest>`.
pub fn default_target(layout: &Path, app: &str) -> anyhow::Result<Reference> {
    let registry = required(MATRIX_REGISTRY);
    let digest = layout_digest(layout)?;
    let short = digest.trim_start_matches("sha256:").get(..12).unwrap_or("latest");
    Reference::parse(&format!("{registry}/{app}:{short}"))
        .with_context(|| format!("{MATRIX_REGISTRY}={registry:?} is not a registry host"))
}

/// Pushes the layout to `target` with the credentials from the environment.
pub fn push(
    layout: &Path,
    target: &Reference,
    mount_from: Option<String>,
) -> anyhow::Result<Pushed> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ClientConfig { credentials: credentials(), mount_from, ..ClientConfig::default() };
    let client = Client::new(target, config)?;

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let started = Instant::now();
    eprintln!("pushing {} to {target}", layout.display());
    let pushed = runtime
        .block_on(client.push_layout(layout, None, target))
        .with_context(|| format!("pushing {} to {target}", layout.display()))?;
    let stats = client.stats();
    eprintln!(
        "pushed {} in {:.1?}: {} blobs uploaded ({} bytes), {} already there, {} mounted",
        pushed.reference,
        started.elapsed(),
        stats.blobs_uploaded,
        stats.bytes_uploaded,
        stats.blobs_skipped,
        stats.blobs_mounted
    );
    Ok(pushed)
}

/// Basic credentials when a password (or a Fly token) is set, anonymous otherwise.
fn credentials() -> Credentials {
    let password = optional(MATRIX_REGISTRY_PASSWORD).or_else(|| optional(FLY_API_TOKEN));
    match password {
        Some(password) => {
            let user = optional(MATRIX_REGISTRY_USER).unwrap_or_else(|| "x".to_owned());
            Credentials::Basic { user, password }
        }
        None => Credentials::Anonymous,
    }
}

/// A setting that must be present: its absence stops the program (exit 64), naming it.
pub fn required(name: &str) -> String {
    match optional(name) {
        Some(value) => value,
        None => {
            eprintln!("error: {name} is not set (see .env.example)");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// A setting that may be absent; an empty or non-UTF-8 value stops the program (exit 64).
pub fn optional(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        Ok(_) => {
            eprintln!("error: {name} is set but empty");
            std::process::exit(EXIT_CONFIG);
        }
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            eprintln!("error: {name} is not valid UTF-8");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flake_attributes() {
        assert_eq!(flake_attribute("daemon"), "daemon-image");
        assert_eq!(flake_attribute(".#daemon-image"), "daemon-image");
        assert_eq!(flake_attribute("browser-image"), "browser-image");
    }
}
