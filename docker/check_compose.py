"""Checks of docker-compose.yml that `docker-compose config` cannot make: the deployment promises.

Reads the resolved file (`docker-compose config` output, YAML) on stdin and exits 1 listing every broken
promise: restart policy, healthcheck, init, a stop grace period longer than the drain timeout, ports
published on loopback by default, read-only model folders and a GPU for `chatmed`, and for `demo` a
profile, no GPU and its cache folder on a named volume.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import yaml

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Docker also has to stop the engine thread and free the model after the drain: leave it this long.
MIN_SHUTDOWN_MARGIN_S = 10.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def duration_s(text: str) -> float:
    """A compose duration ("45s", "1m30s", "5m") in seconds."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(number) * _SECONDS[unit] for number, unit in parts)


def _volumes(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Volumes in long syntax, whichever syntax the resolved file uses (v1 prints short, v2 long)."""
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            kind = "bind" if source.startswith(("/", ".")) else "volume"
            volume = {"type": kind, "source": source, "target": target, "read_only": mode == ["ro"]}
        result.append(volume)
    return result


def _host_ips(service: dict[str, Any]) -> list[str]:
    ips = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            ips.append(port.split(":")[0] if port.count(":") == 2 else "")
        else:
            ips.append(str(port.get("host_ip", "")))
    return ips


def _has_gpu(service: dict[str, Any]) -> bool:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return any(
        device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", []) for device in devices
    )


def common_problems(name: str, service: dict[str, Any]) -> list[str]:
    """What every served container must have."""
    problems = []
    if service.get("restart", "no") == "no":
        problems.append(f"{name}: no restart policy")
    if not service.get("healthcheck", {}).get("test"):
        problems.append(f"{name}: no healthcheck")
    if service.get("init") is not True:
        problems.append(f"{name}: init is not true (SIGTERM must reach the server)")
    env = service.get("environment") or {}
    drain_s = float(env.get("CHATMED_DRAIN_TIMEOUT") or DEFAULT_DRAIN_TIMEOUT_S)
    grace_s = duration_s(str(service.get("stop_grace_period", "10s")))
    if grace_s < drain_s + MIN_SHUTDOWN_MARGIN_S:
        problems.append(
            f"{name}: stop_grace_period {grace_s:g}s is less than the {drain_s:g}s drain"
            f" + {MIN_SHUTDOWN_MARGIN_S:g}s"
        )
    if any(ip != "127.0.0.1" for ip in _host_ips(service)):
        problems.append(f"{name}: a port is published beyond loopback")
    return problems


def service_problems(name: str, service: dict[str, Any]) -> list[str]:
    """The promises of the GPU service (`chatmed`) or of the demo (`demo`)."""
    problems = common_problems(name, service)
    volumes = _volumes(service)
    if name == "chatmed":
        if not _has_gpu(service):
            problems.append("chatmed: no nvidia GPU reservation")
        targets = {volume["target"] for volume in volumes if volume.get("read_only")}
        if not {"/models/base", "/models/adapters"} <= targets:
            problems.append("chatmed: /models/base and /models/adapters must be mounted read-only")
    elif name == "demo":
        if "demo" not in service.get("profiles", []) or _has_gpu(service):
            problems.append("demo: must be in the demo profile and need no GPU")
        cache_dir = (service.get("environment") or {}).get("CHATMED_CACHE_DIR")
        named = [volume for volume in volumes if volume["type"] == "volume" and volume["target"] == cache_dir]
        if cache_dir is None or not named or len(volumes) != 1:
            problems.append("demo: its only volume must be a named one at CHATMED_CACHE_DIR")
    else:
        problems.append(f"{name}: unexpected service")
    return problems


def main() -> int:
    """Check the resolved compose file on stdin; log each problem."""
    logging.basicConfig(level=logging.INFO, format="check_compose: %(message)s")
    config = yaml.safe_load(sys.stdin)
    problems = [
        problem
        for name, service in sorted(config.get("services", {}).items())
        for problem in service_problems(name, service)
    ]
    for problem in problems:
        logger.error("%s", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
