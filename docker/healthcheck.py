"""The container's health probe: exit 0 when GET /health answers 200, 1 otherwise.

Python instead of curl because the slim images have no curl, and a probe must not need a package of
its own. /health needs no API key, so the probe never carries one.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

_TIMEOUT_S = 4.0


def probe_url(environ: dict[str, str]) -> str:
    """The /health URL of the server in this container, from the same variables the server reads."""
    host = environ.get("CHATMED_HOST", "127.0.0.1")
    # A server bound to every address is reached on loopback from inside its own container.
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = environ.get("CHATMED_PORT", "8000")
    return f"http://{host}:{port}/health"


def main() -> int:
    """One probe; the exit code is what Docker reads."""
    # No proxy: an HTTP(S)_PROXY set for the container's outbound traffic must not carry the probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(probe_url(dict(os.environ)), timeout=_TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
