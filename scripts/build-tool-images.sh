#!/usr/bin/env bash
# Build the built-in tools' container images from their recipes
# (src/labgate/tools/builtin/<tool>.build/Containerfile) for the tests, on the tests' local
# base localhost/labgate/bookworm-python:latest (scripts/build-test-images.sh makes it): the
# same build context as `labgate image build TOOL --build-arg BASE=<base> --ca-file <CA>`,
# built with the podman command (root's storage, which the tests' Podman service shares).
#
# Cached like build-test-images.sh: each image carries org.labgate.test-image=<hash of its
# build context and of the base image's hash>; an image built from the same inputs is left
# alone (a second or so). A lock ($LABGATE_IMAGE_CACHE/tool-images.lock) makes a build that
# .ci/run started in the background and a later call for the same image wait for each
# other instead of building twice.
#
# Usage: scripts/build-tool-images.sh [--check] [--force] [TOOL...]
#   TOOL     default: vscode desktop shiny streamlit
#   --check  build nothing; exit 3 when an image is missing or was built from other inputs
# Needs: root, podman (runc), the base image. The builds reach Debian's mirror, PyPI and the
# npm registry; they trust CA_FILE (default: this machine's /etc/ssl/certs/ca-certificates.crt,
# which holds the CA of a TLS-intercepting proxy where there is one).
set -euo pipefail

cd "$(dirname "$0")/.."
CACHE=${LABGATE_IMAGE_CACHE:-/var/cache/labgate-test-images}
CA_FILE=${CA_FILE:-/etc/ssl/certs/ca-certificates.crt}
BASE_IMAGE=localhost/labgate/bookworm-python:latest
LABEL=org.labgate.test-image
BUILTIN=src/labgate/tools/builtin
CHECK=0
FORCE=0
tools=()
for arg in "$@"; do
  case $arg in
    --check) CHECK=1 ;;
    --force) FORCE=1 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) tools+=("$arg") ;;
  esac
done
[ ${#tools[@]} -gt 0 ] || tools=(vscode desktop shiny streamlit)

log() { printf '[build-tool-images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (podman images for the tests live in root's storage)"
command -v podman >/dev/null || die "podman is missing: apt-get install podman runc"
label_of() {
  podman image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true
}
base_hash=$(label_of "$BASE_IMAGE")
[ -n "$base_hash" ] || die "$BASE_IMAGE is missing: run scripts/build-test-images.sh first"
[ -s "$CA_FILE" ] || die "no CA bundle at $CA_FILE (set CA_FILE)"

WORK=$(mktemp -d /tmp/labgate-tool-images.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE"
[ "$CHECK" = 1 ] || exec 9>"$CACHE/tool-images.lock"
[ "$CHECK" = 1 ] || flock 9

stale=0
for tool in "${tools[@]}"; do
  [ -f "$BUILTIN/$tool.toml" ] || die "no built-in tool $tool"
  context=$WORK/$tool
  mkdir -p "$context"
  # labgate's own context writer: what `labgate image build` sends to the engine.
  image=$(PYTHONPATH=src python3 - "$BUILTIN/$tool.toml" "$context" "$CA_FILE" <<'PY'
import sys
import tomllib
from pathlib import Path

from labgate.backends.container_build import write_context

tool_file, context, ca_file = (Path(arg) for arg in sys.argv[1:])
section = tomllib.loads(tool_file.read_text())["container"]
write_context(tool_file.parent / section["build"], context, ca_file)
print(section["image"])
PY
  )
  hash=$({ (cd "$context" && find . -type f -print0 | sort -z | xargs -0 sha256sum); \
    echo "base $base_hash"; } | sha256sum | cut -c1-16)
  if [ "$FORCE" = 0 ] && [ "$(label_of "$image")" = "$hash" ]; then
    log "$image is up to date"
    continue
  fi
  if [ "$CHECK" = 1 ]; then
    log "$image is missing or stale: scripts/build-tool-images.sh $tool builds it"
    stale=1
    continue
  fi
  log "building $image (log: $CACHE/$tool.log)"
  started=$SECONDS
  old=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  # runc, cgroupfs and ulimits at or below the machine's: crun and raised rlimits fail
  # here (docs/backends/containers.md); flags, so no containers.conf is needed.
  if ! podman --runtime runc --cgroup-manager cgroupfs --events-backend file build \
      --pull=never --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 \
      --build-arg "BASE=$BASE_IMAGE" --label "$LABEL=$hash" --label "org.labgate.tool=$tool" \
      -t "$image" "$context" >"$CACHE/$tool.log" 2>&1; then
    tail -n 40 "$CACHE/$tool.log" >&2
    die "building $image failed (log: $CACHE/$tool.log)"
  fi
  log "built $image in $((SECONDS - started))s"
  # The image it replaces, alone: the cached layers and build stages stay (no prune), so
  # the next build of a changed recipe redoes only the steps after the change.
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
  fi
done
[ "$CHECK" = 0 ] || [ "$stale" = 0 ] || exit 3
