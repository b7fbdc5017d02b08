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
    // 1. Settings and arguments first: a bad one stops here, before any build.
    let destination = match &args.to {
        Some(to) => Destination::Given(
            Reference::parse(to).unwrap_or_else(|e| config_error(&format!("--to {to:?}: {e}"))),
        ),
        None => Destination::Default { registry: registry_host(), app: app_name(None) },
    };

    // 2. Build, then push.
    let layout = image_layout(sh, &args.image)?;
    let target = match destination {
        Destination::Given(target) => target,
        Destination::Default { registry, app } => default_target(&layout, &registry, &app)?,
    };
    let pushed = push(&layout, &target, args.mount_from)?;
    println!("{}", pushed.reference);
    Ok(())
}

/// Where `push` sends the image: `--to`, or the app's repository in `$MATRIX_REGISTRY`,
/// tagged once the digest is known.
enum Destination {
    Given(Reference),
    Default { registry: String, app: String },
}

/// The OCI layout for `image`: a directory as given, or the output of `nix build`.
pub fn image_layout(sh: &Shell, image: &str) -> anyhow::Result<PathBuf> {
    if image.trim().is_empty() {
        config_error("the image is empty: give a flake attribute (daemon) or an OCI layout path");
    }
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

    let Some(attribute) = flake_attribute(image) else {
        config_error(&format!(
            "{image:?} is neither an OCI layout directory nor a flake attribute ([A-Za-z0-9_-])"
        ));
    };
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

/// `daemon` -> `daemon-image`; `.#daemon-image` -> `daemon-image`; `None` when what is left
/// is not a plain attribute name (empty, `-image`, or with characters nix would read as
/// something else).
fn flake_attribute(image: &str) -> Option<String> {
    let bare = image.trim_start_matches(".#").trim_start_matches('#');
    let plain = bare.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let name = bare.strip_suffix("-image").unwrap_or(bare);
    if !plain || name.is_empty() || name.starts_with('-') {
        return None;
    }
    Some(format!("{name}-image"))
}

/// The manifest digest of the layout's image, read without any network I/O.
pub fn layout_digest(layout: &Path) -> anyhow::Result<String> {
    let opened = registry::layout::Layout::open(layout)?;
    Ok(opened.select(None)?.digest.clone())
}

/// `registry/<app>:<first 12 hex of the digest>`, from a checked [`registry_host`] and
/// [`app_name`].
pub fn default_target(layout: &Path, registry: &str, app: &str) -> anyhow::Result<Reference> {
    let digest = layout_digest(layout)?;
    let short = digest.trim_start_matches("sha256:").get(..12).unwrap_or("latest");
    Reference::parse(&format!("{registry}/{app}:{short}"))
        .with_context(|| format!("{registry}/{app}:{short} is not an image reference"))
}

/// `$MATRIX_REGISTRY`, checked to be a registry host (exit 64 naming it otherwise).
pub fn registry_host() -> String {
    let registry = required(MATRIX_REGISTRY);
    if Reference::parse(&format!("{registry}/app:latest")).is_err() || registry.contains('/') {
        config_error(&format!("{MATRIX_REGISTRY}={registry:?} is not a registry host"));
    }
    registry
}

/// The app: `flag` (`--app`) when given, else `$FLY_APP_NAME`; a name Fly would refuse
/// stops the program (exit 64), naming where it came from.
pub fn app_name(flag: Option<&str>) -> String {
    let (app, source) = match flag {
        Some(app) => (app.to_owned(), "--app"),
        None => (required(FLY_APP_NAME), FLY_APP_NAME),
    };
    if !is_app_name(&app) {
        config_error(&format!(
            "{source} {app:?} is not a Fly app name (lower-case letters, digits and inner dashes)"
        ));
    }
    app
}

/// Fly app names: `[a-z0-9]` and dashes, not at either end; also a valid repository name.
fn is_app_name(app: &str) -> bool {
    !app.is_empty()
        && app.len() <= 63
        && !app.starts_with('-')
        && !app.ends_with('-')
        && app.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A malformed argument or setting: says what, and exits 64.
pub fn config_error(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(EXIT_CONFIG);
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
        let table: &[(&str, Option<&str>)] = &[
            ("daemon", Some("daemon-image")),
            (".#daemon-image", Some("daemon-image")),
            ("browser-image", Some("browser-image")),
            ("", None),
            (".#", None),
            ("-image", None),
            (".#-image", None),
            ("daemon image", None),
            ("daemon;rm", None),
        ];
        for (image, expected) in table {
            assert_eq!(flake_attribute(image).as_deref(), *expected, "for {image:?}");
        }
    }

    #[test]
    fn app_names() {
        for good in ["matrix-users", "app1", "a"] {
            assert!(is_app_name(good), "{good:?}");
        }
        for bad in ["", "App", "Bad App/../x", "-app", "app-", "a/b", "a_b", "a.b"] {
            assert!(!is_app_name(bad), "{bad:?}");
        }
    }
}
