# mkImage: a byte-identical OCI image layout built from Nix store paths, with no nixpkgs.
#
# What it does, in order:
#  1. Every group in `layers` becomes its own derivation that writes one layer: the
#     closure of the group's contents minus the closures of the groups before it. The
#     same group in two images (same contents, same groups before it) is one derivation,
#     built once and reused from the store.
#  2. The image derivation takes the closure of `contents` (plus the store paths that
#     `extraFiles` name), leaves out what the groups hold, and splits the rest into the
#     layers left under `maxLayers` (the most shared paths lowest, the application on top;
#     see the image-assembler crate documentation).
#  3. `extraFiles` make the top layer; the result is an OCI layout directory (`oci-layout`,
#     `index.json`, `blobs/sha256/`) that `skopeo copy oci:<out>:<tag> ...` reads.
#
# The result also carries `layers` (the group derivations) and `dockerArchive` (the same
# image as a `docker load` tarball). Store paths outside the named groups are tarred inside
# the image derivation, so a rebuild re-tars all of them: put what rarely changes in a group.
#
# FIXME: layers are always gzip here; zstd is only reachable through the CLI
# (`matrix-image-assembler image --compression zstd`), as this signature has no argument for it.
{
  # A package with the assembler's CLI at bin/matrix-image-assembler. Required.
  assembler,
}: {
  # The image's name: the derivation name, and the repository in `dockerArchive`. Required.
  name,
  # The tag in index.json (`org.opencontainers.image.ref.name`). Default: null, meaning the
  # hash part of the output path, which changes whenever the image does.
  tag ? null,
  # Store paths (derivations, store path strings or local paths) whose closure goes into
  # the image. Required.
  contents,
  # The OCI image config: Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, Volumes,
  # Labels, as the OCI image spec spells them. Default: { }.
  config ? {},
  # Named layer groups, bottom first, each { name = "base"; contents = [ ... ]; }: put what
  # is shared between images or rarely changes here. Default: [ ].
  layers ? [],
  # Files at the image root outside the store, in the top layer. Each is { path = "/etc/passwd"; }
  # plus exactly one of `text = "..."`, `source = "${pkg}/file"` (copied), `symlink = "target"`
  # or `directory = true`; optional `mode` (octal string; default "0644", "0755" for an
  # executable source or a directory), `uid` and `gid` (default 0). Missing parent
  # directories are added as 0755 root. Default: [ ].
  extraFiles ? [],
  # The most layers the image may have, groups and the extra-files layer included; no store
  # path is ever dropped to fit. Default: 100 (Docker refuses more than about 125).
  maxLayers ? 100,
}: let
  inherit
    (builtins)
    all
    concatMap
    elemAt
    filter
    genList
    hasContext
    head
    isAttrs
    isInt
    isList
    isString
    length
    map
    match
    stringLength
    substring
    throw
    typeOf
    ;

  fail = message: throw "mkImage ${toString name}: ${message}";
  system = assembler.system or builtins.currentSystem;
  builder = "${assembler}/bin/matrix-image-assembler";

  # The store path a string points into, keeping its context (substring keeps it).
  storePathOf = s: let
    found = match "(${builtins.storeDir}/[^/]+).*" s;
  in
    if found == null
    then fail "${s} is not in the Nix store"
    else substring 0 (stringLength (head found)) s;

  toStorePaths = paths: map (p: storePathOf "${p}") paths;

  isGroup = g: isAttrs g && isString (g.name or null) && isList (g.contents or null);
  isExtraFile = f: isAttrs f && isString (f.path or null) && substring 0 1 f.path == "/";
  extraLayers =
    if extraFiles == []
    then 0
    else 1;

  # The store paths the extra files refer to, so that their closures are in the image.
  extraRoots = let
    isStoreString = v: isString v && hasContext v;
    references = f: filter isStoreString [(f.source or null) (f.symlink or null)];
  in
    concatMap (f: map storePathOf (references f)) extraFiles;

  groupDrv = index: group:
    derivation {
      name = "image-layer-${group.name}";
      inherit system builder;
      args = ["layer"];
      __structuredAttrs = true;
      layerName = group.name;
      exportReferencesGraph = {
        closure = toStorePaths group.contents;
        exclude = concatMap (g: toStorePaths g.contents) (genList (elemAt layers) index);
      };
    };

  groups = genList (i: groupDrv i (elemAt layers i)) (length layers);

  image = derivation {
    inherit name system builder;
    args = ["image"];
    __structuredAttrs = true;
    inherit tag maxLayers extraFiles;
    imageConfig = config;
    groupLayers = map (g: "${g}") groups;
    exportReferencesGraph = {
      closure = toStorePaths contents ++ extraRoots;
      exclude = concatMap (g: toStorePaths g.contents) layers;
    };
  };

  dockerArchive = derivation {
    name = "${name}.tar";
    inherit system builder;
    args = [
      "docker-archive"
      "--layout"
      "${image}"
      "--repo-tag"
      "${name}:${
        if tag == null
        then "latest"
        else tag
      }"
      "--out"
      (builtins.placeholder "out")
    ];
  };

  checked =
    if !isString name
    then throw "mkImage: `name` must be a string, not ${typeOf name}"
    else if tag != null && !isString tag
    then fail "`tag` must be a string or null, not ${typeOf tag}"
    else if !isList contents
    then fail "`contents` must be a list of store paths, not ${typeOf contents}"
    else if !isAttrs config
    then fail "`config` must be an attribute set (the OCI image config), not ${typeOf config}"
    else if !(isList layers && all isGroup layers)
    then fail "`layers` must be a list of { name = \"...\"; contents = [ ... ]; }"
    else if !(isList extraFiles && all isExtraFile extraFiles)
    then fail "`extraFiles` must be a list of attribute sets with an absolute `path`"
    else if !(isInt maxLayers) || maxLayers < 1
    then fail "`maxLayers` must be a positive integer"
    else if length layers + extraLayers > maxLayers
    then
      fail "${toString (length layers)} named layers${
        if extraLayers == 1
        then " and the extra-files layer"
        else ""
      } do not fit in maxLayers = ${toString maxLayers}"
    else image;
in
  checked
  // {
    layers = groups;
    inherit dockerArchive;
  }
