# `nix develop`: everything `cargo xtask test` and `cargo xtask dev` run, from nixpkgs.
#
# nixpkgs functions used here, checked against their source: `mkShell` (pkgs/build-support/
# mkshell: `packages`, `inputsFrom`, `shellHook`) and `writeShellScriptBin`. The pinned
# revision (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here.
{
  mkShell,
  writeShellScriptBin,
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

    # rust-analyzer finds the standard library's sources here.
    RUST_SRC_PATH = "${rustc.passthru.unwrapped or rustc}/lib/rustlib/src/rust/library";
  }
