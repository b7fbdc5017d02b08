# The Python MCP servers of the daemon image, installed offline from the wheels uv.lock pins.
#
# The pinned nixpkgs (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here;
# each call was checked against the source at the revision named beside it.
# - `fetchurl { url, sha256, name }`: pkgs/build-support/fetchurl/default.nix (a stored copy
#   with `hash`/`sha256`/`name`; `sha256` accepts the lock's hex digest);
# - `autoPatchelfHook` is only added as a setup hook, with no arguments.
#   FIXME: its source was not read here, and whether the wheels' compiled extensions load
#   under nixpkgs' Python was only tried outside Nix.
#
# Steps:
#   1. `lib/uv-lock-wheels.nix` picks one locked wheel per package for this system and
#      this Python (evaluated for real by `cargo xtask test`);
#   2. each wheel is a fixed-output `fetchurl` by the lock's own sha256;
#   3. `uv venv` makes a virtualenv on nixpkgs' Python in `$out`, and `uv pip install
#      --offline --no-index --no-deps` installs exactly those wheel files into it;
#   4. the install records that name the build directory or the time are removed;
#   5. the compiled extensions of manylinux wheels get their libraries from the store.
{
  lib,
  stdenv,
  fetchurl,
  python3,
  uv,
  autoPatchelfHook,
}: {
  # The directory holding pyproject.toml and uv.lock; default: deploy/daemon/mcp.
  lockDir ? ../deploy/daemon/mcp,
}: let
  project = lib.importTOML (lockDir + "/pyproject.toml");
  lock = lib.importTOML (lockDir + "/uv.lock");

  pythonTag = "cp${lib.replaceStrings ["."] [""] python3.pythonVersion}";

  wheels =
    import ./lib/uv-lock-wheels.nix {
      inherit (stdenv.hostPlatform) system;
      inherit pythonTag;
    }
    lock;

  fetchWheel = wheel: {
    inherit (wheel) file;
    path = fetchurl {
      inherit (wheel) url sha256;
      name = wheel.file;
    };
  };

  # uv reads a wheel's tags from its file name, so each one keeps its own name.
  linkWheels = lib.concatMapStrings (wheel: ''
    ln -s ${wheel.path} wheels/${wheel.file}
  '') (map fetchWheel wheels);
in
  stdenv.mkDerivation {
    pname = "matrix-mcp-python-servers";
    inherit (project.project) version;

    dontUnpack = true;

    nativeBuildInputs = [uv autoPatchelfHook];
    buildInputs = [(lib.getLib stdenv.cc.cc)];

    installPhase = ''
      runHook preInstall
      export HOME="$TMPDIR" UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never UV_OFFLINE=1
      mkdir wheels
      ${linkWheels}
      uv venv --python ${python3}/bin/python3 "$out"
      VIRTUAL_ENV="$out" uv pip install --offline --no-index --no-deps wheels/*.whl

      # uv records where each wheel came from (the build directory) and when it was
      # installed; neither may reach an image that must be the same wherever it is built.
      for info in "$out"/lib/python*/site-packages/*.dist-info; do
        rm -f "$info/direct_url.json" "$info/uv_cache.json"
        sed -i "$info/RECORD" \
          -e '/\.dist-info\/direct_url\.json,/d' \
          -e '/\.dist-info\/uv_cache\.json,/d'
      done
      rm -f "$out/.lock"
      runHook postInstall
    '';

    meta.description = "The Python MCP servers the Matrix daemon image carries";
  }
