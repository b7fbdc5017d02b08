{
  description = "Matrix: the router, the per-user daemon, and their byte-identical images";

  # One input: every extra input is one more pin to trust. `nix flake update` refreshes it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = {
    self,
    nixpkgs,
  }: let
    inherit (nixpkgs) lib;

    systems = ["x86_64-linux" "aarch64-linux"];
    forEachSystem = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
  in {
    packages = forEachSystem (pkgs: import ./nix/packages.nix {inherit pkgs;});

    devShells = forEachSystem (pkgs: {default = pkgs.callPackage ./nix/dev-shell.nix {};});

    checks = forEachSystem (pkgs:
      import ./nix/checks.nix {
        inherit pkgs;
        packages = self.packages.${pkgs.stdenv.hostPlatform.system};
      });

    formatter = forEachSystem (pkgs: pkgs.alejandra);
  };
}
