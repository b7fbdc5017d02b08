# The flake's `packages` for one system: the workspace binaries, the pieces of the daemon
# image, and the four images. `default` is the daemon image.
{
  # nixpkgs for the system being built; no default.
  pkgs,
}: let
  inherit (pkgs) callPackage;

  workspaceBinary = callPackage ./workspace-binary.nix {};

  mkImage = import ./lib/mk-image.nix {assembler = binaries.matrix-image-assembler;};

  binaries = {
    matrix-router = workspaceBinary {pname = "matrix-router";};
    matrixd = workspaceBinary {pname = "matrixd";};
    fly-emulator = workspaceBinary {
      pname = "fly-emulator";
      crate = "machines";
    };
    matrix-image-assembler = workspaceBinary {
      pname = "matrix-image-assembler";
      crate = "image-assembler";
    };
    xtask = workspaceBinary {pname = "xtask";};
  };

  mcp-npm-servers = callPackage ./mcp-npm-servers.nix {} {};
  mcp-python-servers = callPackage ./mcp-python-servers.nix {} {};

  matrix-opt = callPackage ./matrix-opt.nix {} {
    npmServers = mcp-npm-servers;
    pythonServers = mcp-python-servers;
  };

  daemon-entrypoint = callPackage ./daemon-entrypoint.nix {} {};

  images = {
    daemon-image = callPackage ./daemon-image.nix {inherit mkImage;} {
      inherit (binaries) matrixd;
      entrypoint = daemon-entrypoint;
      opt = matrix-opt;
    };
    browser-image = callPackage ./browser-image.nix {inherit mkImage;} {};
    chronos-image = callPackage ./chronos-image.nix {inherit mkImage;} {};
    deus-image = callPackage ./deus-image.nix {inherit mkImage;} {};
  };
in
  binaries
  // images
  // {
    inherit mcp-npm-servers mcp-python-servers matrix-opt daemon-entrypoint;
    default = images.daemon-image;
  }
