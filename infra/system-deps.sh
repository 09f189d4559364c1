#!/usr/bin/env bash
# System packages some tests use, installed from Debian when missing and when we may (root + apt-get):
# PostgreSQL (the metadata database's production engine) and docker-compose (validates
# docker-compose.yml without a Docker engine). Without them those tests skip with a reason.
set -uo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: ${missing[*]} not installed (needs root and apt-get); their tests will skip" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || echo "system-deps: could not install ${missing[*]}; their tests will skip" >&2
exit 0
