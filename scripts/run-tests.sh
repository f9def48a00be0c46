#!/usr/bin/env bash
# The one test command: builds epp (debug), runs `swift test`, then the Python integration suites under
# Tests/Integration with pytest from .venv. Runs every stage even if an earlier one fails; exits non-zero if any
# stage failed and prints a summary.
#   EPP_BINARY=path   test this binary instead of building .build/debug/epp
#   PYTEST_ARGS="..." extra pytest arguments (e.g. "-k health -x")
#   SKIP_SWIFT_TEST=1 leave out `swift test` (local iteration only)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
declare -a NAMES=() RESULTS=()
record() { NAMES+=("$1"); RESULTS+=("$2"); }
stamp() { date +%s; }

if [[ ! -x "$PY" ]]; then
  echo "run-tests: $PY not found; create it first: python3 -m venv .venv && .venv/bin/pip install -r Tests/Integration/requirements.txt" >&2
  exit 2
fi

overall=0
t0=$(stamp)
if [[ -z "${EPP_BINARY:-}" ]]; then
  echo "=== swift build --product epp (debug)"
  if swift build --product epp; then
    record "build epp" "PASS ($(( $(stamp) - t0 ))s)"
    export EPP_BINARY="$ROOT/.build/debug/epp"
  else
    record "build epp" "FAIL"
    overall=1
  fi
else
  record "build epp" "skipped (EPP_BINARY=$EPP_BINARY)"
fi

if [[ -z "${SKIP_SWIFT_TEST:-}" ]]; then
  t1=$(stamp)
  echo "=== swift test"
  # Build the test product explicitly: a plain `swift test` also builds every executable of every
  # dependency (swift-protobuf's vendored protoc: minutes of C++ for nothing).
  if swift build --product swift-eppPackageTests && swift test --skip-build; then
    record "swift test" "PASS ($(( $(stamp) - t1 ))s)"
  else
    record "swift test" "FAIL"
    overall=1
  fi
fi

t2=$(stamp)
echo "=== pytest Tests/Integration (epp: ${EPP_BINARY:-none})"
# shellcheck disable=SC2086
"$PY" -m pytest Tests/Integration -p no:cacheprovider -rfE --timeout=180 --durations=10 ${PYTEST_ARGS:-}
rc=$?
case $rc in
  0) record "integration (pytest)" "PASS ($(( $(stamp) - t2 ))s)" ;;
  5) record "integration (pytest)" "FAIL (no tests collected)"; overall=1 ;;
  *) record "integration (pytest)" "FAIL (pytest exit $rc)"; overall=1 ;;
esac

echo
echo "=== summary ($(( $(stamp) - t0 ))s)"
for i in "${!NAMES[@]}"; do printf '  %-24s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}"; done
if [[ $overall -eq 0 ]]; then echo "run-tests: all stages passed"; else echo "run-tests: FAILED"; fi
exit $overall
