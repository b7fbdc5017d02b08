# deploy/daemon/entrypoint.sh as a store path, its shebang pointing at the image's bash.
#
# nixpkgs functions used here, checked against their source: `runCommand` and the
# `patchShebangs` setup hook (`--host` uses the build inputs' bin directories). The pinned
# revision (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here.
{
  runCommand,
  bash,
}: {
  # The script; default: deploy/daemon/entrypoint.sh of this repository.
  script ? ../deploy/daemon/entrypoint.sh,
}:
runCommand "matrix-daemon-entrypoint" {buildInputs = [bash];} ''
  install -Dm755 ${script} $out/bin/entrypoint.sh
  patchShebangs --host $out/bin
''
