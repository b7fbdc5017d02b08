# The test image of mkImage, built from store paths made without nixpkgs: every fixture is
# a `derivation` run by the host's /bin/sh with absolute tool paths (a builder's PATH is
# empty). crates/image-assembler/tests/nix_image.rs builds and checks it.
{
  # A directory holding bin/matrix-image-assembler, imported into the store. Required.
  assemblerDir,
  # Host files that give the image a shell without nixpkgs: a dynamically linked dash, its
  # ELF interpreter and libc. Required.
  dash,
  ldso,
  libc,
  # The index of one of the 300 small packages to build with different contents, to show
  # that only its layer changes. Default: null (none).
  changed ? null,
}: let
  system = builtins.currentSystem;
  assembler = builtins.path {
    path = /. + assemblerDir;
    name = "matrix-image-assembler";
  };
  mkImage = import ../lib/mk-image.nix {inherit assembler;};

  # A derivation built by `script` with /bin/sh; `$out` is the output.
  shell = name: script:
    derivation {
      inherit name system;
      builder = "/bin/sh";
      args = [
        "-ec"
        script
      ];
    };

  runtime = shell "shell-runtime" ''
    /bin/mkdir -p $out/bin $out/lib
    /bin/cp ${dash} $out/bin/dash
    /bin/cp ${ldso} $out/lib/ld.so
    /bin/cp ${libc} $out/lib/libc.so.6
  '';

  shared = shell "shared-dep" ''
    /bin/mkdir -p $out/lib
    echo "shared by three hundred packages" > $out/lib/shared.txt
  '';

  pad = i:
    if i < 10
    then "00${toString i}"
    else if i < 100
    then "0${toString i}"
    else toString i;
  packages =
    builtins.genList (
      i:
        shell "pkg-${pad i}" ''
          /bin/mkdir -p $out/share
          echo "package ${toString i} uses ${shared}/lib/shared.txt" > $out/share/info
          ${
            if i == changed
            then "echo changed >> $out/share/info"
            else ""
          }
        ''
    )
    300;

  fixtures = shell "fixtures" ''
    d=$out/data
    /bin/mkdir -p $d/empty-dir $d/sub
    echo "a file with a 150-byte name" > "$d/$(printf '%0150d' 0)"
    echo "a file whose name is not UTF-8" > "$d/$(printf 'caf\351')"
    echo "the same bytes twice" > $d/dup-a
    echo "the same bytes twice" > $d/dup-b
    printf '#!/bin/sh\necho executable\n' > $d/run.sh
    /bin/chmod 0755 $d/run.sh
    echo "read only" > $d/readonly.txt
    /bin/chmod 0400 $d/readonly.txt
    echo "-----BEGIN CERTIFICATE-----" > $d/ca.pem
    /bin/ln -s ${shared}/lib/shared.txt $d/link-to-shared
    /bin/ln -s ../readonly.txt $d/sub/relative-link
  '';

  app = shell "app" ''
    /bin/mkdir -p $out/bin
    echo 'read line < ${fixtures}/data/readonly.txt' > $out/bin/app.sh
    echo 'echo "hello from the image: $line"' >> $out/bin/app.sh
    /bin/chmod 0755 $out/bin/app.sh
  '';

  sparse = shell "sparse" ''
    /bin/mkdir -p $out
    /usr/bin/truncate -s 8589934593 $out/huge
    echo "end" > $out/after
  '';

  extraFiles = [
    {
      path = "/etc/passwd";
      text = "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    }
    {
      path = "/etc/group";
      text = "root:x:0:\napp:x:1000:\n";
    }
    {
      path = "/tmp";
      directory = true;
      mode = "1777";
    }
    {
      path = "/home/app";
      directory = true;
      mode = "0700";
      uid = 1000;
      gid = 1000;
    }
    {
      path = "/etc/ssl/certs/ca-bundle.crt";
      symlink = "${fixtures}/data/ca.pem";
    }
    {
      path = "/entrypoint";
      source = "${app}/bin/app.sh";
    }
  ];

  config = {
    Entrypoint = [
      "${runtime}/lib/ld.so"
      "--library-path"
      "${runtime}/lib"
      "${runtime}/bin/dash"
      "${app}/bin/app.sh"
    ];
    Env = ["HOME=/root"];
    WorkingDir = "/";
    User = "0:0";
    ExposedPorts = {
      "8080/tcp" = {};
    };
    Labels = {
      "org.opencontainers.image.title" = "mkImage fixture";
    };
  };
in {
  image = mkImage {
    name = "fixture-image";
    tag = "test";
    contents = [app] ++ packages;
    layers = [
      {
        name = "runtime";
        contents = [runtime shared];
      }
    ];
    inherit config extraFiles;
  };

  # A sparse file over 8 GiB; built only when asked for.
  sparseImage = mkImage {
    name = "sparse-image";
    tag = "test";
    contents = [sparse];
  };

  inherit
    packages
    fixtures
    shared
    sparse
    ;
}
