# The check that runs the whole workspace's tests, with the real programs they start.
#
# The pinned nixpkgs (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here;
# each call was checked against the source at the revision named beside it.
# - `rustPlatform.buildRustPackage` as in ../workspace-binary.nix; `cargoTestFlags` and
#   `nativeCheckInputs` pass to `mkDerivation` and the cargo check hook.
#
# Tests that need a program the sandbox cannot run (Nix itself, a browser) skip loudly:
# `CI` is not set here. `cargo xtask test` runs them all on a machine with those programs.
{
  lib,
  rustPlatform,
  writeShellScriptBin,
  cmake,
  perl,
  git,
  nodejs,
  python3,
  uv,
  postgresql,
  minio,
  skopeo,
  umoci,
  docker-distribution,
  apacheHttpd,
}: {
  # The repository root; default: this flake's source.
  root ? ../../.,
}: let
  workspace = lib.importTOML (root + "/Cargo.toml");

  docker-registry = writeShellScriptBin "docker-registry" ''
    exec ${docker-distribution}/bin/registry "$@"
  '';
in
  rustPlatform.buildRustPackage {
    pname = "matrix-workspace-tests";
    inherit (workspace.workspace.package) version;

    src = lib.fileset.toSource {
      inherit root;
      fileset = lib.fileset.unions [
        (root + "/Cargo.toml")
        (root + "/Cargo.lock")
        (root + "/rustfmt.toml")
        (root + "/crates")
        (root + "/xtask")
        (root + "/deploy")
        (root + "/nix")
      ];
    };

    cargoLock.lockFile = root + "/Cargo.lock";

    cargoBuildFlags = ["--workspace"];
    cargoTestFlags = ["--workspace"];

    nativeBuildInputs = [cmake perl];
    dontUseCmakeConfigure = true;

    nativeCheckInputs = [
      git
      nodejs
      python3
      uv
      postgresql
      minio
      skopeo
      umoci
      docker-registry
      apacheHttpd
    ];

    doCheck = true;

    meta.description = "The Matrix workspace's tests";
  }
