# The npm MCP servers of the daemon image, installed from package-lock.json.
#
# The pinned nixpkgs (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here;
# each call was checked against the source at the revision named beside it.
# - `importNpmLock { npmRoot ? null, package ?, packageLock ?, pname ?, version ? }`:
#   pkgs/build-support/node/import-npm-lock/default.nix at
#   3022f7ac2e8e18805cca52dc68599a3c5ad8afe9 (each `resolved` URL becomes `fetchurl` by
#   the lock's `integrity`);
# - `importNpmLock.npmConfigHook`: hooks/default.nix at a7e6638a40891e62d71064708fa596cb17eb868d
#   and hooks/npm-config-hook.sh at 9c717eacce68ed71efa843789f6ed363acd5a770 (needs
#   `npmDeps`, runs after the configure phase, `npm install --ignore-scripts` offline,
#   `npm rebuild`, then patches shebangs).
#
# Steps:
#   1. `importNpmLock` turns every `resolved` URL of the lock into a fixed-output `fetchurl`
#      by the lock's own integrity hash: nothing else is downloaded;
#   2. the config hook runs `npm install --ignore-scripts` offline against those store
#      paths, then `npm rebuild`, and patches the shebangs to this Node.js;
#   3. the result is `node_modules` with its `.bin` links, as `npm ci` would leave it.
{
  lib,
  stdenv,
  nodejs,
  importNpmLock,
}: {
  # The directory holding package.json and package-lock.json; default: deploy/daemon/mcp.
  lockDir ? ../deploy/daemon/mcp,
}: let
  package = lib.importJSON (lockDir + "/package.json");
in
  stdenv.mkDerivation {
    pname = "matrix-mcp-npm-servers";
    inherit (package) version;

    src = lib.fileset.toSource {
      root = lockDir;
      fileset = lib.fileset.unions [
        (lockDir + "/package.json")
        (lockDir + "/package-lock.json")
      ];
    };

    npmDeps = importNpmLock {npmRoot = lockDir;};

    nativeBuildInputs = [nodejs importNpmLock.npmConfigHook];

    dontBuild = true;

    installPhase = ''
      runHook preInstall
      mkdir -p $out
      cp -R node_modules package.json package-lock.json $out/
      runHook postInstall
    '';

    meta.description = "The npm MCP servers the Matrix daemon image carries";
  }
