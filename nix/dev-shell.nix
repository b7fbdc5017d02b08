# `nix develop`: everything `cargo xtask test` and `cargo xtask dev` run, from nixpkgs.
#
# The pinned nixpkgs (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here;
# each call was checked against the source at the revision named beside it.
# - `mkShell { packages, ... }`: pkgs/build-support/mkshell/default.nix at
#   07c91341fd6e5f2ca8d0a6d62e6d0e1ecc94283d (extra attributes become environment variables);
# - `writeShellScriptBin name text`: pkgs/build-support/trivial-builders.
{
  mkShell,
  writeShellScriptBin,
  rustPlatform,
  cargo,
  rustc,
  clippy,
  rustfmt,
  rust-analyzer,
  cargo-nextest,
  nodejs,
  python3,
  uv,
  postgresql,
  minio,
  skopeo,
  umoci,
  docker-distribution,
  apacheHttpd,
  flyctl,
  git,
  alejandra,
}: let
  # The tests look for the registry under Debian's name for it.
  docker-registry = writeShellScriptBin "docker-registry" ''
    exec ${docker-distribution}/bin/registry "$@"
  '';
in
  mkShell {
    packages = [
      cargo
      rustc
      clippy
      rustfmt
      rust-analyzer
      cargo-nextest
      nodejs
      python3
      uv
      postgresql
      minio
      skopeo
      umoci
      docker-distribution
      docker-registry
      apacheHttpd
      flyctl
      git
      alejandra
    ];

    # rust-analyzer finds the standard library's sources here (`rustPlatform.rustLibSrc`,
    # as nixpkgs' own Rust shells set it).
    RUST_SRC_PATH = "${rustPlatform.rustLibSrc}";
  }
