#!/usr/bin/env bash
# DCMTK's encoders (dcmcjpeg, dcmcjpls, dcmcrle, dcmconv) write the multi-vendor DICOM export the
# ingestion tests read (tests/data/test_pacs_export.py): files from an encoder that is not ours.
# Installs them from the OS package manager when the machine lacks them.
set -euo pipefail
if command -v dcmcjpeg >/dev/null 2>&1 && command -v dcmcjpls >/dev/null 2>&1; then
  echo "dcmtk: $(command -v dcmcjpeg)"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dcmtk >/dev/null
elif command -v brew >/dev/null 2>&1; then
  brew install dcmtk
else
  echo "dcmtk: not found and no known package manager; the PACS export test will be skipped" >&2
  exit 0
fi
echo "dcmtk: $(command -v dcmcjpeg)"
