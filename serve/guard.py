"""What a web page the user visits cannot make the server do: DNS rebinding and cross-site requests.

* **Host allow-list.** A request whose ``Host`` header is not one of the server's names gets 400. The names are
  the loopback ones (``127.0.0.1``, ``localhost``, ``::1``), the ``--host`` it binds and each ``--allowed-host``;
  a server bound to every interface (``0.0.0.0``, ``::``) also answers to any IP address and to this machine's
  host names. A page on ``evil.example`` whose name was rebound to 127.0.0.1 sends ``Host: evil.example``, so
  it is refused: that is the whole defence against DNS rebinding, and IP-address Hosts cannot be rebound.
* **No cross-site state changes.** A request that may change state (a method other than GET/HEAD/OPTIONS, on a path
  other than the read-only searches :data:`READ_ONLY_POSTS`) gets 403 when the browser says it comes from another
  site: an ``Origin`` whose host and port are not the request's ``Host`` (any scheme: TLS may end at a proxy; nor
  one of the ``--cors`` origins), or a ``Sec-Fetch-Site`` other than ``same-origin``/``none``. Clients that are
  not browsers (curl, scripts) send neither header and pass. This holds with or without an API key: a form POST
  from a foreign page to ``/admin/reload`` is refused.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from mpsclip.serve import metrics
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_ONLY_POSTS = frozenset({"/search", "/search/batch", "/search/upload"})
"""POSTs that only read: a foreign page may send them (it cannot read the answer without CORS)."""
SAME_SITE_FETCH = frozenset({"same-origin", "none"})


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without port, brackets, trailing dot or case: ``[::1]:80`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        header = header.partition(":")[0]
    return header.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names a server bound to ``host`` answers to: loopback, ``host`` itself, ``extra``
    (``--allowed-host``), and this machine's names when ``host`` is every interface."""
    names = {*LOOPBACK_NAMES, host_name(host), *(host_name(h) for h in extra)}
    if host in EVERY_INTERFACE:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names - {""})


class RequestGuardMiddleware:
    """ASGI middleware applying the two rules of the module docstring.

    ``hosts``: the allowed Host names (see :func:`allowed_hosts`; ``"*"`` among them turns the check off);
    ``any_ip``: also allow any IP-address Host (a server bound to every interface); ``trusted_origins``: the
    ``--cors`` origins, which may change state too."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str], any_ip: bool = False,
                 trusted_origins: Iterable[str] = ()) -> None:
        self.app, self.hosts, self.any_ip = app, frozenset(hosts), any_ip
        self.trusted_origins = frozenset(o.rstrip("/") for o in trusted_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self.host_refusal(headers) or self.cross_site_refusal(scope, headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, kind, detail = refusal
        metrics.ERRORS.labels(kind).inc()
        await JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})(
            scope, receive, send
        )

    def host_refusal(self, headers: Headers) -> tuple[int, str, str] | None:
        if "*" in self.hosts:
            return None
        header = headers.get("host")
        if header is None:
            return 400, "bad_host", "Host header missing; send the server's address in it"
        name = host_name(header)
        if name in self.hosts or (self.any_ip and is_ip(name)):
            return None
        return 400, "bad_host", (
            f"Host {header[:100]!r}: not a name of this server; start it with '--allowed-host {name[:100]}' "
            "if that name should reach it"
        )

    def cross_site_refusal(self, scope: Scope, headers: Headers) -> tuple[int, str, str] | None:
        if scope["method"] in SAFE_METHODS or scope["path"] in READ_ONLY_POSTS:
            return None
        origin = headers.get("origin")
        if origin is not None:
            netloc = urlsplit(origin).netloc.lower()
            if (netloc and netloc == headers.get("host", "").lower()) or origin.rstrip("/") in self.trusted_origins:
                return None
            return 403, "cross_site", (
                f"{scope['method']} {scope['path']}: refused from origin {origin[:100]!r}, another site than this "
                "server's; send it from the server's own page, or from a client that is not a browser"
            )
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site not in SAME_SITE_FETCH:
            return 403, "cross_site", (
                f"{scope['method']} {scope['path']}: refused, the browser says it comes from another site "
                f"(Sec-Fetch-Site: {fetch_site[:40]})"
            )
        return None
