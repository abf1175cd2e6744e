"""Access control: with an API key set, every path but the health checks and the page's own files needs it.

API clients send ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. The web page cannot put a header on an
``<img>``, so opening ``/?key=KEY`` once sets an HttpOnly, SameSite=Strict session cookie holding the key (the
page's JavaScript never sees it) and redirects to the same URL without the key. A request that changes state
(anything but GET/HEAD) authenticated by the cookie alone must come from the server's own origin (CSRF). Keys are
compared in constant time.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlencode

from mpsclip.serve import metrics
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mpsclip.errors import MPSCLIPError

COOKIE = "mpsclip_key"
ENV_VAR = "MPSCLIP_API_KEY"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
PAGE = "/"
PAGE_FILES = "/static/"
SAFE_METHODS = frozenset({"GET", "HEAD"})
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
HOW = (
    "send 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (the key given to 'mpsclip serve --api-key' or "
    f"${ENV_VAR}); in a browser, open /?key=KEY once"
)


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print when ``host`` is reachable from other machines and no key protects it."""
    if host in LOOPBACK or api_key:
        return None
    return (
        f"warning: serving on {host}, reachable from other machines, with no access control: "
        f"set --api-key or ${ENV_VAR}"
    )


def same_key(given: str | None, key: str) -> bool:
    """``given == key`` in constant time (compared as UTF-8 bytes: a client may send any text)."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogatepass"), key.encode("utf-8"))


def header_key(request: Request) -> str | None:
    """The key an API client sent: ``Authorization: Bearer KEY``, else ``X-API-Key``."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key")


def own_origin(request: Request) -> bool:
    """Whether the request has no ``Origin`` header or names this server (scheme and Host) as its origin."""
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


def check_api_key(api_key: str) -> str:
    """``api_key`` if headers can carry it (printable ASCII, no spaces), else :class:`MPSCLIPError`."""
    if not api_key or not all("!" <= c <= "~" for c in api_key):
        raise MPSCLIPError(
            f"--api-key / ${ENV_VAR}: use printable ASCII without spaces (HTTP headers carry only those), "
            f"got {len(api_key)} characters that are not"
        )
    return api_key


class ApiKeyMiddleware:
    """ASGI middleware answering 401 to requests without the key (see the module docstring for the rules)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, check_api_key(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if scope["path"] == PAGE and "key" in request.query_params:
            return await self.login(request)(scope, receive, send)
        if self.is_open(scope["path"]) or self.allowed(request):
            return await self.app(scope, receive, send)
        metrics.ERRORS.labels("unauthorized").inc()
        response = JSONResponse(
            {"detail": f"missing or wrong API key: {HOW}"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)

    @staticmethod
    def is_open(path: str) -> bool:
        return path in OPEN_PATHS or path == PAGE or path.startswith(PAGE_FILES)

    def allowed(self, request: Request) -> bool:
        if same_key(header_key(request), self.key):
            return True
        if not same_key(request.cookies.get(COOKIE), self.key):
            return False
        return request.method in SAFE_METHODS or own_origin(request)

    def login(self, request: Request) -> Response:
        """``/?key=KEY``: the session cookie and a redirect to the page without the key, or 401."""
        if not same_key(request.query_params.get("key"), self.key):
            return JSONResponse({"detail": f"key: wrong API key in /?key=...; {HOW}"}, status_code=401)
        rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "key"])
        response = RedirectResponse(PAGE + (f"?{rest}" if rest else ""), status_code=303)
        secure = request.url.scheme == "https"
        response.set_cookie(COOKIE, self.key, httponly=True, samesite="strict", secure=secure, path="/")
        return response
