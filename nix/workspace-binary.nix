# One binary of the Rust workspace, built by nixpkgs' Rust builder from Cargo.lock.
#
# nixpkgs functions used here, checked against their source: `rustPlatform.buildRustPackage`
# (pkgs/build-support/rust/build-rust-package/default.nix) and `lib.fileset`. The pinned
# revision (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here; the newest
# copy that could be read takes the arguments used below (pname, version, src, cargoLock,
# cargoBuildFlags, nativeBuildInputs, doCheck, meta) with the same meaning.
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
