# The shared browser runtime's image: Chromium and fonts for Playwright/Puppeteer clients.
#
# FIXME: the browser gateway (one fresh browser per session, optional bearer auth) does not
# exist yet, so this image has no entrypoint; it carries what the gateway will need.
#
# No nixpkgs function is called here beyond `lib.makeBinPath`; only packages are used.
{
  lib,
  mkImage,
  bash,
  coreutils,
  cacert,
  chromium,
  nodejs,
  fontconfig,
  dejavu_fonts,
  noto-fonts,
}: {
  # The image tag; default null (mkImage's own default).
  tag ? null,
}: let
  base = [bash coreutils cacert];
  browser = [chromium fontconfig dejavu_fonts noto-fonts nodejs];
in
  mkImage {
    name = "matrix-browser";
    inherit tag;

    contents = base ++ browser;

    layers = [
      {
        name = "base";
        contents = base;
      }
      {
        name = "browser";
        contents = browser;
      }
    ];

    config = {
      User = "1000:1000";
      WorkingDir = "/data";
      Env = [
        "PATH=${lib.makeBinPath (browser ++ base)}"
        "HOME=/data"
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
        "FONTCONFIG_FILE=${fontconfig.out}/etc/fonts/fonts.conf"
      ];
    };

    extraFiles = import ./lib/image-root.nix {
      user = "browser";
      inherit bash coreutils cacert;
    };
  }
