# One binary of the Rust workspace, built by nixpkgs' Rust builder from Cargo.lock.
#
# The pinned nixpkgs (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here;
# each call was checked against the source at the revision named beside it.
# - `rustPlatform.buildRustPackage`: pkgs/build-support/rust/build-rust-package/default.nix,
#   read at 1666f82b5d4eaeebab97fad801823d56febe5f3f and in a newer stored copy (the one
#   with `cargoDeps` and `useFetchCargoVendor`): `cargoLock` goes to `importCargoLock`,
#   other attributes (`cargoBuildFlags`, `doCheck`, `meta`, ...) pass to `mkDerivation`;
# - `lib.fileset.toSource { root, fileset }` and `lib.fileset.unions`: lib/fileset.
#
# Steps:
#   1. take only what cargo reads (manifests, the lock, crate sources) so that editing a
#      document does not rebuild the binaries;
#   2. vendor the crates from Cargo.lock (`cargoLock.lockFile`: no vendor hash to keep);
#   3. build the one package and binary; the tests run in the `workspace-tests` check.
{
  lib,
  rustPlatform,
  cmake,
  perl,
}: {
  # The binary's name, as `[[bin]]` or the package name gives it; no default.
  pname,
  # The workspace package that holds it (`cargo build -p <crate>`); default: pname.
  crate ? pname,
  # The repository root; default: this flake's source.
  root ? ../.,
  # Short description for `meta`; default: names the crate.
  description ? "${pname} from the Matrix workspace (crate ${crate})",
}: let
  workspace = lib.importTOML (root + "/Cargo.toml");

  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/Cargo.toml")
      (root + "/Cargo.lock")
      (root + "/crates")
      (root + "/xtask")
    ];
  };
in
  rustPlatform.buildRustPackage {
    inherit pname src;
    inherit (workspace.workspace.package) version;

    cargoLock.lockFile = root + "/Cargo.lock";

    cargoBuildFlags = ["--package" crate "--bin" pname];

    # aws-lc-sys (a rustls provider compiled into the workspace) builds C with cmake and
    # perl; the cmake hook's own configure phase does not apply to a cargo build.
    nativeBuildInputs = [cmake perl];
    dontUseCmakeConfigure = true;

    # The workspace tests need real services; the `workspace-tests` check provides them.
    doCheck = false;

    meta = {
      inherit description;
      license = lib.licenses.asl20;
      mainProgram = pname;
    };
  }
