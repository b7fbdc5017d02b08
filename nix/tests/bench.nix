# The benchmark image of crates/image-assembler/benches/assemble.rs: about 1 GiB of base
# data (half random, half base64 text, plus 2000 small files) under a small top package.
{
  # A directory holding bin/matrix-image-assembler, imported into the store. Required.
  assemblerDir,
  # Changes the top package's contents, to time a rebuild after a change to it alone. Default: 0.
  topRevision ? 0,
  # Whether the base data is a named layer group (its own derivation). Default: true.
  grouped ? true,
}: let
  system = builtins.currentSystem;
  assembler = builtins.path {
    path = /. + assemblerDir;
    name = "matrix-image-assembler";
  };
  mkImage = import ../lib/mk-image.nix {inherit assembler;};

  shell = name: script:
    derivation {
      inherit name system;
      builder = "/bin/sh";
      args = [
        "-ec"
        script
      ];
    };

  base = shell "bench-base" ''
    /bin/mkdir -p $out/bin $out/share $out/small
    i=0
    while [ $i -lt 128 ]; do
      /usr/bin/head -c 4194304 /dev/urandom > $out/bin/random-$i
      /usr/bin/head -c 3145728 /dev/urandom | /usr/bin/base64 > $out/share/text-$i
      i=$((i + 1))
    done
    i=0
    while [ $i -lt 2000 ]; do
      echo "small file $i" > $out/small/file-$i
      i=$((i + 1))
    done
  '';

  top = shell "bench-top" ''
    /bin/mkdir -p $out/bin
    echo "revision ${toString topRevision} on ${base}" > $out/bin/app
  '';
in {
  inherit base;
  image = mkImage {
    name = "bench-image";
    tag = "bench";
    contents = [top];
    layers =
      if grouped
      then [
        {
          name = "base";
          contents = [base];
        }
      ]
      else [];
  };
}
