#!/usr/bin/env bash
# Build Tessera's container image from Debian packages and PyPI only (no container registry):
#   1. a Debian bookworm base image (debootstrap --variant=minbase: python3, ca-certificates,
#      security updates applied), imported as $BASE, built once and reused (REBUILD_BASE=1
#      makes it anew);
#   2. the Containerfile FROM that base -> $IMAGE (tessera:<version> from pyproject.toml);
#   3. image/smoke.sh: the image runs `tessera up --demo-upstream` read-only and answers a chat
#      completion from outside the container (SMOKE=0 skips it).
# Installs what it needs with apt-get (debootstrap, podman, runc) when missing. Runs as root.
#
#   SOURCE=head      (default) the build context is `git archive HEAD`: committed code only
#   SOURCE=worktree  the work tree as it is (uncommitted changes included)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
IMAGE=${IMAGE:-localhost/tessera:$VERSION}
BASE=${BASE:-localhost/tessera-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SOURCE=${SOURCE:-head}
SMOKE=${SMOKE:-1}
REBUILD_BASE=${REBUILD_BASE:-0}
# A CA bundle handed to pip in the builder as a build secret (in no layer): the host's, which
# also holds any CA of a proxy that re-signs TLS to the package index. Empty: pip's own.
HOST_CA=${HOST_CA-/etc/ssl/certs/ca-certificates.crt}

log() { printf '\n== %s\n' "$*"; }
die() { printf 'image/build.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and podman's storage need it)"

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v podman >/dev/null || need+=(podman)
# runc, not crun, runs the smoke container: crun refuses hosts with hybrid cgroups (v1 + v2).
command -v runc >/dev/null || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get install -y --no-install-recommends "${need[@]}" \
        || { apt-get update && apt-get install -y --no-install-recommends "${need[@]}"; }
fi

started=$(date +%s)

# --- 1. the base image -------------------------------------------------------------------------
build_base() {
    local work rootfs
    work=$(mktemp -d /var/tmp/tessera-base.XXXXXX)
    rootfs=$work/rootfs
    log "debootstrap $SUITE (minbase + python3, ca-certificates) from $MIRROR"
    debootstrap --variant=minbase --include=python3,ca-certificates "$SUITE" "$rootfs" "$MIRROR" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log"; die "debootstrap failed"; }
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    # No documentation, manual pages or translations from any later apt-get install either.
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/01-tessera-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    log "security and point-release updates"
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c 'apt-get update -q && apt-get -y -q upgrade && apt-get clean' >"$work/upgrade.log" 2>&1 \
        || { tail -n 30 "$work/upgrade.log"; die "apt-get upgrade in the base rootfs failed"; }
    # What an image needs no copy of: package lists and caches (the builder fetches lists again),
    # docs, logs; the resolver config (the runtime mounts its own).
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
        "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    : >"$rootfs/etc/resolv.conf"
    log "import the rootfs as $BASE"
    tar --numeric-owner --xattrs -C "$rootfs" -c . | podman import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase $SUITE + python3, ca-certificates" - "$BASE" >/dev/null
    rm -rf "$work"
}

if [ "$REBUILD_BASE" = 1 ] || ! podman image exists "$BASE"; then
    build_base
else
    log "base image $BASE exists (REBUILD_BASE=1 makes it anew)"
fi
base_done=$(date +%s)

# --- 2. the image ------------------------------------------------------------------------------
context=$ROOT
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$SOURCE" = head ] && git rev-parse --git-dir >/dev/null 2>&1; then
    context=$(mktemp -d /var/tmp/tessera-context.XXXXXX)
    trap 'rm -rf "$context"' EXIT
    git archive HEAD | tar -x -C "$context"
    source_note="HEAD $revision (committed code only; SOURCE=worktree builds the work tree)"
else
    source_note="the work tree at $revision, uncommitted changes included"
fi

secret=()
[ -n "$HOST_CA" ] && [ -s "$HOST_CA" ] && secret=(--secret "id=host_ca,src=$HOST_CA")

log "podman build $IMAGE from $source_note"
# --isolation chroot: the RUN steps need no OCI runtime, cgroups or namespaces of their own.
podman build --isolation chroot --pull=never --layers \
    --build-arg "BASE=$BASE" "${secret[@]}" \
    --label "org.opencontainers.image.title=tessera" \
    --label "org.opencontainers.image.version=$VERSION" \
    --label "org.opencontainers.image.revision=$revision" \
    -f "$context/Containerfile" -t "$IMAGE" "$context"
built=$(date +%s)

# --- 3. smoke ----------------------------------------------------------------------------------
smoke_note="skipped (SMOKE=0)"
if [ "$SMOKE" = 1 ]; then
    log "smoke: image/smoke.sh $IMAGE"
    if IMAGE=$IMAGE bash "$ROOT/image/smoke.sh"; then
        smoke_note="passed (a chat completion through the published port)"
    else
        smoke_note="FAILED (see above)"
    fi
fi
finished=$(date +%s)

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE")
id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
cat <<EOF

================ tessera image ================
image:       $IMAGE  (id ${id:0:12})
source:      $source_note
base:        $BASE  ($((base_size / 1000000)) MB)
size:        $((size / 1000000)) MB  (podman image inspect .Size)
base step:   $((base_done - started)) s
build step:  $((built - base_done)) s
smoke:       $smoke_note ($((finished - built)) s)
total:       $((finished - started)) s
run it:      podman run --rm -p 8080:8080 $IMAGE   (docs/image.md)
===============================================
EOF
[ "$SMOKE" != 1 ] || [[ $smoke_note == passed* ]]
