#!/usr/bin/env bash
# Build the container images labgate's tests run, locally: nothing is pulled from a
# container registry (see /work/shared/MACHINE-NOTES.md).
#
#   localhost/labgate/busybox:latest  a static busybox (sh, httpd, sleep); well under 2 MB
#   localhost/labgate/demo:latest     Debian bookworm (debootstrap, minbase) + python3 + the
#                                     demo tool (python3 -m labgate.tools.demo; standard
#                                     library only)
#
# Both run as uid 1000 (user "labgate", HOME=/home/labgate, the workspace mount point).
# Cached: every image carries the label org.labgate.test-image=<hash of its inputs>; an
# image already present with the right hash is left alone. The Debian rootfs tarball (the
# slow part: debootstrap) is kept in $LABGATE_IMAGE_CACHE (default
# /var/cache/labgate-test-images), keyed by a hash of its recipe, so rebuilding the demo
# image after a change to the demo tool takes seconds.
#
# Usage: scripts/build-test-images.sh [--force]
# Needs: root, podman, busybox-static, debootstrap.
set -euo pipefail

cd "$(dirname "$0")/.."
CACHE=${LABGATE_IMAGE_CACHE:-/var/cache/labgate-test-images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

BUSYBOX_IMAGE=localhost/labgate/busybox:latest
DEMO_IMAGE=localhost/labgate/demo:latest
BASE_IMAGE=localhost/labgate/bookworm-python:latest
LABEL=org.labgate.test-image

log() { printf '[build-test-images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (podman images for the tests live in root's storage)"
command -v podman >/dev/null || die "podman is missing: apt-get install podman runc"

hash_of() { sha256sum | cut -c1-16; }
# The recipe of one part of this script: the text between "# recipe:NAME" and "# end:NAME".
recipe() { sed -n "/^# recipe:$1\$/,/^# end:$1\$/p" "$0"; }

current_hash() {
  podman image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true
}

fresh() {  # fresh IMAGE HASH: the image exists and was built from these inputs
  [ "$FORCE" = 0 ] && [ "$(current_hash "$1")" = "$2" ]
}

WORK=$(mktemp -d /tmp/labgate-images.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE"
# .ci/run starts this in the background while the tests may start it too: one at a time.
exec 9>"$CACHE/test-images.lock"
flock 9

# recipe:busybox
build_busybox() {
  local busybox rootfs=$WORK/busybox applet
  busybox=/bin/busybox
  [ -x "$busybox" ] || die "busybox is missing: apt-get install busybox-static"
  # A dynamically linked busybox would find no libc in the image.
  { ldd "$busybox" 2>&1 || true; } | grep -q "not a dynamic" \
    || die "$busybox is not static: apt-get install busybox-static"
  mkdir -p "$rootfs"/{bin,etc,tmp,www,home/labgate}
  cp "$busybox" "$rootfs/bin/busybox"
  for applet in sh ls cat echo sleep httpd id touch mkdir rm env wc head tail true false kill; do
    ln -s busybox "$rootfs/bin/$applet"
  done
  printf 'root:x:0:0::/root:/bin/sh\nlabgate:x:1000:1000::/home/labgate:/bin/sh\n' \
    >"$rootfs/etc/passwd"
  printf 'root:x:0:\nlabgate:x:1000:\n' >"$rootfs/etc/group"
  echo '<!doctype html><title>labgate busybox</title><p>labgate busybox</p>' \
    >"$rootfs/www/index.html"
  chmod 1777 "$rootfs/tmp"
  chown -R 1000:1000 "$rootfs/home/labgate"
  tar -C "$rootfs" --numeric-owner -c . | podman import \
    --change "USER 1000:1000" \
    --change "WORKDIR /home/labgate" \
    --change "ENV HOME=/home/labgate" \
    --change "LABEL $LABEL=$1" \
    --change 'CMD ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]' \
    - "$BUSYBOX_IMAGE" >/dev/null
}
# end:busybox

# recipe:base
build_base_rootfs() {  # a bookworm minbase with python3 and a labgate user, as a tarball
  local rootfs=$WORK/rootfs tarball=$1
  command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
  log "debootstrap $SUITE (minbase + python3) from $MIRROR: a few minutes, once"
  debootstrap --variant=minbase --include=python3,ca-certificates "$SUITE" "$rootfs" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  chroot "$rootfs" groupadd --gid 1000 labgate
  chroot "$rootfs" useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash labgate
  # Smaller image, same behaviour: no apt lists, docs or man pages.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" --numeric-owner -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
  rm -rf "$rootfs"
}
# end:base

# recipe:demo
build_demo() {
  local context=$WORK/demo
  mkdir -p "$context/lib/labgate/tools"
  cp src/labgate/__init__.py "$context/lib/labgate/"
  cp src/labgate/tools/__init__.py "$context/lib/labgate/tools/"
  mkdir -p "$context/lib/labgate/tools/demo"
  cp src/labgate/tools/demo/*.py "$context/lib/labgate/tools/demo/"
  cat >"$context/Containerfile" <<EOF
FROM $BASE_IMAGE
COPY lib /opt/labgate/lib
ENV PYTHONPATH=/opt/labgate/lib PYTHONDONTWRITEBYTECODE=1 HOME=/home/labgate LANG=C.UTF-8
USER 1000:1000
WORKDIR /home/labgate
EXPOSE 8888
LABEL $LABEL=$1
CMD ["python3", "-m", "labgate.tools.demo", "--host", "0.0.0.0", "--port", "8888"]
EOF
  podman build --quiet --pull=never --network=none -t "$DEMO_IMAGE" "$context" >/dev/null
}
# end:demo

# --- busybox -----------------------------------------------------------------
busybox_hash=$(recipe busybox | hash_of)
if fresh "$BUSYBOX_IMAGE" "$busybox_hash"; then
  log "$BUSYBOX_IMAGE is up to date"
else
  log "building $BUSYBOX_IMAGE"
  build_busybox "$busybox_hash"
fi

# --- bookworm + python3 (cached rootfs) -----------------------------------------
base_hash=$({ recipe base; echo "$SUITE $MIRROR"; } | hash_of)
if fresh "$BASE_IMAGE" "$base_hash"; then
  log "$BASE_IMAGE is up to date"
else
  tarball=$CACHE/$SUITE-python-$base_hash.tar
  if [ "$FORCE" = 1 ] || [ ! -s "$tarball" ]; then
    build_base_rootfs "$tarball"
  else
    log "using the cached rootfs $tarball"
  fi
  podman import --change "LABEL $LABEL=$base_hash" --change 'CMD ["python3"]' \
    "$tarball" "$BASE_IMAGE" >/dev/null
  # Older rootfs tarballs are never used again.
  find "$CACHE" -name "$SUITE-python-*.tar" ! -name "$(basename "$tarball")" -delete
fi

# --- demo ------------------------------------------------------------------------
demo_hash=$({ recipe demo; echo "$base_hash"; cat src/labgate/__init__.py \
  src/labgate/tools/__init__.py src/labgate/tools/demo/*.py; } | hash_of)
if fresh "$DEMO_IMAGE" "$demo_hash"; then
  log "$DEMO_IMAGE is up to date"
else
  log "building $DEMO_IMAGE"
  build_demo "$demo_hash"
fi

# Dangling layers of replaced images.
podman image prune --force --filter "label=$LABEL" >/dev/null 2>&1 || true
log "ready: $BUSYBOX_IMAGE $DEMO_IMAGE"
