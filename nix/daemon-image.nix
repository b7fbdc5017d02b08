# The per-user daemon's image: matrixd and its entrypoint, the runtimes the MCP servers
# need, the servers themselves, the skill corpus and the agent manifests. Nothing is
# installed when the container starts.
#
# No nixpkgs function is called here beyond `lib.makeBinPath`; only packages are used. The
# image itself is made by this repository's `lib/mk-image.nix`, built for real by the tests.
#
# Layers, bottom up: the base system, the language runtimes, the MCP servers (rarely
# change, reused from the store and the registry), then matrixd and the entrypoint on top.
{
  lib,
  mkImage,
  bash,
  coreutils,
  cacert,
  tzdata,
  nodejs,
  python3,
  uv,
  git,
}: {
  # The daemon (the `matrixd` package); no default.
  matrixd,
  # deploy/daemon/entrypoint.sh as a package (`daemon-entrypoint`); no default.
  entrypoint,
  # /opt/matrix (the `matrix-opt` package); no default.
  opt,
  # The image tag; default null (mkImage's own default).
  tag ? null,
}: let
  base = [bash coreutils cacert tzdata];
  runtimes = [nodejs python3 uv git];
in
  mkImage {
    name = "matrix-daemon";
    inherit tag;

    contents = base ++ runtimes ++ [opt matrixd entrypoint];

    layers = [
      {
        name = "base";
        contents = base;
      }
      {
        name = "runtimes";
        contents = runtimes;
      }
      {
        name = "mcp-servers";
        contents = [opt];
      }
    ];

    config = {
      Entrypoint = ["${entrypoint}/bin/entrypoint.sh"];
      User = "1000:1000";
      WorkingDir = "/data";
      Env = [
        "PATH=${lib.makeBinPath ([matrixd] ++ runtimes ++ [bash coreutils])}"
        "HOME=/data"
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
        "TZDIR=${tzdata}/share/zoneinfo"
      ];
      ExposedPorts."8080/tcp" = {};
      Volumes."/data" = {};
    };

    extraFiles =
      import ./lib/image-root.nix {inherit bash coreutils cacert;}
      ++ [
        {
          path = "/opt/matrix";
          symlink = "${opt}";
        }
      ];
  }
