# The check that every .nix file is formatted by alejandra (what `nix fmt` runs).
#
# The pinned nixpkgs (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here;
# each call was checked against the source at the revision named beside it.
# - `lib.fileset.fileFilter (file: file.hasExt "nix") root`: lib/fileset (stored copy);
# - `runCommand name env script`: pkgs/build-support/trivial-builders.
#
# FIXME: this runs nixpkgs' alejandra, `cargo xtask nix-check` the Rust library 3.1.0;
# a style change between the two versions fails one of them until both agree.
{
  lib,
  runCommand,
  alejandra,
}: {
  # The repository root; default: this flake's source.
  root ? ../../.,
}: let
  nixFiles = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.fileFilter (file: file.hasExt "nix") root;
  };
in
  runCommand "nix-format" {nativeBuildInputs = [alejandra];} ''
    alejandra --check ${nixFiles}
    touch $out
  ''
