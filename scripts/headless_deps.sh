#!/bin/sh
# Install Xvfb and the X libraries that Qt's xcb platform plugin needs (napari tests, screenshot).
# apt-get installs them when they are missing and this runs as root on Debian or Ubuntu.
# Otherwise it prints a warning, and the napari tests skip.
set -e
if command -v xvfb-run >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if ! { apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            xvfb xauth libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
            libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 \
            libgl1 libegl1 libdbus-1-3 libfontconfig1 >/dev/null; }; then
        echo "installing Xvfb with apt-get failed; the napari tests will be skipped" >&2
    fi
else
    echo "xvfb-run is missing and cannot be installed here (needs root and apt-get); the napari tests will be skipped" >&2
fi
