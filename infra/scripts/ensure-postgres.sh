#!/usr/bin/env bash
# Make PostgreSQL server binaries (initdb, pg_ctl, postgres) available for the integration
# tests, installing them from the OS package manager when the machine lacks them.
set -euo pipefail
find_bin() {
  command -v initdb 2>/dev/null && return 0
  ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1
}
if [ -n "$(find_bin || true)" ]; then
  echo "postgres: $(find_bin)"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
elif command -v brew >/dev/null 2>&1; then
  brew install postgresql@16
else
  echo "postgres: not found and no known package manager; integration tests will be skipped" >&2
  exit 0
fi
echo "postgres: $(find_bin)"
