# The check that every .nix file is formatted by alejandra (what `nix fmt` runs).
#
# nixpkgs functions used here, checked against their source: `runCommand` and
# `lib.fileset.fileFilter` (`file.hasExt`). The pinned revision
# (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here.
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
