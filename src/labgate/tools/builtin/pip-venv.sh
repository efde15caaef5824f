#!/bin/sh
# pip-venv.sh VENV REQUIREMENT...: a venv at VENV holding REQUIREMENTs from PyPI, for image
# recipes. `labgate image build` puts it in every build context, next to extra-ca.pem
# (--ca-file: a TLS-intercepting proxy's CA, else empty), which pip trusts besides the
# image's CAs. A base without Python's venv module gets it from Debian first.
set -eu
venv=$1
shift
if ! python3 -m venv --clear "$venv" 2>/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
  rm -rf /var/lib/apt/lists/*
  python3 -m venv --clear "$venv"
fi
ca=$(mktemp)
{ cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true; cat "$(dirname "$0")/extra-ca.pem"; } >"$ca"
"$venv/bin/pip" install --no-cache-dir --cert "$ca" "$@"
rm -f "$ca"
