# The flake's `checks` for one system: what `nix flake check` builds.
{
  # nixpkgs for the system being checked; no default.
  pkgs,
  # This flake's packages for the same system; no default.
  packages,
}: let
  inherit (pkgs) callPackage lib;

  imageReproducible = callPackage ./checks/image-reproducible.nix {};

  imageNames = ["daemon-image" "browser-image" "chronos-image" "deus-image"];
in
  {
    workspace-tests = callPackage ./checks/workspace-tests.nix {} {};
    nix-format = callPackage ./checks/nix-format.nix {} {};
  }
  // lib.genAttrs (map (name: "${name}-reproducible") imageNames) (
    check: imageReproducible {image = packages.${lib.removeSuffix "-reproducible" check};}
  )
