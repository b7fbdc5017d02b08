# The check that an image is byte-identical when built twice.
#
# `nix build --rebuild .#daemon-image` does the same against the store; this check makes
# it part of `nix flake check`: the second build differs only in an attribute the
# builder ignores, so Nix builds it separately, and the two outputs are compared byte
# for byte.
#
# nixpkgs functions used here, checked against their source: `lib.overrideDerivation`
# (lib/customisation.nix: works on any derivation through its `drvAttrs`) and `runCommand`.
# The pinned revision (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here.
{
  lib,
  runCommand,
  diffutils,
}: {
  # The image derivation (what `mkImage` returns); no default.
  image,
}: let
  again = lib.overrideDerivation image (_: {reproducibilityProbe = "second build";});
in
  runCommand "${image.name}-reproducible" {nativeBuildInputs = [diffutils];} ''
    diff -r --brief ${image} ${again}
    echo "${image.name}: two builds are byte-identical" > $out
  ''
