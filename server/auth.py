"""The API-key guard in front of every route: one ASGI middleware, so that a route added later is
guarded without anyone remembering to add a dependency to it.

With `--api-key` set, every path but the probes (`/health`, `/ready`) needs `Authorization: Bearer
<key>`. The check runs before the body is read, so an unauthenticated client cannot make the server
parse, tokenize or queue anything. The routes' own `require_api_key` dependency stays as a second
line. The admin key (`--admin-api-key`) also passes this guard: the admin routes then check that it is
the admin key in particular.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import AuthenticationFailed, error_response

# Load balancers and container runtimes probe these without credentials; they tell only "ok",
# "draining", "starting" or "dead".
PUBLIC_PATHS = frozenset({"/health", "/ready"})


def bearer_token(scope: Scope) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, None when there is no such header."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def key_matches(token: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Constant time in the token's content: every key is compared, whichever matched."""
    matched = False
    for key in keys:
        # compare_digest on equal-type bytes takes time that depends on the lengths only.
        matched |= secrets.compare_digest(token or b"", key) and token is not None
    return matched


def matches_a_route(scope: Scope, routes: Sequence[BaseRoute]) -> bool:
    return any(route.matches(scope)[0] is not Match.NONE for route in routes)


class ApiKeyMiddleware:
    """401 with OpenAI's error body for a request to any route without a valid key, before the app
    sees it. A path that no route serves goes on to the app's 404, which runs nothing. `routes` is the
    app's live list, so routes included after this middleware are guarded too."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: SecretStr | None,
        admin_api_key: SecretStr | None,
        routes: Sequence[BaseRoute],
    ) -> None:
        self.app = app
        # An empty key matches nothing: a server started with `--api-key ""` refuses, not opens.
        secrets_given = (key.get_secret_value() for key in (api_key, admin_api_key) if key is not None)
        self._keys = tuple(secret.encode("utf-8") for secret in secrets_given if secret)
        self._enabled = api_key is not None
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self._enabled
            or scope["type"] != "http"
            or scope["path"] in PUBLIC_PATHS
            or key_matches(bearer_token(scope), self._keys)
            or not matches_a_route(scope, self._routes)
        ):
            await self.app(scope, receive, send)
            return
        failure = AuthenticationFailed("Missing or incorrect API key: send 'Authorization: Bearer <key>'.")
        await error_response(failure)(scope, receive, send)
