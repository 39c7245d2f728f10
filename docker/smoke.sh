#!/usr/bin/env bash
# `make docker-smoke`: build the CPU image and serve the embedded demo under docker-compose for real:
# wait for health, list the models, stream one chat completion, stop (exit code 0 expected from the
# SIGTERM drain) and take everything down. Prints the time of each phase.
#
# Works on a machine that can pull no image and runs no docker daemon (as root):
#   - installs docker.io, docker-compose and debootstrap (Debian packages) when missing;
#   - starts dockerd by hand when none answers (no default bridge, no iptables: the build's RUN steps use
#     the host's network; the container gets compose's own network with its port published on the
#     host's loopback, as docker-compose.yml says) and stops it again at the end;
#   - builds the base image from Debian packages (debootstrap + `docker import`), adding this host's
#     extra CA certificates so that pip in the build trusts the same TLS proxies as the host;
#   - installs torch from the host's local CPU wheel, served to the build over loopback.
# Images and the layer cache are kept between runs; SMOKE_REBUILD_BASE=1 rebuilds the base image.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
WORK=${SMOKE_WORK:-/tmp/chatmed-docker-smoke}
BASE_IMAGE=${SMOKE_BASE_IMAGE:-chatmed-base:bookworm}
DEBIAN_MIRROR=${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_SPEC=${SMOKE_TORCH_SPEC:-torch==2.13.0+cpu}
HEALTH_TIMEOUT_S=${SMOKE_HEALTH_TIMEOUT_S:-600}
PROJECT=chatmed-smoke
# An empty env file: a developer's .env (an API key, another port) must not change what is tested.
ENV_FILE="$WORK/empty.env"
COMPOSE=(docker-compose -p "$PROJECT" --env-file "$ENV_FILE" -f docker-compose.yml -f docker/compose.smoke.yml
    --profile demo)

started_dockerd=""
wheel_server_pid=""
compose_up=""
mkdir -p "$WORK"
: >"$ENV_FILE"

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# phase NAME COMMAND...: runs COMMAND and prints how long it took.
phase() {
    local name=$1 start end
    shift
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    awk -v name="$name" -v s="$start" -v e="$end" \
        'BEGIN { printf "[smoke] TIMING %-26s %7.1f s\n", name, e - s }'
}

cleanup() {
    local rc=$?
    if [[ -n "$compose_up" ]]; then
        if [[ $rc -ne 0 ]]; then
            log "failed (exit $rc); the container's last log lines:"
            "${COMPOSE[@]}" logs --no-color --tail 60 demo || true
        fi
        "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    if [[ -n "$wheel_server_pid" ]]; then
        kill "$wheel_server_pid" 2>/dev/null || true
        wait "$wheel_server_pid" 2>/dev/null || true
    fi
    if [[ -n "$started_dockerd" ]]; then
        log "stopping the dockerd this script started (pid $started_dockerd)"
        kill "$started_dockerd" 2>/dev/null || true
        # Bounded wait: dockerd stops its containers first, then exits.
        for _ in $(seq 60); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.5; done
    fi
    exit "$rc"
}
trap cleanup EXIT

install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v curl >/dev/null || missing+=(curl)
    command -v jq >/dev/null || missing+=(jq)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}

start_dockerd() {
    if docker info >/dev/null 2>&1; then
        log "using the running docker daemon"
        return
    fi
    log "no docker daemon answers; starting dockerd (log: $WORK/dockerd.log)"
    dockerd --iptables=false --ip6tables=false --bridge=none \
        --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 120); do
        if docker info >/dev/null 2>&1; then
            log "dockerd is up: $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}')"
            return
        fi
        if ! kill -0 "$started_dockerd" 2>/dev/null; then
            log "dockerd exited; its log:"
            tail -20 "$WORK/dockerd.log"
            exit 1
        fi
        sleep 0.5
    done
    log "dockerd did not answer within 60 s; its log:"
    tail -20 "$WORK/dockerd.log"
    exit 1
}

