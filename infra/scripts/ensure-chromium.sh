#!/usr/bin/env bash
# The system Chromium for the real-browser tests (tests/browser/, marked `browser`): Playwright drives it
# through executable_path; Playwright's own browser download is never used.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  echo "chromium: $(command -v chromium || command -v chromium-browser)"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
elif command -v brew >/dev/null 2>&1; then
  brew install --cask chromium
else
  echo "chromium: not found and no known package manager; the browser tests will be skipped" >&2
  exit 0
fi
echo "chromium: $(command -v chromium || command -v chromium-browser)"
