# deploy/daemon/entrypoint.sh as a store path, its shebang pointing at the image's bash.
#
# The pinned nixpkgs (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here;
# each call was checked against the source at the revision named beside it.
# - `runCommand name env script` (pkgs/build-support/trivial-builders), and
#   `patchShebangs --host` taking the interpreter from `buildInputs`
#   (pkgs/build-support/setup-hooks/patch-shebangs.sh), as nixpkgs packages use it
#   (e.g. nixos-firewall-tool) in the stored copies read.
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
