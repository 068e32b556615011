#!/usr/bin/env bash
# What the Playground's browser tests (tests/playground, marked `browser`) need:
# Debian's Chromium and Playwright for Python. No `playwright install`: the tests drive
# /usr/bin/chromium through executable_path, so nothing is downloaded besides packages.
set -euo pipefail

if [ ! -x /usr/bin/chromium ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core fonts-liberation
fi
python3 -m pip install -q "playwright>=1.40"
