# The check that an image, and each of its named layer groups, is byte-identical when
# built twice.
#
# `nix build --rebuild .#daemon-image` does the same against the store; this check makes
# it part of `nix flake check`: each second build differs only in an attribute the
# assembler ignores, so Nix builds it on its own, and the two outputs are compared byte
# for byte. `index.json` is left out: with no `tag`, its ref name is the output's own hash,
# which differs by construction; the manifest it points to is a blob and is compared.
#
# nixpkgs functions used here, checked against their source: `lib.overrideDerivation`
# (lib/customisation.nix: rebuilds any derivation from its `drvAttrs`) and `runCommand`.
# The pinned revision (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here.
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