build_base_image() {
    if [[ -z "${SMOKE_REBUILD_BASE:-}" ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE exists"
        return
    fi
    local rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    log "debootstrap bookworm (python3, python3-venv, python3-pip) from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    # This host's own CAs (for instance a TLS-inspecting proxy's) so that pip inside the build works.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    rm -rf "$rootfs/var/lib/apt/lists/"* "$rootfs/var/cache/apt/"*.bin
    tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "imported $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | numfmt --to=iec))"
}

serve_torch_wheel() {
    local wheels="$WORK/wheels" port
    mkdir -p "$wheels"
    # Found on local disk (pip's find-links here); a version with a local label (+cpu) is never on PyPI,
    # so this cannot fall back to downloading the CUDA wheel.
    "$VENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$wheels" "$TORCH_SPEC" 2>&1 \
        | grep -v 'is ignored' || true
    compgen -G "$wheels/torch-*.whl" >/dev/null || { log "no local wheel for $TORCH_SPEC"; exit 1; }
    # A fixed port where possible: the URL is a build argument, and a new one would rebuild every layer
    # from torch's on.
    port=${SMOKE_WHEELS_PORT:-18765}
    if ! python3 -c "import socket, sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1])))" "$port" \
        2>/dev/null; then
        port=$(free_port)
        log "port ${SMOKE_WHEELS_PORT:-18765} is taken; serving the wheel at $port (no layer cache for torch)"
    fi
    python3 -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >"$WORK/wheels.log" 2>&1 &
    wheel_server_pid=$!
    export SMOKE_WHEELS_URL="http://127.0.0.1:$port/"
    log "serving $(basename "$wheels"/torch-*.whl) at $SMOKE_WHEELS_URL"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

build_image() {
    "${COMPOSE[@]}" build demo >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
    grep -oE 'torch [0-9][^ ]* cuda [^ ]*' "$WORK/build.log" | sed 's/^/    /' || true
    log "build steps taken from the layer cache: $(grep -c 'Using cache' "$WORK/build.log" || true) (of $(
        grep -c '^Step ' "$WORK/build.log"))"
    log "image chatmed-serve:cpu-smoke: $(docker image inspect -f '{{.Size}}' chatmed-serve:cpu-smoke \
        | numfmt --to=iec)"
}

wait_healthy() {
    local container status deadline=$((SECONDS + HEALTH_TIMEOUT_S))
    container=$("${COMPOSE[@]}" ps -q demo)
    while ((SECONDS < deadline)); do
        status=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$container")
        case "$status" in
            "running healthy") return ;;
            running*) sleep 1 ;;
            *) log "container is $status"; exit 1 ;;
        esac
    done
    log "not healthy within $HEALTH_TIMEOUT_S s"
    exit 1
}

check_models() {
    local body
    body=$(curl -sf "http://127.0.0.1:$SMOKE_PORT/v1/models")
    local model
    for model in chatmed-consult chatmed-tcm; do
        grep -q "\"$model\"" <<<"$body" || { log "/v1/models lacks $model: $body"; exit 1; }
    done
    log "/v1/models: $(jq -r '[.data[].id] | join(", ")' <<<"$body")"
}

stream_chat() {
    local out="$WORK/stream.txt" frames
    curl -sfN "http://127.0.0.1:$SMOKE_PORT/v1/chat/completions" -H 'Content-Type: application/json' \
        -d '{"model": "chatmed-consult", "stream": true, "max_tokens": 24, "temperature": 0.2,
             "messages": [{"role": "user", "content": "最近总是头痛，晚上睡不好，怎么办？"}]}' >"$out"
    frames=$(grep -c '"chat.completion.chunk"' "$out" || true)
    if ((frames < 2)) || [[ "$(grep -v '^$' "$out" | tail -1)" != "data: [DONE]" ]]; then
        log "not a chat.completion.chunk stream ending in [DONE]:"
        head -c 2000 "$out"
        exit 1
    fi
    log "streamed $frames chunks, then [DONE]; text (random demo weights): $(
        sed -n 's/^data: //p' "$out" | grep -v '^\[DONE\]' | jq -rj '.choices[0].delta.content // ""' \
            | head -c 120)"
}

stop_container() {
    local container code
    container=$("${COMPOSE[@]}" ps -q demo)
    "${COMPOSE[@]}" stop demo >/dev/null 2>&1
    code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
    log "container stopped with exit code $code"
    # RELIABILITY.md: after SIGTERM the server drains and exits 0. 137 would mean Docker had to SIGKILL
    # it (drain longer than stop_grace_period); 143 that the process died of the SIGTERM itself.
    [[ "$code" == 0 ]] || { log "expected exit code 0 after SIGTERM, got $code"; exit 1; }
}

main() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "docker-smoke: run as root (it installs packages and may start dockerd)" >&2
        exit 1
    fi
    [[ -x "$VENV/bin/pip" ]] || { echo "docker-smoke: $VENV is missing; run 'make venv'" >&2; exit 1; }
    local total_start=$SECONDS
    phase "install tools" install_tools
    phase "docker daemon" start_dockerd
    phase "base image" build_base_image
    phase "torch wheel" serve_torch_wheel
    export SMOKE_BASE_IMAGE="$BASE_IMAGE" SMOKE_TORCH_SPEC="$TORCH_SPEC"
    SMOKE_PORT=$(free_port)
    export CHATMED_PUBLISH_ADDR=127.0.0.1 CHATMED_PUBLISH_PORT=$SMOKE_PORT
    phase "build image (compose)" build_image
    compose_up=1
    phase "compose up -d" "${COMPOSE[@]}" up -d --no-build demo
    phase "until healthy" wait_healthy
    phase "GET /v1/models" check_models
    phase "streamed chat completion" stream_chat
    phase "stop (SIGTERM drain)" stop_container
    phase "compose down -v" "${COMPOSE[@]}" down -v --remove-orphans
    compose_up=""
    log "docker-smoke: ok in $((SECONDS - total_start)) s"
}

main "$@"
