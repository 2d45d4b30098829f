#!/usr/bin/env bash
# Start FramePack UI on Linux or macOS. The first run sets up .venv (PyTorch for this machine's GPU, then the
# requirements); later runs check that quickly and start the app with the browser opened.
# Extra arguments go to install.py, which passes those it does not know on to app.py: ./run.sh --port 7861
set -euo pipefail
cd "$(dirname "$0")"

PY=""
for candidate in python3 python3.14 python3.13 python3.12 python3.11 python; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
    PY="$candidate"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "FramePack UI needs Python 3.11 or newer: install it (Debian/Ubuntu: sudo apt-get install python3 python3-venv; macOS: https://www.python.org/downloads/) and run ./run.sh again." >&2
  exit 1
fi

exec "$PY" install.py --inbrowser "$@"
