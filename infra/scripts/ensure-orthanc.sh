#!/usr/bin/env bash
# Orthanc (a real PACS) with its DICOMweb plugin for the PACS integration tests (marked `server`); the tests
# start their own instance on loopback with random ports and a temp storage folder, never the system service.
set -euo pipefail
if command -v Orthanc >/dev/null 2>&1 && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1; then
  echo "orthanc: $(command -v Orthanc)"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
else
  echo "orthanc: not found and no apt-get; the PACS integration tests will be skipped" >&2
  exit 0
fi
echo "orthanc: $(command -v Orthanc)"
