# The wheels to install for a uv.lock, one per locked package, for one system.
#
# Uses builtins only, so it is evaluated for real by `cargo xtask test` on machines
# without nixpkgs. Returns a list of { pname, version, file, url, sha256 } where sha256
# is the lock's own hex digest: the caller fetches each wheel with `fetchurl` by it.
#
# Steps:
#   1. keep the packages that come from a registry (the lock's own project is virtual);
#   2. read each wheel's tags from its file name (name-version[-build]-py-abi-platform);
#   3. prefer a pure wheel (py3-none-any), then one built for this CPython, then abi3;
#   4. stop with a message naming the package when no locked wheel fits.
{
  # The Nix system string, e.g. "x86_64-linux"; no default: the caller names its system.
  system,
  # The CPython tag of the interpreter the wheels are installed for; default "cp313"
  # (nixpkgs' python3 at the pinned revision).
  pythonTag ? "cp313",
}: lock: let
  inherit
    (builtins)
    any
    compareVersions
    elemAt
    filter
    head
    length
    match
    split
    stringLength
    substring
    throw
    ;

  parts = separator: text: filter builtins.isString (split separator text);
  last = list: elemAt list (length list - 1);

  arch = head (parts "-" system);
  pythonMinor = head (match "cp3([0-9]+)" pythonTag);

  fileOf = url: last (parts "/" url);

  tagsOf = file: let
    fields = parts "-" (substring 0 (stringLength file - 4) file);
    count = length fields;
  in {
    python = parts "[.]" (elemAt fields (count - 3));
    abi = elemAt fields (count - 2);
    platforms = parts "[.]" (elemAt fields (count - 1));
  };

  isManylinuxForArch = platform: match "manylinux.*_${arch}" platform != null;

  isPure = tags:
    tags.abi
    == "none"
    && tags.platforms == ["any"]
    && any (tag: tag == "py3") tags.python;

  isForThisPython = tags:
    tags.abi
    == pythonTag
    && any (tag: tag == pythonTag) tags.python
    && any isManylinuxForArch tags.platforms;

  isAbi3 = tags: let
    minors = filter (minor: minor != null) (map (match "cp3([0-9]+)") tags.python);
  in
    tags.abi
    == "abi3"
    && minors != []
    && any (minor: compareVersions (head minor) pythonMinor <= 0) minors
    && any isManylinuxForArch tags.platforms;

  pick = package: let
    wheels = map (wheel: wheel // {file = fileOf wheel.url;}) (package.wheels or []);
    fitting = predicate: filter (wheel: predicate (tagsOf wheel.file)) wheels;
    candidates = fitting isPure ++ fitting isForThisPython ++ fitting isAbi3;
    chosen = head candidates;
  in
    if candidates == []
    then throw "uv.lock: no wheel of ${package.name} ${package.version} for ${system}, ${pythonTag}"
    else {
      pname = package.name;
      inherit (package) version;
      inherit (chosen) file url;
      sha256 = substring 7 64 chosen.hash;
    };

  fromRegistry = filter (package: package.source ? registry) lock.package;
in
  map pick fromRegistry
