#!/usr/bin/env bash
# Build Tessera's images on a real Docker engine and check them (tests/test_docker_images.py).
#
#   docker/test.sh          base + CPU image + its checks, then the GPU image and its checks
#   docker/test.sh --cpu    base + CPU image + its checks (what .ci/run runs)
#   docker/test.sh --gpu    base + GPU image + its checks
#
# Engine: with DOCKER_HOST set, that engine is used. Otherwise the script starts its own dockerd
# (Debian's docker.io) with its own socket and data root under $TESSERA_DOCKER_ROOT and stops it
# again on exit. No image registry is needed: the base image is built from Debian packages with
# mmdebstrap and `docker import`. pip inside the builds reaches the package registry over the host
# network with this machine's CA bundle (a BuildKit secret); a local torch wheel (pip's
# find-links, e.g. /opt/wheels) is served to the CPU build from a loopback http server.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

WANT_CPU=1 WANT_GPU=1
case "${1:-}" in
    --cpu) WANT_GPU=0 ;;
    --gpu) WANT_CPU=0 ;;
    "") ;;
    *) echo "usage: $0 [--cpu|--gpu]" >&2; exit 2 ;;
esac

ROOT=${TESSERA_DOCKER_ROOT:-/tmp/tessera-docker}
BASE_IMAGE=${TESSERA_BASE_IMAGE:-tessera-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
CA_BUNDLE=${PIP_CA_BUNDLE:-$(pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)}
export DOCKER_BUILDKIT=1
mkdir -p "$ROOT"

say() { echo "[docker/test.sh $(date +%H:%M:%S)] $*" >&2; }

need_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
    fi
}

PIDS_TO_STOP=()
cleanup() {
    local pid
    for pid in "${PIDS_TO_STOP[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS_TO_STOP[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    done
}
trap cleanup EXIT

start_engine() {
    if [[ -n "${DOCKER_HOST:-}" ]]; then
        say "using the engine at $DOCKER_HOST"
        return
    fi
    export DOCKER_HOST="unix://$ROOT/docker.sock"
    if "$DOCKER" info >/dev/null 2>&1; then
        say "engine already running at $DOCKER_HOST"
        return
    fi
    say "starting dockerd (data root $ROOT/data)"
    dockerd --host "$DOCKER_HOST" --data-root "$ROOT/data" --exec-root "$ROOT/exec" \
        --pidfile "$ROOT/docker.pid" >"$ROOT/dockerd.log" 2>&1 &
    PIDS_TO_STOP+=($!)
    for _ in $(seq 60); do
        "$DOCKER" info >/dev/null 2>&1 && return
        sleep 1
    done
    tail -20 "$ROOT/dockerd.log" >&2
    say "dockerd did not start"
    exit 1
}

build_base() {
    if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE exists"
        return
    fi
    say "building $BASE_IMAGE from Debian bookworm packages (mmdebstrap)"
    local suites="deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main"
    mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates \
        --format=tar bookworm "$ROOT/base.tar" "$suites"
    "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$ROOT/base.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$ROOT/base.tar"
}

# A loopback http server over the folder that holds the CPU torch wheel, when this machine has one:
# its URL in WHEELS_URL.
WHEELS_URL=""
serve_torch_wheel() {
    local folder
    for folder in ${TORCH_WHEELS:-$(pip config get global.find-links 2>/dev/null || true)}; do
        if compgen -G "$folder/torch-${TORCH_VERSION}+cpu-*.whl" >/dev/null; then
            # A fixed port when it is free: the URL is a build argument, so it keeps the layer cache.
            local port=${TESSERA_WHEELS_PORT:-38475}
            if ! "$PYTHON" -c "import socket; socket.socket().bind(('127.0.0.1', $port))" 2>/dev/null; then
                port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
            fi
            "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$folder" "$port" >"$ROOT/wheels.log" 2>&1 &
            PIDS_TO_STOP+=($!)
            sleep 1
            WHEELS_URL="http://127.0.0.1:$port/"
            say "serving the torch wheel in $folder at $WHEELS_URL"
            return
        fi
    done
}

build_image() {  # build_image TAG DOCKERFILE [build args...]
    local tag=$1 dockerfile=$2
    shift 2
    say "building $tag ($dockerfile)"
    local started=$SECONDS
    "$DOCKER" build --network host --progress plain \
        --secret "id=pip_ca,src=$CA_BUNDLE" \
        --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
        --build-arg "TORCH_VERSION=$TORCH_VERSION" "$@" \
        -f "$dockerfile" -t "$tag" . >"$ROOT/build-${tag//[:\/]/-}.log" 2>&1 \
        || { tail -40 "$ROOT/build-${tag//[:\/]/-}.log" >&2; say "build of $tag failed"; exit 1; }
    local size
    size=$("$DOCKER" image inspect --format '{{.Size}}' "$tag")
    say "built $tag in $((SECONDS - started)) s: $((size / 1000000)) MB"
    echo "{\"image\": \"$tag\", \"build_seconds\": $((SECONDS - started)), \"size_bytes\": $size}" \
        >>"$ROOT/images.jsonl"
}

run_checks() {  # run_checks TAG KIND
    say "checking $1"
    TESSERA_DOCKER_IMAGE=$1 TESSERA_DOCKER_KIND=$2 DOCKER="$DOCKER" DOCKER_HOST="$DOCKER_HOST" \
        "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_docker_images.py
}

need_packages
# The engine's own client (Debian's, once installed): BuildKit (secrets) without the buildx plugin.
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
start_engine
build_base
rm -f "$ROOT/images.jsonl"
if ((WANT_CPU)); then
    args=()
    serve_torch_wheel
    [[ -n "$WHEELS_URL" ]] && args+=(--build-arg "TORCH_FIND_LINKS=$WHEELS_URL")
    build_image tessera:cpu docker/Dockerfile.cpu "${args[@]}"
    run_checks tessera:cpu cpu
fi
if ((WANT_GPU)); then
    build_image tessera:gpu docker/Dockerfile.gpu
    run_checks tessera:gpu gpu
fi
cat "$ROOT/images.jsonl"
say "all checks passed"
