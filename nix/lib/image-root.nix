# The files an image needs outside the store, as `mkImage`'s `extraFiles` entries: the users,
# /tmp, a home directory owned by the user, and the usual links into the store.
#
# Uses builtins only (no nixpkgs), so it evaluates on any machine with Nix.
{
  # The non-root user the image runs as; default "matrix".
  user ? "matrix",
  # Its uid and gid; default 1000.
  uid ? 1000,
  # Its home, created owned by it; default "/data" (the user's volume on Fly).
  home ? "/data",
  # A package with bin/bash, linked as /bin/sh and /bin/bash; default null (no links).
  bash ? null,
  # A package with bin/env, linked as /usr/bin/env; default null (no link).
  coreutils ? null,
  # The CA bundle package (nixpkgs' cacert), linked at the usual paths; default null.
  cacert ? null,
}:
if uid == 0
then throw "image-root: the image user must not be root (uid 0)"
else
  [
    {
      path = "/etc/passwd";
      text = ''
        root:x:0:0:root:/root:/bin/sh
        ${user}:x:${toString uid}:${toString uid}:${user}:${home}:/bin/sh
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false
      '';
    }
    {
      path = "/etc/group";
      text = ''
        root:x:0:
        ${user}:x:${toString uid}:
        nogroup:x:65534:
      '';
    }
    {
      path = "/etc/nsswitch.conf";
      text = "hosts: files dns\n";
    }
    {
      path = "/tmp";
      directory = true;
      mode = "1777";
    }
    {
      path = home;
      directory = true;
      mode = "0755";
      inherit uid;
      gid = uid;
    }
  ]
  ++ (
    if bash == null
    then []
    else [
      {
        path = "/bin/sh";
        symlink = "${bash}/bin/bash";
      }
      {
        path = "/bin/bash";
        symlink = "${bash}/bin/bash";
      }
    ]
  )
  ++ (
    if coreutils == null
    then []
    else [
      {
        path = "/usr/bin/env";
        symlink = "${coreutils}/bin/env";
      }
    ]
  )
  ++ (
    if cacert == null
    then []
    else [
      {
        path = "/etc/ssl/certs/ca-certificates.crt";
        symlink = "${cacert}/etc/ssl/certs/ca-bundle.crt";
      }
      {
        path = "/etc/ssl/certs/ca-bundle.crt";
        symlink = "${cacert}/etc/ssl/certs/ca-bundle.crt";
      }
    ]
  )
