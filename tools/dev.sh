#!/usr/bin/env bash
# One entry for contributors and CI:
#   bash tools/dev.sh demo         set everything up, then run the demo
#   bash tools/dev.sh test [ARGS]  set everything up, then run the tests (ruff, then pytest ARGS, one worker per core)
# Setup makes .venv (or $VENV) with the profile's torch (the torch==X line of its requirements file: host 2.1.2, the
# WebUI v1.10.1's own; current 2.13.0) installed first, on its own, so that nothing can pull a second torch, then the
# requirements of $DREAMBOOTH_PROFILE (host: the WebUI's pinned versions, the default; current: current releases).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${DREAMBOOTH_PROFILE:-host}
venv=${VENV:-.venv}
py="$venv/bin/python"
[ -x "$py" ] || python3 -m venv "$venv"
torch_pin=$(grep -E '^torch==' "requirements/$profile.txt" | cut -d' ' -f1)
[ -n "$torch_pin" ] || { echo "requirements/$profile.txt names no torch==VERSION" >&2; exit 2; }
stamp="$venv/.installed-$profile-$(cat "requirements/$profile.txt" requirements/dev.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setting up $venv ($profile profile, $torch_pin)..."
  "$py" -m pip install -q --disable-pip-version-check "$torch_pin"
  "$py" -m pip install -q --disable-pip-version-check -r "requirements/$profile.txt" -r requirements/dev.txt
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) exec "$py" -m dreambooth demo "$@" ;;
  test)
    "$py" -m ruff check .
    # one test process per core ($DREAMBOOTH_TEST_WORKERS to change it; -n 0 in the args runs them in this process)
    exec "$py" -m pytest -q -n "${DREAMBOOTH_TEST_WORKERS:-auto}" "$@" ;;
  *) echo "usage: bash tools/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
