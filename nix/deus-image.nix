# The control plane's image (deus: schema migrations, fleet inventory, configs).
#
# FIXME: the deus binary and deploy/deus (its migrations, configs and env template) do
# not exist yet; this image holds the base system and the PostgreSQL client it will use,
# and gets the binary, migrations and configs when they land.
#
# No nixpkgs function is called here beyond `lib.makeBinPath`; only packages are used.
{
  lib,
  mkImage,
  bash,
  coreutils,
  cacert,
  postgresql,
}: {
  # The image tag; default null (mkImage's own default).
  tag ? null,
}: let
  base = [bash coreutils cacert];
  client = [postgresql];
in
  mkImage {
    name = "matrix-deus";
    inherit tag;

    contents = base ++ client;

    layers = [
      {
        name = "base";
        contents = base;
      }
    ];

    config = {
      User = "1000:1000";
      WorkingDir = "/data";
      Env = [
        "PATH=${lib.makeBinPath (client ++ [bash coreutils])}"
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
      ];
    };

    extraFiles = import ./lib/image-root.nix {
      user = "deus";
      inherit bash coreutils cacert;
    };
  }
