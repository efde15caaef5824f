#!/usr/bin/env bash
# Install code-server (VS Code in the browser, the `vscode` tool) from the npm registry
# without network access beyond it: `npm install -g code-server` runs a postinstall that
# downloads ripgrep from GitHub, so this script does its steps itself, building the native
# modules here and using Debian's ripgrep. Needs node 20 (code-server 4.100 asks for it).
#   scripts/install-code-server.sh [VERSION]   (as root; into /usr/local, which the sandbox shows)
set -euo pipefail
version=${1:-4.100.3}
prefix=/usr/local/lib/code-server-$version
export DEBIAN_FRONTEND=noninteractive
# node-pty's install script runs `npx node-gyp`: let npx fetch it from the registry.
export npm_config_yes=true

if [ -x "$prefix/bin/code-server" ] && "$prefix/bin/code-server" --version >/dev/null 2>&1; then
  ln -sfn "$prefix/bin/code-server" /usr/local/bin/code-server
  exit 0
fi
command -v npm >/dev/null || { echo "npm is missing (node 20 with npm)"; exit 1; }
need=(build-essential python3 pkg-config libkrb5-dev ripgrep nodejs)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "code-server@$version" >/dev/null)
rm -rf "$prefix.tmp" && mkdir -p "$prefix.tmp"
tar xzf "$work"/code-server-*.tgz -C "$prefix.tmp" --strip-components=1
cd "$prefix.tmp"
npm install --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error
npm rebuild --loglevel=error argon2   # code-server's own native module (built here)
cd lib/vscode
npm install --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error
# The native modules, built here (everything with an install script but ripgrep's download).
npm rebuild --loglevel=error @parcel/watcher @vscode/spdlog @vscode/deviceid kerberos \
  native-watchdog node-pty
mkdir -p node_modules/@vscode/ripgrep/bin
ln -sfn "$(command -v rg)" node_modules/@vscode/ripgrep/bin/rg
ln -sfn node_modules node_modules.asar
(cd bin/remote-cli && ln -sfn code-linux.sh code-server)
(cd bin/helpers && ln -sfn browser-linux.sh browser.sh)
(cd extensions && npm install --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error)
mkdir -p "$prefix.tmp/bin"
cat >"$prefix.tmp/bin/code-server" <<SH
#!/bin/sh
exec node "$prefix/out/node/entry.js" "\$@"
SH
chmod 755 "$prefix.tmp/bin/code-server"
rm -rf "$prefix" && mv "$prefix.tmp" "$prefix"
ln -sfn "$prefix/bin/code-server" /usr/local/bin/code-server
code-server --version
