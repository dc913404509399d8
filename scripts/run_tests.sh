#!/bin/sh
# `make test`: the whole suite, under Xvfb when it is available (the napari tests need a display).
# Usage: sh scripts/run_tests.sh PYTHON [pytest arguments]
set -e
PY="$1"
shift
sh "$(dirname "$0")/headless_deps.sh"
export QT_API=pyqt6
if command -v xvfb-run >/dev/null 2>&1; then
    exec xvfb-run -a -s "-screen 0 1280x1024x24" "$PY" -m pytest -q "$@" tests
fi
exec "$PY" -m pytest -q "$@" tests
