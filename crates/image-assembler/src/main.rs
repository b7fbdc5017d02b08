//! `matrix-image-assembler`: the builder that `nix/lib/mk-image.nix` runs, and an export
//! of its OCI layouts to `docker-archive`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use image_assembler::nix_build::{self, BuildOptions};
use image_assembler::{docker_archive, Compression};

mod config;

/// Exit status for a missing or malformed environment variable (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "matrix-image-assembler",
    version,
    about = "Byte-identical OCI images from Nix closures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build one named layer group (run by Nix; reads the derivation's .attrs.json).
    Layer {
        #[arg(long, default_value = "gzip")]
        compression: Compression,
    },
    /// Build the image as an OCI layout (run by Nix; reads the derivation's .attrs.json).
    Image {
        #[arg(long, default_value = "gzip")]
        compression: Compression,
    },
    /// Export an OCI layout to a docker-archive tarball for `docker load`.
    DockerArchive {
        /// The OCI layout directory.
        #[arg(long)]
        layout: PathBuf,
        /// The tag in the layout's index.json; optional when it holds one image.
        #[arg(long)]
        tag: Option<String>,
        /// The name:tag that `docker load` gives the image.
        #[arg(long)]
        repo_tag: String,
        /// The tarball to write; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("matrix-image-assembler: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(cli.command, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("matrix-image-assembler: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, config: &config::Config) -> anyhow::Result<()> {
    let options = |compression| BuildOptions { epoch: config.epoch, compression };
    match command {
        Command::Layer { compression } => {
            let layer = nix_build::build_layer(&config.attrs_file, options(compression))
                .context("building a layer group")?;
            println!("layer {}: {} ({} bytes)", layer.name, layer.digest, layer.size);
        }
        Command::Image { compression } => {
            let image = nix_build::build_image(&config.attrs_file, options(compression))
                .context("building the image")?;
            println!("image manifest {} with {} layers", image.manifest.digest, image.layers.len());
        }
        Command::DockerArchive { layout, tag, repo_tag, out } => {
            docker_archive::export(&layout, tag.as_deref(), &repo_tag, &out, config.epoch)
                .with_context(|| format!("exporting {} to {}", layout.display(), out.display()))?;
        }
    }
    Ok(())
}
