#!/usr/bin/env bash
# The per-user machine's entrypoint.
#
# 1. Check the required variables and that matrixd is on PATH.
# 2. `matrixd init`: lay out the volume (MATRIX_DATA_DIR, default /data) and restore the
#    latest snapshot when the volume is new or behind. Idempotent.
# 3. exec `matrixd serve`, or `matrixd dual` when MATRIX_MODE=dual.
#
# It installs nothing and fetches nothing: everything is in the image. Running it twice
# gives the same volume. Every failure names the step and exits non-zero (64 for bad
# configuration, as matrixd does).
set -euo pipefail

readonly EXIT_CONFIG=64
readonly REQUIRED_VARIABLES=(MATRIX_USER_ID MATRIX_DAEMON_TOKEN)

fail() {
  local status=$1
  shift
  printf 'entrypoint: %s\n' "$*" >&2
  exit "$status"
}

check_variables() {
  local name
  for name in "${REQUIRED_VARIABLES[@]}"; do
    if [[ -z "${!name:-}" ]]; then
      fail "$EXIT_CONFIG" "step 1 (check configuration): ${name} is required but not set"
    fi
  done
  case "${MATRIX_MODE:-standalone}" in
    standalone | dual) ;;
    *)
      fail "$EXIT_CONFIG" \
        "step 1 (check configuration): MATRIX_MODE must be standalone or dual, not '${MATRIX_MODE}'"
      ;;
  esac
}

find_matrixd() {
  if ! command -v matrixd >/dev/null 2>&1; then
    fail 127 "step 1 (check configuration): matrixd is not on PATH (${PATH})"
  fi
}

init_volume() {
  local status=0
  # Its report goes to stderr, so the first line on stdout is the daemon's address.
  matrixd init >&2 || status=$?
  if ((status != 0)); then
    fail "$status" "step 2 (matrixd init) failed with status ${status}"
  fi
}

main() {
  check_variables
  find_matrixd
  init_volume
  if [[ "${MATRIX_MODE:-standalone}" == dual ]]; then
    exec matrixd dual
  fi
  exec matrixd serve
}

main "$@"
