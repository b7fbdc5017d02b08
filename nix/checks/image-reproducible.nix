# The check that an image, and each of its named layer groups, is byte-identical when
# built twice.
#
# `nix build --rebuild .#daemon-image` does the same against the store; this check makes
# it part of `nix flake check`: each second build differs only in an attribute the
# assembler ignores, so Nix builds it on its own, and the two outputs are compared byte
# for byte. `index.json` is left out: with no `tag`, its ref name is the output's own hash,
# which differs by construction; the manifest it points to is a blob and is compared.
#
# The pinned nixpkgs (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here;
# each call was checked against the source at the revision named beside it.
# - `lib.overrideDerivation drv f`: lib/customisation.nix at
#   00976b194fe32d3e425ff3b457eeb6e4ec7ba12c (`derivation (drv.drvAttrs // f drv)`, so it
#   works on mkImage's plain derivations);
# - `runCommand name env script`: pkgs/build-support/trivial-builders.
{
  lib,
  runCommand,
  diffutils,
}: {
  # The image (what `mkImage` returns: the image derivation with its group derivations
  # in `layers`); no default.
  image,
}: let
  again = drv: lib.overrideDerivation drv (_: {reproducibilityProbe = "second build";});

  compare = drv: ''
    diff -r --brief --exclude=index.json ${drv} ${again drv}
  '';
in
  runCommand "${image.name}-reproducible" {nativeBuildInputs = [diffutils];} ''
    ${lib.concatMapStrings compare ([image] ++ image.layers or [])}
    echo "${image.name}: every layer group and the image are byte-identical when rebuilt" > $out
  ''
