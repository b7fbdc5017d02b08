# The scheduler's image (chronosd: scheduled wakes and deliveries).
#
# FIXME: chronosd does not exist yet; this image holds only the base system it will run
# on, and gets the binary and its entrypoint when the crate lands.
#
# No nixpkgs function is called here beyond `lib.makeBinPath`; only packages are used.
{
  lib,
  mkImage,
  bash,
  coreutils,
  cacert,
  tzdata,
}: {
  # The image tag; default null (mkImage's own default).
  tag ? null,
}: let
  base = [bash coreutils cacert tzdata];
in
  mkImage {
    name = "matrix-chronos";
    inherit tag;

    contents = base;

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
        "PATH=${lib.makeBinPath [bash coreutils]}"
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
        "TZDIR=${tzdata}/share/zoneinfo"
      ];
    };

    extraFiles = import ./lib/image-root.nix {
      user = "chronos";
      inherit bash coreutils cacert;
    };
  }
