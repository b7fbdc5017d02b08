# The control plane's image (deus: schema migrations, fleet inventory, configs).
#
# FIXME: the deus binary and deploy/deus (its migrations, configs and env template) do
# not exist yet; this image holds the base system and the PostgreSQL client it will use,
# and gets the binary, migrations and configs when they land.
#
# nixpkgs functions used here, checked against their source: none beyond the packages.
# The pinned revision (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here.
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
