# SPDX-License-Identifier: BSD-3-Clause
# SPDX-FileCopyrightText: 2026 The py_oidc_auth_client developers
"""A small OIDC/OAuth 2.0 client for py-oidc-auth servers and standard OIDC providers.

One file, standard library only (``platformdirs`` is used when present), so it
can be installed with pip or copied into any project.

Quick start::

    from py_oidc_auth_client import authenticate

    token = authenticate(host="https://myapp.example.com")
    requests.get("https://myapp.example.com/api", headers=token["headers"])

``authenticate`` returns a cached access token while it is valid, refreshes it
when it is not, and only then starts an interactive login: the device flow
(RFC 8628), or the authorization code flow with PKCE (RFC 7636) and a loopback
redirect (RFC 8252) when the server has no device flow.  Tokens are kept per
host in a private JSON file; batch jobs can be pointed at a token file made on
a workstation with ``OIDC_TOKEN_FILE``.  With ``client_id=...`` the host is an
OpenID provider's issuer URL, talked to directly (Keycloak, Auth0, Entra ID, ...)::

    token = authenticate("https://keycloak.example.org/realms/science", client_id="cli")

From the shell::

    python -m py_oidc_auth_client https://myapp.example.com --json
    oidc-auth --list
"""

# Map of this file, in order; each section uses only those above it (but CodeFlow
# starts the loopback receiver, which has a section of its own after the flows):
#   Types                   AuthError and the cleaning of its text, Token, DeviceCode, Config
#   HTTP                    one request with a deadline; TLS, proxies, redirects, errors
#   Tokens & keys           token answers, lifetimes, JWS and RSA signatures
#   Store                   store keys, TokenStore, its lock and its private folder
#   Environment & terminal  batch jobs, browsers, prompts, notebook output
#   Standard providers      discovery, OAuth metadata, ID token claims
#   Flows                   BaseFlow, DeviceFlow (RFC 8628), CodeFlow (RFC 7636)
#   Loopback receiver       the code flow's redirect listener (RFC 8252)
#   authenticate            cached, refreshed or a new login; sync and async
#   Adapters                BearerAuth for requests and httpx
#   Command line            main() and its actions
#   Aliases                 the reference's submodule import paths

from __future__ import annotations

import contextvars
import math
import os
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict, TypeVar, cast

if TYPE_CHECKING:
    import asyncio
    import logging
    import socket
    import ssl
    from collections.abc import AsyncGenerator, Callable, Coroutine, Generator, Iterable, Sequence

    _F = TypeVar("_F", bound="BaseFlow")
    _T = TypeVar("_T")

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Config",
    "DeviceCode",
    "Token",
    "TokenStore",
    "BaseFlow",
    "CodeFlow",
    "DeviceFlow",
    "authenticate",
    "authenticate_async",
    "BearerAuth",
    "main",
]


def _logger() -> logging.Logger:
    """The module's logger; logging is imported only when something is logged."""
    import logging

    while _LOG_SETUP:  # the command line's handler, made on first use
        _LOG_SETUP.pop()()
    return logging.getLogger(__name__)


_LOG_SETUP: list[Callable[[], None]] = []


# json (with its decoder, scanner and encoder) is imported on first use, not by every import.
def _loads(data: bytes | str, **hooks: Any) -> Any:
    import json

    return json.loads(data, **hooks)


def _dumps(value: Any, **options: Any) -> str:
    import json

    return json.dumps(value, **options)


_MAX_BODY = 1 << 20  # 1 MiB: no token answer is anywhere near this
_HTTP_TIMEOUT = 30.0  # per request, also when the flow itself may wait forever
# Token files are never opened through a symbolic link (Windows has no O_NOFOLLOW: its
# links need privileges to make); O_CLOEXEC: no child process inherits them.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_LOCK_TIMEOUT = 60.0  # a refresh (with retries) holds the store lock at most this long
_MAX_MARGIN = 60  # seconds before expiry at which a token counts as expired
_UNKNOWN_REFRESH_LIFETIME = 30 * 86400
_RETRIES = 4
# py-oidc-auth answers these when it has no device flow to offer (DESIGN.md).
_NO_DEVICE_STATUS = frozenset({404, 405, 501, 503})
_DOCUMENT_TTL = 3600.0  # discovery documents and JWKS are fetched again after an hour
_CLOCK_SKEW = 120  # seconds of clock difference tolerated in ID token exp/iat
_DEFAULT_SCOPES = ("offline_access", "openid")
_BATCH_VARIABLES = {
    "SLURM_JOB_ID": "Slurm",
    "PBS_JOBID": "PBS/Torque",
    "SGE_TASK_ID": "Grid Engine",
    "LSB_JOBID": "LSF",
    "OAR_JOB_ID": "OAR",
    "FLUX_JOB_ID": "Flux",
    "COBALT_JOBID": "Cobalt",
    "LOADL_STEP_ID": "LoadLeveler",
    "_CONDOR_JOB_AD": "HTCondor",
}


# ---------------------------------------------------------------------------
# Types: errors (and the cleaning of the server text they carry), tokens, configuration
# ---------------------------------------------------------------------------

# C0 and C1 controls (ESC starts terminal commands) and the bidi overrides that
# reorder text: removed from server and callback text before anyone reads it.
_CONTROLS = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F),
                           *range(0x2066, 0x206A)])
_CONTROLS.update(dict.fromkeys(map(ord, "\t\n\r"), " "))


def _printable(text: str) -> str:
    """*text* without control characters: safe for a terminal, a log or a message."""
    return text.translate(_CONTROLS)


def _short(text: str, limit: int = 200) -> str:
    """Server text for a message: printable, on one line, at most *limit* characters."""
    text = " ".join(_printable(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AuthError(Exception):
    """Authentication or token exchange failed.

    Parameters
    ----------
    message : str
        What went wrong, for a human.
    detail : dict, optional
        The provider's error payload (``"error"``, ``"error_description"``), or ``{}``.
    status_code : int
        The server's own status when it answered with an error (400
        ``invalid_grant``, 401 ``invalid_client``, ...), otherwise one of

        - 400: bad input (host URL, option, CA bundle, token file);
        - 401: not logged in, and no login can start here (batch job, no terminal);
        - 408: the login took longer than ``timeout``;
        - 500: a failure on this machine (token store, no free port);
        - 502: an unusable answer (not JSON, a field missing, an ID token or
          issuer that does not check out, cut mid-answer);
        - 503: the server cannot be reached (refused, unknown host, TLS);
        - 504: no answer in time.

    Notes
    -----
    The parameters are kept as attributes. ``str(exc)`` is the message,
    followed by the provider's ``error`` and ``error_description`` when the
    message does not already say them.
    """

    # Private marks set by the HTTP layer. Not subclasses: whatever fails, the
    # caller's traceback names AuthError, the class they catch.
    _retry = False  # worth retrying: no answer at all, or a 502/503/504
    _retry_after: float | None = None  # seconds, from a Retry-After header
    _answered = False  # the server's own error answer (its status), not one made here

    def __init__(
        self, message: str, detail: dict[str, Any] | None = None, status_code: int = 500
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail or {}
        self.status_code = status_code

    def __str__(self) -> str:
        message = str(self.message)
        parts = (self.error, self.detail.get("error_description"))
        said = [_short(str(part)) for part in parts if part and str(part) not in message]
        return f"{message} ({': '.join(said)})" if said else message

    @property
    def error(self) -> str:
        """The OAuth error code (``"access_denied"``, ...) or ``""``."""
        return str(self.detail.get("error") or "")


def _transient(message: str, status_code: int, detail: dict[str, Any] | None = None) -> AuthError:
    """An AuthError worth retrying: refused, cut, timed out, or a 502/503/504 answer."""
    exc = AuthError(message, detail, status_code)
    exc._retry = True
    return exc


class _NoDeviceFlow(AuthError):
    """The server does not offer the device authorization flow."""


class Token(TypedDict):
    """OAuth 2.0 token, as returned by ``authenticate`` and the flows.

    Attributes
    ----------
    access_token, token_type : str
        The bearer access token (a JWT) and its type, ``"Bearer"``.
    expires, refresh_expires : int
        Expiry of the access and the refresh token, Unix time in seconds.
    refresh_token : str
        For new access tokens; ``""`` when the server gave none.
    scope : str
        The granted scopes, space separated.
    headers : dict of str to str
        The ``Authorization`` header, ready for an HTTP client.
    """

    access_token: str
    token_type: str
    expires: int
    refresh_token: str
    refresh_expires: int
    scope: str
    headers: dict[str, str]


class DeviceCode(TypedDict):
    """Device authorization answer of ``get_device_code()``; ``poll()`` completes it.

    Attributes
    ----------
    uri : str
        The page to open (``verification_uri_complete`` when the provider sends one).
    user_code : str
        The code the user enters there.
    device_code : str
        Opaque code for polling the token endpoint.
    interval : int
        Seconds between polls, at least.
    """

    uri: str
    user_code: str
    device_code: str
    interval: int


_TOKEN_FILE_VAR = "OIDC_TOKEN_FILE"  # names a token file to use instead of the cache


class Config:
    """Connection and routing configuration of a server.

    Parameters
    ----------
    host : str
        The application server's base URL (``"https://myapp.example.com"``), or
        with ``client_id`` the provider's issuer URL.
    redirect_ports : list of int, optional
        Ports to try, in order, for the code flow's loopback redirect; 53100 to
        53105 when None.
    token_env_var : str
        The environment variable that may name a token file.
    app_name : str
        Names the platform cache folder that holds the tokens.
    login_route, token_route, device_route : str
        The py-oidc-auth server's routes; unused with ``client_id``.
    client_id, client_secret : str or None
        A standard OpenID provider's client, talked to directly; the secret
        only for a confidential client.
    scopes : list of str or None
        Scopes to ask a standard provider for; ``["openid", "offline_access"]``
        when None.
    ca_bundle : str or None
        A PEM file of CA certificates to trust instead of the system's; when
        None, ``REQUESTS_CA_BUNDLE`` or ``SSL_CERT_FILE`` if set.
    allow_http : bool
        Allow plain ``http://`` to another machine (tokens then travel in
        clear); ``OIDC_ALLOW_HTTP=1`` does the same.
    """

    # Written out rather than a @dataclass: importing dataclasses (and the inspect,
    # ast and dis modules it pulls in) would double the cost of importing this module.
    # The fields are the attributes that __init__ sets, in its order.

    def __init__(
        self,
        host: str,
        redirect_ports: list[int] | None = None,
        token_env_var: str = _TOKEN_FILE_VAR,
        app_name: str = "py-oidc-auth",
        login_route: str = "/auth/v2/login",
        token_route: str = "/auth/v2/token",
        device_route: str = "/auth/v2/device",
        client_id: str | None = None,
        client_secret: str | None = None,
        scopes: list[str] | None = None,
        ca_bundle: str | None = None,
        allow_http: bool = False,
    ) -> None:
        self.host = host
        self.redirect_ports: list[int] = (
            list(range(53100, 53106)) if redirect_ports is None else redirect_ports)
        self.token_env_var = token_env_var
        self.app_name = app_name
        self.login_route = login_route
        self.token_route = token_route
        self.device_route = device_route
        self.client_id = client_id
        self.client_secret = client_secret
        self.scopes = scopes
        self.ca_bundle = ca_bundle
        self.allow_http = allow_http

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in vars(self).items()
                          if name != "client_secret")  # never in a repr
        return f"Config({shown})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass

    def _replace(self, **changes: Any) -> Config:
        return Config(**{**vars(self), **changes})


# ---------------------------------------------------------------------------
# HTTP: one request with a deadline, TLS, proxies, redirects and errors
# ---------------------------------------------------------------------------

_ALLOW_HTTP_VAR = "OIDC_ALLOW_HTTP"
# X509_V_ERR_* codes that mean "signed by a CA we do not know": a private CA.
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})
# The deadline of the login under way and its length in seconds: no request made
# for it runs more than _LATE_GRACE past that, whatever its own timeout (_TimeLimit).
_TIME_LIMIT: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "_TIME_LIMIT", default=None)
_LATE_GRACE = 1.0
# Made on first use, kept for the process: an opener per proxy settings and CA bundle,
# an SSL context per CA bundle, hosts warned of plain http.
_OPENERS: dict[tuple[Any, ...], Any] = {}
_SSL_CONTEXTS: dict[tuple[str, str, str], ssl.SSLContext] = {}
_WARNED_HTTP: set[str] = set()
_FETCHED: dict[str, tuple[float, dict[str, Any]]] = {}  # URL -> (fetched at, JSON)


def _is_loopback(hostname: str) -> bool:
    """Whether *hostname* (no brackets, no port) names this machine."""
    name = hostname.lower().strip("[]")
    return name == "localhost" or name.endswith(".localhost") or name == "::1" or (
        name.startswith("127.") and name.replace(".", "").isdigit()
    )


class _Response:
    __slots__ = ("body", "headers", "status", "url")

    # headers: the answer's own, whose get() ignores case (or a dict)
    def __init__(self, url: str, status: int, headers: Any, body: bytes) -> None:
        self.url, self.status, self.headers, self.body = url, status, headers, body

    def json(self) -> dict[str, Any] | None:
        return _json_object(self.body)


def _json_object(data: bytes | str) -> dict[str, Any] | None:
    """*data* as a JSON object, or None when it is anything else (HTML, a list, garbage)."""
    try:
        value = _loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _Session:
    """The module's own small HTTP session over ``urllib`` (no httpx)."""

    def __init__(self, timeout: float | None = None, ca_bundle: str | None = None,
                 allow_http: bool = False) -> None:
        self.timeout = min(timeout or _HTTP_TIMEOUT, _HTTP_TIMEOUT)
        self.ca_bundle = ca_bundle
        self.allow_http = allow_http

    async def request(
        self, method: str, url: str, *, form: dict[str, str] | None = None, follow: bool = True,
        auth: tuple[str, str] | None = None, timeout: float | None = None,
    ) -> _Response:
        """Send one request, status unchecked; it ends in time (*timeout*), come what may."""
        import asyncio

        refusal = _insecure(url, self.allow_http)
        if refusal:
            raise AuthError(refusal, {"error": "insecure_transport"}, 400)
        now = time.monotonic()
        timeout = self.timeout if timeout is None else timeout
        deadline, limit = now + timeout, _TIME_LIMIT.get()
        if limit is not None:
            # A request made just in time (a last poll, the code exchange after a login
            # done in time) may finish a little after the limit: an answer in time counts.
            deadline = min(deadline, limit[0] + _LATE_GRACE)
            if deadline <= now:
                raise AuthError(f"{method} {url} not sent: the {limit[1]:g} s time limit of the "
                                "login ran out (timeout=, --timeout)", {"error": "timeout"}, 408)
        # Only a GET without credentials follows redirects: urllib would carry the secrets
        # elsewhere. Any other redirect is an AuthError, unless follow is False.
        safe = follow and method == "GET" and form is None and auth is None
        sockets: list[Any] = []
        done = _in_daemon_thread(_request_blocking, method, url, form, deadline, safe, auth,
                                 self.ca_bundle, self.allow_http, sockets)
        try:
            # The worker stops itself at the deadline; this is for a server that drips
            # its headers, which urllib reads line by line with no deadline of its own.
            resp = await asyncio.wait_for(done, deadline - time.monotonic() + 0.25)
        except asyncio.TimeoutError:
            _abort(sockets)
            raise _transient(f"{method} {url} timed out after "
                             f"{min(timeout, deadline - now):.3g} s", 504) from None
        except asyncio.CancelledError:  # Ctrl-C, or the caller's own timeout: hang up now
            _abort(sockets)
            raise
        location = resp.headers.get("Location")
        if follow and not safe and resp.status in (301, 302, 303, 307, 308) and location:
            raise _redirect_refused(method, url, resp.status, location, "a request that "
                                    "carries credentials never follows a redirect: configure "
                                    "the endpoint's final URL")
        return resp

    async def post_form(
        self, url: str, form: dict[str, str], *, deadline: float | None = None,
        auth: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """The JSON object a POST of *form* answers; transient faults retried until *deadline*."""
        async def send(end: float | None) -> dict[str, Any]:
            timeout = self.timeout
            if end is not None:
                # A request made at the deadline (a last poll) gets the grace that
                # request() allows it, not less: a far server needs that long.
                timeout = max(_LATE_GRACE, min(timeout, end - time.monotonic()))
            resp = await self.request("POST", url, form=form, auth=auth, timeout=timeout)
            payload = resp.json()
            if resp.status >= 400:
                raise _http_error(resp, payload, [*form.values(), *(auth or ())])
            if payload is None:
                kind = "HTML" if resp.body.lstrip()[:1] == b"<" else "not a JSON object"
                raise AuthError(f"POST {url} answered {resp.status} with {kind}; is this the "
                                "right host and route?", status_code=502)
            return payload

        return await _retrying(send, deadline)


def _redirect_refused(method: str, url: str, status: int, location: str, why: str) -> AuthError:
    return AuthError(f"{method} {url} answered {status}, a redirect to {_short(location, 100)}; "
                     f"{why}", {"error": "redirect"}, status)


def _in_daemon_thread(func: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
    """*func* in a daemon thread: a stuck read in asyncio.to_thread's would hold the exit."""
    import asyncio
    import concurrent.futures
    import threading

    done: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def work() -> None:
        if not done.set_running_or_notify_cancel():  # the caller gave up before the start
            return
        try:
            done.set_result(func(*args))
        except BaseException as exc:  # handed to the caller, who raises it
            done.set_exception(exc)

    threading.Thread(target=work, name="oidc-auth-http", daemon=True).start()
    return asyncio.wrap_future(done)


def _abort(sockets: Iterable[Any]) -> None:
    """End a request stuck in a read: a shut down socket reads as closed at once."""
    import socket

    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _request_blocking(
    method: str, url: str, form: dict[str, str] | None, deadline: float, follow: bool,
    auth: tuple[str, str] | None, ca_bundle: str | None, allow_http: bool, sockets: list[Any],
) -> _Response:
    import http.client
    import urllib.error
    import urllib.parse
    import urllib.request

    data = urllib.parse.urlencode(form).encode() if form is not None else None
    headers = {"Accept": "application/json", "User-Agent": f"oidc-auth-onefile/{__version__}"}
    if data is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if auth is not None:  # client_secret_basic: both parts form-encoded first (RFC 6749, 2.3.1)
        import base64

        pair = ":".join(urllib.parse.quote_plus(part) for part in auth)
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    # Only http(s) URLs get here: hosts are checked by _normalise_host.
    request: Any = urllib.request.Request(url, data=data, headers=headers,  # noqa: S310
                                          method=method)
    # Read by the handlers of _opener.
    request.sockets, request.follow, request.allow_http = sockets, follow, allow_http
    proxy = _proxy_for(url)
    where = f"{method} {url}" + (f" (via proxy {proxy})" if proxy else "")
    opener = _opener(ca_bundle)
    try:
        try:
            resp = opener.open(request, timeout=max(0.001, deadline - time.monotonic()))
        except urllib.error.HTTPError as exc:  # also 3xx when redirects are not followed
            resp = exc
        with resp:
            return _Response(url, resp.status, resp.headers or {},
                             _read_capped(resp, where, deadline, request.sockets))
    except urllib.error.URLError as exc:
        raise _transport_error(where, exc.reason, ca_bundle, proxy) from None
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:  # shut down by _abort, or a read at the deadline
            raise _transient(f"{where}: timed out", 504) from None
        raise _transport_error(where, exc, ca_bundle, proxy) from None


def _read_capped(resp: Any, where: str, deadline: float, sockets: Sequence[Any]) -> bytes:
    import http.client

    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:  # a server that drips its body
            raise _transient(f"{where}: timed out reading the answer", 504)
        for sock in sockets[-1:]:  # each read waits at most for what is left
            try:
                sock.settimeout(min(left, _HTTP_TIMEOUT))
            except OSError:  # closed: http.client has the rest of the answer (3.13+)
                pass
        chunk: bytes = resp.read1(_MAX_BODY + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_BODY:
            raise AuthError(f"{where} answered {resp.status} with more than {_MAX_BODY >> 20} MiB; "
                            "that is not a token answer", status_code=502)
    body = b"".join(chunks)
    # A short read is no error to urllib when the peer closes early.
    length = (resp.headers.get("Content-Length") or "").strip()
    if length.isdigit() and len(body) < int(length):
        raise http.client.IncompleteRead(body, int(length) - len(body))
    _logger().debug("%s -> %d (%d bytes)", where, resp.status, len(body))  # never the body
    return body


def _transport_error(where: str, reason: object, ca_bundle: str | None, proxy: str) -> AuthError:
    import http.client
    import socket
    import ssl

    if isinstance(reason, ssl.SSLCertVerificationError):
        return _untrusted(where, reason, ca_bundle)
    if isinstance(reason, ssl.SSLError):
        return AuthError(f"{where}: TLS error: {reason}", status_code=503)
    if isinstance(reason, socket.gaierror):
        return AuthError(f"{where}: cannot resolve the host name; check the URL ({reason})",
                         status_code=503)
    if isinstance(reason, ConnectionRefusedError):
        return _transient(f"{where}: connection refused; is the "
                          f"{'proxy' if proxy else 'server'} running?", 503)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return _transient(f"{where}: timed out", 504)
    if isinstance(reason, (ConnectionError, EOFError, http.client.IncompleteRead,
                           http.client.BadStatusLine)):
        # The server took the request and broke off (RemoteDisconnected is a
        # ConnectionError): a bad answer, so 502.
        return _transient(f"{where}: connection lost ({type(reason).__name__})", 502)
    return AuthError(f"{where}: request failed ({_short(str(reason))})", status_code=503)


def _untrusted(where: str, reason: ssl.SSLCertVerificationError,
               ca_bundle: str | None) -> AuthError:
    """The refused certificate explained, with the fix when a CA is missing."""
    if reason.verify_code not in _UNKNOWN_ISSUER:
        return AuthError(f"{where}: the server's TLS certificate was refused "
                         f"({reason.verify_message})", status_code=503)
    bundle, source = _ca_bundle(ca_bundle)
    trusted = "the system's CA certificates"
    if bundle:
        missing = "" if os.path.exists(os.path.expanduser(bundle)) else ", which does not exist"
        trusted = f"the CA bundle {bundle} (from {source}{missing})"
    return AuthError(
        f"{where}: the server's TLS certificate is not trusted ({reason.verify_message}) by "
        f"{trusted}. If the server uses a private or company CA, set SSL_CERT_FILE (or "
        "REQUESTS_CA_BUNDLE) to a PEM file holding that CA, or pass ca_bundle=PATH",
        {"error": "untrusted_certificate"}, 503,
    )


def _opener(ca_bundle: str | None) -> Any:
    """A cached opener for the current proxies and CA bundle; it notes sockets, judges redirects."""
    import urllib.request

    # urllib's proxies: HTTPS_PROXY/HTTP_PROXY (the system settings on macOS and
    # Windows), read on each request so that a change is seen; it checks NO_PROXY itself.
    proxies = urllib.request.getproxies()
    context_key, context = _ssl_context(ca_bundle)
    key = (tuple(sorted(proxies.items())), context_key)
    if key in _OPENERS:
        return _OPENERS[key]

    # Subclassed here: at module level, urllib.request, http.client and ssl would be
    # imported with this module.
    class Handler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
        def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
            class Noting(http_class):  # type: ignore[misc]
                def connect(self) -> None:  # each socket, for _abort and _read_capped
                    super().connect()
                    req.sockets.append(self.sock)

            return super().do_open(Noting, req, **kwargs)

    class Redirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                             newurl: str) -> Any:
            if not req.follow:  # _Session.request reads the 3xx itself
                return None
            # To https, or to an allowed http URL; never from https down to http.
            if not newurl.lower().startswith("https://") and (
                req.full_url.lower().startswith("https://") or _insecure(newurl, req.allow_http)
            ):
                fp.close()
                raise _redirect_refused("GET", req.full_url, code, newurl, "not followed: a "
                                        "redirect may lead to https (or allowed http), never "
                                        "from https to http")
            new: Any = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None:
                new.sockets, new.follow, new.allow_http = req.sockets, True, req.allow_http
            return new

    _OPENERS[key] = urllib.request.build_opener(
        urllib.request.ProxyHandler(proxies), Handler(context=context), Redirect())
    return _OPENERS[key]


def _insecure(url: str, allow_http: bool = False) -> str:
    """Why *url* must not be used, or ``""``; allowed plain http is warned of once per host."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), _printable(parts.hostname or "")
    if scheme == "https" or (scheme == "http" and _is_loopback(parts.hostname or "")):
        return ""
    if scheme != "http":
        return f"{_short(url, 100)} is not an https URL"
    if not allow_http and os.environ.get(_ALLOW_HTTP_VAR, "") in ("", "0"):
        return (f"Refused to send anything to {_short(url, 100)}: plain http to "
                f"{host}, another machine, would carry tokens and secrets in clear. Use https, "
                f"or allow plain http explicitly: {_ALLOW_HTTP_VAR}=1 in the environment, or "
                "allow_http=True (--allow-http on the command line)")
    if host not in _WARNED_HTTP:
        _WARNED_HTTP.add(host)
        _logger().warning("plain http to %s is allowed: tokens and secrets travel in clear", host)
    return ""


def _proxy_for(url: str) -> str:
    """The proxy urllib sends *url* through, without credentials; ``""`` for none."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme, "")
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return ""
    proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return f"{proxy_parts.scheme}://{proxy_parts.netloc.rpartition('@')[2]}"


def _ca_bundle(option: str | None) -> tuple[str, str]:
    """The CA bundle to trust and who chose it; ``("", "")`` for the system default."""
    if option:
        return option, "ca_bundle"
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(name):
            return os.environ[name], name
    return "", ""


def _ssl_context(option: str | None) -> tuple[tuple[str, str, str], ssl.SSLContext]:
    """One cached context per CA bundle, and its cache key."""
    bundle, source = _ca_bundle(option)
    if source in ("", "SSL_CERT_FILE"):
        # OpenSSL reads SSL_CERT_FILE and SSL_CERT_DIR itself (its default paths);
        # REQUESTS_CA_BUNDLE is a requests convention that urllib does not know.
        key = ("", os.environ.get("SSL_CERT_FILE", ""), os.environ.get("SSL_CERT_DIR", ""))
    else:
        key = (os.path.expanduser(bundle), source, "")
    context = _SSL_CONTEXTS.get(key)
    if context is None:
        import ssl

        try:  # as in requests and curl, a bundle replaces the system's CAs
            context = ssl.create_default_context(cafile=key[0] or None)
        except OSError as exc:  # also ssl.SSLError: not PEM certificates
            raise AuthError(f"Cannot use the CA bundle {bundle} (from {source}): "
                            f"{exc.strerror or exc}; point {source} at a PEM file of CA "
                            "certificates", status_code=400) from None
        _SSL_CONTEXTS[key] = context
    return key, context


def _http_error(resp: _Response, payload: Any, secrets: Iterable[str] = ()) -> AuthError:
    """The error answer *resp* as an AuthError; any of *secrets* it echoes is blanked out."""
    secrets = list(secrets)

    def clean(text: str, limit: int = 200) -> str:
        # Printable first (a control byte inside an echoed secret would defeat the
        # match), redacted next, cut last: a cut secret would survive as a prefix.
        return _short(_blank(_printable(text), secrets), limit)

    error, description = _oauth_error(payload)
    error, description = clean(error, 100), clean(description)
    text = f"{error}: {description}" if error and description else error or description
    if not text:
        text = (clean(resp.body.decode("utf-8", "replace")) if payload is not None
                else "no OAuth error in the answer")
    detail = {"error": error, "error_description": description} if error else {}
    message = f"{resp.url} answered {resp.status}: {text}"
    if resp.status in (502, 503, 504) and not error:  # a passing fault
        exc = _transient(message, resp.status, detail)
        retry_after = (resp.headers.get("Retry-After") or "").strip()
        if retry_after.isascii() and retry_after.isdigit():  # "²".isdigit() is true as well
            exc._retry_after = min(float(retry_after), 60.0)
    else:
        exc = AuthError(message, detail, resp.status)
    exc._answered = True
    return exc


def _blank(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted((s for s in secrets if len(s) >= 8), key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return text


def _oauth_error(payload: Any) -> tuple[str, str]:
    """``(error, error_description)`` at the top level or nested in ``detail``; text as is."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, str) and error:
            return error, str(payload.get("error_description") or "")
        if "detail" in payload:
            return _oauth_error(payload["detail"])
    elif isinstance(payload, str):
        # py-oidc-auth wraps the provider's answer: "Upstream OIDC error: {...}".
        inner = _json_object(payload[payload.find("{"):]) if "{" in payload else None
        if inner is not None:
            error, description = _oauth_error(inner)
            if error:
                return error, description
        return "", payload
    return "", ""


async def _retrying(send: Callable[[float | None], Coroutine[Any, Any, _T]],
                    deadline: float | None = None) -> _T:
    """``await send(deadline)``, again after transient faults, with backoff, while time allows."""
    limit = _TIME_LIMIT.get()
    if limit is not None:  # no retry past the login's time limit either
        deadline = limit[0] if deadline is None else min(deadline, limit[0])
    attempt = 0
    while True:
        try:
            return await send(deadline)
        except AuthError as exc:
            if not exc._retry:
                raise
            attempt += 1
            delay = _backoff(attempt, exc)
            if attempt > _RETRIES or (
                deadline is not None and time.monotonic() + delay >= deadline
            ):
                # Still marked _retry: a passing fault (discovery asks again next time).
                exc.message = f"{exc.message} (gave up after {attempt} attempts)"
                exc.args = (exc.message,)
                raise
            _logger().debug("retrying in %.1f s after: %s", delay, exc.message)
            await _sleep(delay)


class _TimeLimit:
    """``with _TimeLimit(seconds):`` no request inside runs past *seconds* from now."""

    def __init__(self, seconds: float | None) -> None:
        limit = _TIME_LIMIT.get()
        if seconds is not None and (limit is None or time.monotonic() + seconds < limit[0]):
            limit = (time.monotonic() + seconds, float(seconds))
        self.limit = limit

    def __enter__(self) -> None:
        self.token = _TIME_LIMIT.set(self.limit)

    def __exit__(self, *exc: object) -> None:
        _TIME_LIMIT.reset(self.token)


def _time_left(seconds: float | None) -> float | None:
    """*seconds*, or less when the login's time limit comes sooner; None waits forever."""
    limit = _TIME_LIMIT.get()
    if limit is None:
        return seconds
    left = max(0.0, limit[0] - time.monotonic())
    return left if seconds is None else min(seconds, left)


def _time_limit(seconds: float | None) -> float:
    """The login's time limit in seconds, as the user gave it (for messages)."""
    limit = _TIME_LIMIT.get()
    return limit[1] if limit is not None else (seconds or 0)


def _backoff(attempt: int, exc: AuthError) -> float:
    import random

    if exc._retry_after is not None:
        return exc._retry_after
    return min(8.0, 0.5 * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)  # noqa: S311


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(max(0.0, seconds))


def _with_query(url: str, params: dict[str, str]) -> str:
    """*url* with *params* added to its query (an endpoint may have one already)."""
    from urllib.parse import urlencode

    return url + ("&" if "?" in url else "?") + urlencode(params)


async def _fetch_json(url: str, session: _Session, *, fresh: bool = False) -> dict[str, Any]:
    """GET a JSON object, kept in memory for an hour (discovery documents, JWKS)."""
    cached = _FETCHED.get(url)
    if cached is not None and not fresh and time.monotonic() < cached[0]:
        return cached[1]
    resp = await _retrying(lambda _: session.request("GET", url))
    doc = resp.json()
    if resp.status != 200 or doc is None:
        what = f"answered {resp.status}" if resp.status != 200 else "is not a JSON object"
        raise AuthError(f"GET {url} {what}; is the issuer URL right?", status_code=502)
    if len(_FETCHED) > 64:
        _FETCHED.clear()
    _FETCHED[url] = (time.monotonic() + _DOCUMENT_TTL, doc)
    return doc


def _web_url(url: object, what: str, allow_http: bool = False) -> str:
    """*url* if it may be opened or shown as a link, else an AuthError naming it."""
    # It ends up on a browser's command line and in a notebook's link.
    from urllib.parse import urlsplit

    text = url if isinstance(url, str) else ""
    try:
        host = urlsplit(text).hostname
    except ValueError:  # e.g. an unclosed [ in the host
        host = None
    if (not host or text.startswith("-") or _printable(text) != text
            or any(c.isspace() for c in text) or _insecure(text, allow_http)):
        raise AuthError(f"The server sent {what} {_short(str(url), 100)!r}, which is not an "
                        "https:// URL with a host; it was neither opened nor shown. Tell the "
                        "server's operators", status_code=502)
    return text


# ---------------------------------------------------------------------------
# Tokens & keys: token answers, lifetimes, JWS and RSA signatures
# ---------------------------------------------------------------------------

_MAX_LIFETIME = 10 * 365 * 86400  # seconds: longer lifetimes from a server are cut to this
# What this process learnt of an access token beyond its Token: the lifetime it was
# granted (the expiry margin depends on it; the store saves it for other processes) and
# whether a server refused it with a 401 (BearerAuth; it then counts as expired). Keyed
# by the access token, process-wide: a Token is a plain dict any flow or store may hold.
_SEEN: dict[str, tuple[int, bool]] = {}


def _seen(access: str, lifetime: int, refused: bool = False) -> None:
    if len(_SEEN) > 4096:  # a cache: what it forgets is read from the token again
        _SEEN.clear()
    _SEEN[access] = (lifetime, refused)


def _make_token(raw: dict[str, Any], previous: Token | None = None) -> Token:
    """Turn a token answer into a ``Token``; keep a refresh token that was not rotated."""
    now = int(time.time())
    access = raw.get("access_token")
    if not isinstance(access, str) or not access:
        raise AuthError("The token answer has no access_token", status_code=502)
    token_type = str(raw.get("token_type") or "Bearer").strip()
    # Both go into an Authorization header and onto a terminal (--header) as they are.
    word = token_type.replace("-", "").replace("_", "").replace(".", "")
    if _printable(access) != access or " " in access or not (word.isascii() and word.isalnum()):
        raise AuthError(f"The token answer's access_token or its token_type "
                        f"({_short(_dumps(token_type), 40)}) holds spaces or control "
                        "characters; it cannot be used in an HTTP header", status_code=502)
    expires = _timestamp(raw, "expires", now)
    if expires is None:
        expires = _timestamp(_jwt_claims(access), "exp", now) or now + 300
    if expires <= now:
        raise AuthError("The server sent an access token that has already expired; check "
                        "that this machine's clock is right", status_code=502)
    refresh = raw.get("refresh_token")
    if isinstance(refresh, str) and refresh:
        refresh_expires = _timestamp(raw, "refresh_expires", now)
        # py-oidc-auth invents now + 180 s when the provider gives no lifetime.
        if refresh_expires is None or abs(refresh_expires - now - 180) <= 3:
            refresh_expires = (_timestamp(_jwt_claims(refresh), "exp", now)
                               or now + _UNKNOWN_REFRESH_LIFETIME)
    elif previous is not None:
        refresh, refresh_expires = previous["refresh_token"], previous["refresh_expires"]
    else:
        refresh, refresh_expires = "", 0
    if token_type.lower() == "bearer":
        token_type = "Bearer"
    scope = raw.get("scope")
    _seen(access, expires - now)
    return _token(access, token_type, expires, refresh, refresh_expires,
                  scope if isinstance(scope, str) else "")


def _token(
    access: str, token_type: str, expires: int, refresh: str, refresh_expires: int, scope: str
) -> Token:
    return {
        "access_token": access,
        "token_type": token_type,
        "expires": expires,
        "refresh_token": refresh,
        "refresh_expires": refresh_expires,
        "scope": scope,
        "headers": {"Authorization": f"{token_type} {access}"},
    }


def _timestamp(raw: dict[str, Any], name: str, now: int) -> int | None:
    """An expiry from *name* or *name*_at (absolute) or *name*_in (relative); else None."""
    # A relative 0 means "no known expiry" (Keycloak's offline tokens); _finite drops
    # NaN, Infinity and text; lifetimes past _MAX_LIFETIME are cut to it.
    for key in (name, f"{name}_at"):
        value = _finite(raw.get(key))
        if value is not None and value > 0:
            return int(min(value, now + _MAX_LIFETIME))
    value = _finite(raw.get(f"{name}_in"))
    return now + int(min(value, _MAX_LIFETIME)) if value else None


def _finite(value: object) -> float | None:
    """A finite number from a server (a JSON number or a string of digits), else None."""
    if isinstance(value, str):  # some servers send "3600"
        return float(value) if value.isascii() and value.isdigit() and len(value) < 16 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    # False for NaN, the infinities and an int beyond any float
    return float(value) if abs(value) <= sys.float_info.max else None


def _jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, not verified (only to read timestamps); ``{}`` if none."""
    try:
        return _jws_parts(token)[1]
    except AuthError:
        return {}


class _NotFinite(ValueError):
    """NaN, Infinity or a number too large for a float, in JSON from a server."""


def _strict_json(data: bytes | str) -> Any:
    """``json.loads`` that refuses what Python's json accepts beyond the JSON grammar."""
    def refuse(text: str) -> Any:
        raise _NotFinite(text)

    def finite(text: str) -> float:
        number = float(text)
        return number if math.isfinite(number) else refuse(text)

    return _loads(data, parse_constant=refuse, parse_float=finite)


def _margin(token: Token) -> int:
    """60 s, or half the granted lifetime when that is shorter."""
    return min(_MAX_MARGIN, max(_lifetime(token), 0) // 2)


def _lifetime(token: Token) -> int:
    """The access token's granted lifetime: as received, stored, or from its JWT claims."""
    access = token["access_token"]
    if access in _SEEN:
        return _SEEN[access][0]
    claims = _jwt_claims(access)
    exp, iat = _finite(claims.get("exp")), _finite(claims.get("iat"))
    # Unknown: twice the margin, so the full margin applies.
    lifetime = int(exp - iat) if exp is not None and iat is not None else 2 * _MAX_MARGIN
    _seen(access, lifetime)
    return lifetime


def _access_valid(token: Token, now: float | None = None) -> bool:
    return token["expires"] - _margin(token) > (now or time.time()) and not _SEEN.get(
        token["access_token"], (0, False))[1]


def _refresh_valid(token: Token) -> bool:
    return bool(token["refresh_token"]) and token["refresh_expires"] - _margin(token) > time.time()


# -- ID tokens (OpenID Connect Core 1.0, 3.1.3.7) --

# DigestInfo prefixes of EMSA-PKCS1-v1_5 (RFC 8017, 9.2 note 1).
_RSA_DIGESTS = {
    "RS256": ("sha256", "3031300d060960864801650304020105000420"),
    "RS384": ("sha384", "3041300d060960864801650304020205000430"),
    "RS512": ("sha512", "3051300d060960864801650304020305000440"),
}
_PSS_DIGESTS = {"PS256": "sha256", "PS384": "sha384", "PS512": "sha512"}  # RFC 7518, 3.5
_HMAC_DIGESTS = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
# Algorithms this module cannot verify, with the key type that signs them. OIDC Core
# 3.1.3.7 (6) lets a client trust an ID token on the strength of the TLS connection to
# the token endpoint; we do so only for these, only when the provider lists the
# algorithm and its key set holds a key that can have made the signature.
_UNVERIFIED_ALGS = {"ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP"}


def _jws_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """``(header, claims, signing input, signature)`` of a compact JWS."""
    parts = token.split(".")
    try:
        if len(parts) != 3:
            raise ValueError
        header, claims = (_strict_json(_b64decode(part)) for part in parts[:2])
        signature = _b64decode(parts[2])
    except _NotFinite as exc:
        raise _id_token_refused(f"it holds the number {_short(str(exc), 20)}, which is not "
                                "finite") from None
    except ValueError:
        header = claims = None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _id_token_refused("it is not a signed JWT")
    return header, claims, f"{parts[0]}.{parts[1]}".encode(), signature


def _id_token_refused(problem: str) -> AuthError:
    return AuthError(f"The provider's ID token was refused: {problem}",
                     {"error": "invalid_id_token"}, 502)


def _b64decode(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _alg_problem(alg: object, meta: dict[str, Any], secret: str | None) -> str:
    """Why an ID token signed with *alg* is refused before any key is fetched; "" if not."""
    if alg is None or (isinstance(alg, str) and alg.strip().lower() in ("", "none")):
        return f"it is not signed (alg {_short(_dumps(alg), 40)})"
    if not isinstance(alg, str):
        return f"its alg header {_short(_dumps(alg), 40)} is not an algorithm name"
    known = [*_RSA_DIGESTS, *_PSS_DIGESTS, *_HMAC_DIGESTS, *_UNVERIFIED_ALGS]
    if alg not in known:
        return f"its algorithm {_short(_dumps(alg), 40)} is not one of {', '.join(known)}"
    if alg in _HMAC_DIGESTS:
        return "" if secret else (
            f"it is signed with {alg}, which needs the client secret, and none is configured")
    if not meta.get("jwks_uri"):  # the key set: RSA keys, or the key an unverified alg needs
        return f"it is signed with {alg}, and the provider publishes no jwks_uri"
    if alg not in _UNVERIFIED_ALGS:
        return ""
    listed = meta.get("id_token_signing_alg_values_supported")
    if not isinstance(listed, list) or alg not in listed:
        return (f"it is signed with {alg}, which this client cannot verify and the provider "
                "does not list in id_token_signing_alg_values_supported")
    from urllib.parse import urlsplit

    endpoint = urlsplit(str(meta.get("token_endpoint")))
    if endpoint.scheme != "https" and not _is_loopback(endpoint.hostname or ""):
        return (f"it is signed with {alg}, which this client cannot verify, and came over "
                "plain http")
    return ""


def _rsa_verify(key: dict[str, Any], alg: str, signed: bytes, signature: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 (RFC 8017, 8.2.2) or RSASSA-PSS (8.1.2) with a JWK's ``n``, ``e``."""
    import hashlib
    import hmac

    try:
        n, e = (int.from_bytes(_b64decode(key[name]), "big") for name in ("n", "e"))
    except (KeyError, TypeError, ValueError):
        return False
    size = (n.bit_length() + 7) // 8
    if n.bit_length() < 2048 or e < 3 or e % 2 == 0 or len(signature) != size:
        return False
    s = int.from_bytes(signature, "big")
    if s >= n:
        return False
    if alg in _PSS_DIGESTS:
        return _pss_verify(pow(s, e, n), n.bit_length() - 1, _PSS_DIGESTS[alg], signed)
    # Build the one valid encoded message and compare it whole: no parsing of padding.
    hash_name, prefix = _RSA_DIGESTS[alg]
    digest_info = bytes.fromhex(prefix) + hashlib.new(hash_name, signed).digest()
    expected = b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" + digest_info
    return hmac.compare_digest(pow(s, e, n).to_bytes(size, "big"), expected)


def _pss_verify(m: int, em_bits: int, hash_name: str, signed: bytes) -> bool:
    """EMSA-PSS-VERIFY (RFC 8017, 9.1.2): MGF1 with the same hash, salt as long as the hash."""
    import hashlib
    import hmac

    h_len = hashlib.new(hash_name).digest_size
    em_len = (em_bits + 7) // 8
    if m.bit_length() > em_bits or em_len < 2 * h_len + 2:
        return False
    em = m.to_bytes(em_len, "big")
    masked, digest = em[: em_len - h_len - 1], em[em_len - h_len - 1 : -1]
    if em[-1] != 0xBC:
        return False
    mask = b"".join(hashlib.new(hash_name, digest + i.to_bytes(4, "big")).digest()
                    for i in range((len(masked) + h_len - 1) // h_len))
    db = bytearray(a ^ b for a, b in zip(masked, mask))
    db[0] &= 0xFF >> (8 * em_len - em_bits)  # the bits above em_bits are not part of DB
    pad = len(db) - h_len - 1
    if any(db[:pad]) or db[pad] != 1:
        return False
    salt = bytes(db[pad + 1 :])
    expected = hashlib.new(hash_name, bytes(8) + hashlib.new(hash_name, signed).digest()
                           + salt).digest()
    return hmac.compare_digest(digest, expected)


def _pkce_pair() -> tuple[str, str]:
    """A PKCE verifier (86 unreserved characters) and its S256 challenge (RFC 7636, 4.1-4.2)."""
    import base64
    import hashlib

    verifier = _random_string(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _random_string(size: int = 32) -> str:
    import secrets

    return secrets.token_urlsafe(size)


# ---------------------------------------------------------------------------
# Store: store keys, the token file, its lock and its private folder
# ---------------------------------------------------------------------------

def _host_key(host: str) -> str:
    """Normalise a server URL: lower-case scheme and host, no default port or slash."""
    key = _HOST_KEYS.get(host)
    if key is None:
        key = _HOST_KEYS[host] = _normalise_host(host)
    return key


_HOST_KEYS: dict[str, str] = {}


def _normalise_host(host: str) -> str:
    from urllib.parse import parse_qs, urlsplit

    if not isinstance(host, str) or not host.strip():
        raise AuthError("No host given: pass the server's URL, e.g. https://myapp.example.com",
                        status_code=400)
    text = host.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise AuthError(f"{text!r} is not a valid URL ({exc})", status_code=400) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise AuthError(
            f"{text!r} is not an http(s) URL: write it like https://myapp.example.com",
            status_code=400,
        )
    if parts.username is not None or parts.password is not None:
        raise AuthError("Do not put credentials in the host URL", status_code=400)
    # issuer#client_id=...&scope=...: the store key of a standard provider's client
    fields = parse_qs(parts.fragment, keep_blank_values=True) if parts.fragment else {}
    if parts.query or (parts.fragment and "client_id" not in fields) or text.endswith(
        ("?", "#")
    ):
        raise AuthError(f"The host URL must not have a query or fragment: {text!r}",
                        status_code=400)
    name = parts.hostname.lower()
    if ":" in name:
        name = f"[{name}]"
    if port is not None and port != (443 if scheme == "https" else 80):
        name = f"{name}:{port}"
    base = f"{scheme}://{name}{parts.path.rstrip('/')}"
    if not fields:
        return base
    return _store_key(base, fields["client_id"][0],
                      fields["scope"][0] if "scope" in fields else None)


def _store_key(host: str, client_id: str | None = None,
               scopes: str | Iterable[str] | None = None) -> str:
    """The store key: the host, or for a standard provider issuer#client_id=...&scope=..."""
    base = _host_key(host)
    if not client_id:
        return base
    from urllib.parse import urlencode

    if "#" in base:
        raise AuthError("Give the issuer URL without a #client_id= part when you pass a "
                        "client_id", status_code=400)
    return f"{base}#" + urlencode({"client_id": client_id, "scope": " ".join(_scopes(scopes))})


def _scopes(scopes: str | Iterable[str] | None) -> list[str]:
    """Sorted, unique scopes; the default when None."""
    if scopes is None:
        return list(_DEFAULT_SCOPES)
    if isinstance(scopes, str):
        scopes = [scopes]
    return sorted({word for item in scopes for word in str(item).split()})


def _split_key(key: str) -> tuple[str, str | None, list[str] | None]:
    """``(issuer, client_id, scopes)`` of a store key; no client for a py-oidc-auth host."""
    from urllib.parse import parse_qs

    base, _, fragment = key.partition("#")
    if not fragment:
        return base, None, None
    fields = parse_qs(fragment, keep_blank_values=True)
    return base, fields["client_id"][0], fields.get("scope", [""])[0].split()


def _server_name(key: str) -> str:
    """A store key as people say it: the URL, and a standard provider's client."""
    issuer, client_id, _ = _split_key(key)
    return f"{issuer} (client {_printable(client_id)})" if client_id else issuer


def _login_command(key: str) -> str:
    """The command line that logs in to the server of store *key* (never with a secret)."""
    import shlex

    issuer, client_id, scopes = _split_key(_host_key(key))
    words = [issuer]
    if client_id:
        words += ["--client-id", client_id]
        if set(scopes or ()) != set(_DEFAULT_SCOPES):
            words += ["--scope", " ".join(scopes or ())]
    return " ".join([_command(), *(shlex.quote(word) for word in words)])


def _command() -> str:
    """How the user runs the command line, for the hints that spell a command."""
    # "python -m" (or running the file) puts the module's path in argv[0]; the console
    # script, and any program that uses the API, is told about oidc-auth.
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m py_oidc_auth_client" if name == "py_oidc_auth_client.py" else "oidc-auth"


class TokenStore:
    """Per host token cache with automatic TTL eviction.

    One JSON file, readable by its owner only, holds an entry per host; entries
    whose access and refresh tokens have both expired are pruned on read. Every
    change is made under a lock file beside it and written atomically, so
    processes sharing the file never lose each other's tokens.

    Parameters
    ----------
    path : str or Path or None
        The JSON file; by default ``token-store.json`` in the platform cache
        folder of *app_name* (``~/.cache/py-oidc-auth/`` on Linux).
    app_name : str
        The cache folder's name, used only when *path* is None.

    Examples
    --------
    >>> store = TokenStore("~/.config/myapp/tokens.json")  # doctest: +SKIP
    >>> store.put("https://myapp.example.com", token)  # doctest: +SKIP
    >>> store.get("https://myapp.example.com")  # doctest: +SKIP
    >>> store.hosts()  # doctest: +SKIP
    ['https://myapp.example.com']
    """

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 app_name: str = "py-oidc-auth") -> None:
        if path is None:
            path = os.path.join(_cache_dir(app_name), "token-store.json")
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self._single = False  # True for an OIDC_TOKEN_FILE: one Token, for the server it names
        self._signature: tuple[int, int, int] | None = None
        self._entries: dict[str, Token] = {}
        self._next_eviction = float("inf")
        self._warned_mode = False
        self._unsaved: dict[str, Token] = {}  # tokens a write failed for: kept, not lost
        # A standard provider's ID token per access token, saved beside it for logout.
        self._id_tokens: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"TokenStore({self.path!r})"

    def get(self, host: str) -> Token | None:
        """The token for the server URL *host* while it can be used, else None; prunes."""
        key = _host_key(host)
        entries = self._live()
        if self._single and entries and key not in entries:
            raise self._foreign(next(iter(entries)), key)
        return entries.get(key)

    def put(self, host: str, token: Token) -> None:
        """Store *token* for the server URL *host*, replacing any previous entry."""
        checked = _as_token(token)
        if checked is None:
            raise ValueError("token must be a Token dict with access_token and expires")
        self._renew(host, checked, keep=False)

    def remove(self, host: str) -> bool:
        """Remove the token cached for *host*; True if there was one."""
        key = _host_key(host)
        found: list[bool] = []
        self._update(lambda entries: found.append(entries.pop(key, None) is not None))
        return found[0]

    def hosts(self) -> list[str]:
        """The normalised URLs of the hosts with cached tokens, after pruning expired ones."""
        return sorted(self._live())

    def clear(self) -> None:
        """Remove all cached tokens, and the copies of unreadable store contents kept aside."""
        self._update(lambda entries: entries.clear())
        for aside in _aside_copies(self.path):
            _remove_aside(aside)

    # -- Internals --

    def _live(self) -> dict[str, Token]:
        """The entries, parsed again only when the file changed; prunes when one has expired."""
        try:  # no lock to read: writes are atomic
            signature = self._file_signature()  # taken first: a later change is seen
        except OSError as exc:
            raise _store_error(self.path, exc) from None
        if signature is None:
            self._remember(None, {})
        elif signature != self._signature:
            entries, bad, _ = self._parse()
            if bad:
                self._update(lambda entries: None)  # repairs it, under the lock
            else:
                self._remember(signature, entries)
        if time.time() >= self._next_eviction:
            return self._update(lambda entries: None)
        return self._entries

    def _file_signature(self) -> tuple[int, int, int] | None:
        """What changes with the file: its mtime, size and inode; None without one."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _parse(self) -> tuple[dict[str, Token], str, bytes | None]:
        """The good entries, what is wrong with the rest, and the rest (None: no file)."""
        try:
            # O_NONBLOCK: a FIFO put in the way cannot hang the open (it is no file).
            fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read() if stat.S_ISREG(st.st_mode) else None
        except FileNotFoundError:
            return {}, "", b""
        except OSError as exc:
            if os.path.islink(self.path):
                raise _symlink_error(self.path) from None
            return {}, f"cannot be read ({exc.strerror})", None
        if data is None:
            return {}, "is not a file", None
        self._check_mode(st.st_mode)
        try:
            obj = _loads(data)
        except ValueError:
            return {}, "is not valid JSON", data
        if not isinstance(obj, dict):
            return {}, "does not hold a JSON object", data
        if self._single:  # one token, keyed by the server it names ("" if none)
            token = self._as_token(obj)
            return ({_server_of(obj): token}, "", b"") if token else (
                {}, "does not hold a token", data)
        entries: dict[str, Token] = {}
        for key, value in obj.items():
            token = self._as_token(value)
            if token is not None:
                entries[key] = token
        if len(entries) == len(obj):
            return entries, "", b""
        rest = {key: value for key, value in obj.items() if key not in entries}
        return entries, "has malformed entries", _dumps(rest).encode()

    def _repair(self, entries: dict[str, Token], bad: str, rest: bytes | None) -> None:
        """Under the lock: keep the good entries live, set only the unreadable rest aside."""
        try:
            aside = _set_aside(self.path, rest)
            if entries:
                self._write(entries)
            elif rest is not None:
                os.unlink(self.path)
        except OSError as exc:
            raise AuthError(f"Token store {self.path} {bad} and cannot be repaired: "
                            f"{exc.strerror or exc}") from None
        _logger().warning("Token store %s %s; kept %d good entries and set the unreadable "
                          "part aside in %s (%s --clear removes it)",
                          self.path, bad, len(entries), aside, _command())

    def _remember(self, signature: tuple[int, int, int] | None, entries: dict[str, Token]) -> None:
        self._with_unsaved(entries)
        self._signature, self._entries = signature, entries
        self._next_eviction = float("inf") if self._single else min(
            map(_dies, entries.values()), default=float("inf"))

    def _update(self, change: Callable[[dict[str, Token]], object]) -> dict[str, Token]:
        """Read, change and write the entries under the lock; prune dead ones."""
        try:
            with self._lock():
                return self._update_locked(change)
        except OSError as exc:
            raise _store_error(self.path, exc) from None

    def _update_locked(self, change: Callable[[dict[str, Token]], object]) -> dict[str, Token]:
        entries, bad, rest = self._parse()
        if bad:
            self._repair(entries, bad, rest)
        before = dict(entries)
        self._with_unsaved(entries)
        merged = dict(entries)
        change(entries)
        now = time.time() if not self._single else 0.0  # never delete a user's token file
        for key in [k for k, t in entries.items() if _dies(t) <= now]:
            del entries[key]
        if entries != before:
            try:
                self._write(entries)
            except OSError:
                if entries != merged:
                    raise
                return entries  # only kept tokens to save, and still no luck: keep them
        self._unsaved.clear()  # written now, or older than what the file holds
        self._remember(self._file_signature(), entries)
        return entries

    # -- For the flows and the command line: read, let one caller refresh, write --

    def _renew(self, host: str, change: Token | Callable[[Token | None], Token | None], *,
               keep: bool = True) -> Token | None:
        """Under the lock: hand *host*'s entry to *change*, store what it returns.

        The same entry writes nothing, None forgets it (a token file is left as it is); a
        Token instead of a function replaces it. Unless not *keep*, a new token the file
        cannot take is kept (`_hold`).
        """
        key, new = _host_key(host), change if isinstance(change, dict) else None
        try:
            with self._lock():
                current = self._current(key) if callable(change) else None
                new = change(current) if callable(change) else new
                return self._settle(key, current, new)
        except (OSError, AuthError) as exc:
            return self._hold(key, new if keep else None, exc)

    async def _renew_async(
        self, host: str, change: Token | Callable[[Token | None], Coroutine[Any, Any, Token | None]]
    ) -> Token | None:
        """`_renew` for coroutines: the lock is awaited in asyncio sleeps, no thread blocks."""
        key, new = _host_key(host), change if isinstance(change, dict) else None
        try:
            async with self._lock():
                current = self._current(key) if callable(change) else None
                new = await change(current) if callable(change) else new
                return self._settle(key, current, new)
        except (OSError, AuthError) as exc:
            return self._hold(key, new, exc)

    def _lock(self) -> _FileLock:
        return _FileLock(self.path + ".lock")

    def _id_token(self, access: str, id_token: str | None = None) -> str:
        """The ID token kept for the access token *access*; with *id_token*, keep that."""
        if id_token is not None:
            if len(self._id_tokens) > 4096:
                self._id_tokens.clear()
            self._id_tokens[access] = id_token
        return self._id_tokens.get(access, "")

    def _as_token(self, obj: object) -> Token | None:
        """`_as_token`, keeping the ID token stored with it."""
        token = _as_token(obj)
        if token is not None and isinstance(obj, dict) and isinstance(obj.get("id_token"), str):
            self._id_token(token["access_token"], obj["id_token"])
        return token

    def _current(self, key: str) -> Token | None:
        """Under the lock: *key*'s entry as the file holds it now."""
        return self._update_locked(lambda entries: None).get(key)

    def _settle(self, key: str, current: Token | None, new: Token | None) -> Token | None:
        if new is None and current is not None and not self._single:
            self._update_locked(lambda entries: entries.pop(key, None))
        elif new is not None and new is not current:
            self._update_locked(lambda entries: _set(entries, key, new, self._single))
        return new

    def _hold(self, key: str, token: Token | None, exc: OSError | AuthError) -> Token:
        """Keep a new *token* the file could not take, and warn; without one, raise *exc*."""
        # It must not be lost: the server may have rotated the refresh token.
        if token is None:
            raise _store_error(self.path, exc) if isinstance(exc, OSError) else exc
        self._unsaved[key] = token
        self._signature = None  # read again, with the kept token on top
        reason = exc.message if isinstance(exc, AuthError) else (
            f"Cannot write {self.path}: {exc.strerror or exc}")
        _logger().warning("The new token for %s could not be saved to %s (%s). This process "
                          "keeps using it and saves it with the next write that works; fix "
                          "the file or its folder, or the token is gone when it ends.",
                          key, self.path, reason)
        return token

    def _inspect(self, host: str = "") -> tuple[str | None, Token | None, str]:
        # Read only, no lock: (the server a token file names, None for the cache; the
        # token of *host*, or the token file's own; what is wrong with the file, or "").
        entries, bad, _ = self._parse()
        if not self._single:
            return None, entries.get(_host_key(host)), bad
        server = next(iter(entries), "")
        return server, entries.get(server), bad

    def _with_unsaved(self, entries: dict[str, Token]) -> None:
        for key, token in list(self._unsaved.items()):
            current = entries.get(key)
            if current is None or current["expires"] <= token["expires"]:
                _set(entries, key, token, self._single)

    def _write(self, entries: dict[str, Token]) -> None:
        obj: Any
        if self._single and not entries:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        if self._single:
            ((server, token),) = entries.items()
            obj = _token_file_object(server, token)
        else:
            # "headers" repeats the access token (half the file): it is rebuilt on read.
            # "lifetime" is kept because the expiry margin depends on it, and a standard
            # provider's ID token for logout.
            obj = {k: {**{name: v for name, v in t.items() if name != "headers"},
                       "lifetime": _lifetime(t)} for k, t in entries.items()}
            for entry in obj.values():
                if entry["access_token"] in self._id_tokens:
                    entry["id_token"] = self._id_tokens[entry["access_token"]]
        _atomic_write(self.path, _dumps(obj, separators=(",", ":")).encode())

    def _check_mode(self, mode: int) -> None:
        if mode & 0o077 and not self._warned_mode and sys.platform != "win32":
            self._warned_mode = True
            _logger().warning("Token store %s can be read or written by other users; "
                           "fix with: chmod 600 %s", self.path, self.path)

    def _foreign(self, server: str, asked: str) -> AuthError:
        """A token file asked for another server than the one it names: refuse, send nothing."""
        fix = f"{_login_command(asked)} --export FILE"
        if not server:  # an older export or a hand-made file: it could belong anywhere
            return AuthError(
                f"The token file {self.path} does not say which server it was issued for, "
                f"so its tokens are not used for {asked}. Make it anew: {fix}; or, if it "
                f'was issued for {asked}, add "server": "{asked}" to its JSON object.',
                {"error": "token_file_unbound"}, 400)
        return AuthError(
            f"The token file {self.path} was issued for {_printable(_short(server, 200))}, "
            f"not for {asked}: its tokens are never used for, or sent to, another server. "
            f"Make a token file for {asked}: {fix}",
            {"error": "token_file_mismatch"}, 400)


def _as_token(obj: object) -> Token | None:
    """A valid Token built from a stored object, or None when it is malformed."""
    if isinstance(obj, dict) and isinstance(obj.get("token"), dict):
        obj = obj["token"]  # an entry written by the reference client: migrate it
    if not isinstance(obj, dict):
        return None
    access, expires = obj.get("access_token"), obj.get("expires")
    refresh, refresh_expires = obj.get("refresh_token") or "", obj.get("refresh_expires") or 0
    token_type, scope = obj.get("token_type") or "Bearer", obj.get("scope") or ""
    numbers = (expires, refresh_expires)
    if (
        not isinstance(access, str) or not access
        or not all(isinstance(n, (int, float)) and not isinstance(n, bool)
                   and -1e12 < n < 1e12 for n in numbers)  # also refuses NaN and inf
        or not isinstance(refresh, str) or not isinstance(token_type, str)
        or not isinstance(scope, str)
    ):
        return None
    lifetime = obj.get("lifetime")
    if isinstance(lifetime, int) and not isinstance(lifetime, bool) and access not in _SEEN:
        _seen(access, lifetime)
    return _token(access, token_type, int(cast(float, expires)), refresh,
                  int(cast(float, refresh_expires)), scope)


def _dies(token: Token) -> int:
    """When an entry is dead: its access token and any refresh token have expired."""
    return max(token["expires"], token["refresh_expires"] if token["refresh_token"] else 0)


def _server_of(obj: dict[str, Any]) -> str:
    """The store key a token file names in its "server" field, normalised; "" if none."""
    server = obj.get("server")
    if not isinstance(server, str) or not server:
        return ""
    try:
        return _host_key(server)
    except AuthError:
        return server  # matches no key: the file is refused, naming what it says


def _token_file_object(server: str, token: Token) -> dict[str, Any]:
    """A token file's JSON: the Token as ``--json --show-secrets`` prints it, and its server."""
    return {"server": server, **token} if server else dict(token)


def _set(entries: dict[str, Token], key: str, token: Token, single: bool) -> None:
    if single:  # a token file holds one server's token: a login for another replaces it
        entries.clear()
    entries[key] = token


def _store_error(path: str, exc: OSError) -> AuthError:
    return AuthError(f"Cannot use the token store {path}: {exc.strerror or exc}; "
                     "check the folder, or pass another path or app_name")


def _symlink_error(path: str) -> AuthError:
    return AuthError(f"{path} is a symbolic link, and token files are never opened through "
                     "one (another user could have placed it). If you made it, give the real "
                     f"file's path instead ({os.path.realpath(path)}); if not, remove it.")


def _atomic_write(path: str, data: bytes) -> None:
    """Write via a private temp file in the same directory, fsync, then replace."""
    import tempfile

    folder = os.path.dirname(path)  # made private by the caller's lock (_FileLock)
    # mkstemp opens O_EXCL | O_NOFOLLOW, 0600 from the first byte, and tries another
    # name when one exists: no write-then-chmod window, no planted link followed.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _make_private_dir(folder: str) -> None:
    """Create *folder* and its missing parents 0700 whatever the umask; refuse an unsafe one."""
    missing = []
    path = folder
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):  # os.makedirs would give the parents 0777 & ~umask
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made by another process meanwhile (its owner is checked below)
        if sys.platform != "win32" and stat.S_IMODE(os.lstat(path).st_mode) != 0o700:
            os.chmod(path, 0o700)  # a umask such as 0277 took our own bits away
    _check_private_dir(folder)


def _check_private_dir(folder: str) -> None:
    """Refuse a folder that another user owns or may write to: they could swap our files."""
    if sys.platform == "win32":  # ACLs: the folder's owner decides
        return
    st = os.stat(folder)
    problem = ""
    if st.st_uid not in (os.geteuid(), 0):
        problem = f"belongs to another user (uid {st.st_uid})"
    elif st.st_mode & 0o002:
        problem = f"can be written by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        raise AuthError(f"The folder {folder} {problem}, so token files there could be "
                        "replaced or read through links another user plants; keep them in a "
                        f"folder of your own (e.g. chmod 700 {folder}, or choose another path)")


def _set_aside(path: str, rest: bytes | None) -> str:
    """Keep *rest* (None: whatever is at *path*) in a new private copy; drop the oldest."""
    stamp = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for attempt in range(100):
        aside = stamp if not attempt else f"{stamp}-{attempt}"
        try:
            if rest is None:  # a folder or some other non-file in the way: move it
                if os.path.lexists(aside):
                    continue
                os.rename(path, aside)
                break
            # O_EXCL: a name taken, by a planted link too, is never written through.
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(rest)
            fh.flush()
            os.fsync(fh.fileno())
        break
    else:
        raise FileExistsError(f"no free name beside {path}")
    older = [p for p in _aside_copies(path) if p != aside]
    for old in older[: max(0, len(older) - 2)]:  # 3 copies at most, this one among them
        _remove_aside(old)
    return aside


def _aside_copies(path: str) -> list[str]:
    """The copies kept aside for the store at *path*, oldest first."""
    folder, prefix = os.path.dirname(path), os.path.basename(path) + ".corrupt-"
    try:
        names = [name for name in os.listdir(folder) if name.startswith(prefix)]
    except OSError:
        return []
    found = []
    for name in names:
        try:
            found.append((os.lstat(os.path.join(folder, name)).st_ctime_ns, name))
        except OSError:
            continue
    return [os.path.join(folder, name) for _, name in sorted(found)]


def _remove_aside(path: str) -> None:
    import shutil

    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)  # a link is removed itself, never followed
    except OSError as exc:
        _logger().warning("could not remove %s: %s", path, exc.strerror or exc)


class _FileLock:
    """An exclusive lock on *path*, shared by every process, bounded wait.

    ``with`` waits in ``time.sleep``; ``async with`` in asyncio sleeps, so that the
    event loop runs on while another process holds the lock.
    """

    def __init__(self, path: str, timeout: float = _LOCK_TIMEOUT) -> None:
        self.path, self.timeout, self.fd = path, timeout, -1

    def __enter__(self) -> _FileLock:
        attempts = self._attempts()
        try:
            for pause in attempts:
                time.sleep(pause)
        finally:
            attempts.close()  # interrupted while waiting: the file is closed
        return self

    async def __aenter__(self) -> _FileLock:
        attempts = self._attempts()
        try:
            for pause in attempts:
                await _sleep(pause)
        finally:
            attempts.close()  # cancelled while waiting: the file is closed
        return self

    def _attempts(self) -> Generator[float, None, None]:
        """Try to lock; between tries, yield how long to pause. Sets ``fd`` when locked."""
        fd, deadline, pause = self._open(), time.monotonic() + self.timeout, 0.002
        try:
            while True:
                try:
                    _lock(fd)
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        raise AuthError(
                            f"Could not lock {self.path} within {self.timeout:g} s: another "
                            "process holds it. If none is running, delete the lock file."
                        ) from None
                yield pause
                pause = min(pause * 2, 0.05)
        except BaseException:  # timed out, or closed while waiting
            os.close(fd)
            raise
        self.fd = fd

    def _open(self) -> int:
        try:
            _make_private_dir(os.path.dirname(self.path))
            return os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        except OSError as exc:
            if os.path.islink(self.path):
                raise _symlink_error(self.path) from None
            raise _store_error(self.path, exc) from None

    def __exit__(self, *exc: object) -> None:
        try:
            _unlock(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()


if sys.platform == "win32":  # msvcrt locks a byte range; one byte is enough
    import msvcrt

    def _lock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:  # flock: whole-file, released by the kernel if the process dies
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _cache_dir(app_name: str) -> str:
    """The per-user cache folder for *app_name*."""
    if sys.platform not in ("win32", "darwin"):
        # Linux and other POSIX: the XDG rule, the same answer platformdirs gives,
        # without its import cost on every start (it pulls in pathlib and more).
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):
            base = os.path.expanduser("~/.cache")
        return os.path.join(base, app_name)
    try:  # Windows and macOS: platformdirs knows their folder ladders best
        from platformdirs import user_cache_dir
    except ImportError:  # vendored without platformdirs
        if sys.platform == "darwin":
            return os.path.join(os.path.expanduser("~/Library/Caches"), app_name)
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser(r"~\AppData\Local")
        return os.path.join(base, app_name, "Cache")
    return str(user_cache_dir(app_name, appauthor=False))


_STORES: dict[tuple[str, str], TokenStore] = {}


def _default_store(app_name: str, env_var: str = "", store: TokenStore | None = None
                   ) -> TokenStore:
    """The store in use: the token file named by *env_var* if set, else *store* or the cache."""
    token_file = os.environ.get(env_var) if env_var else None
    if store is not None and not token_file:
        return store
    key = (token_file or "", "" if token_file else app_name)
    store = _STORES.get(key)
    if store is None:
        store = TokenStore(token_file) if token_file else TokenStore(app_name=app_name)
        store._single = bool(token_file)
        _STORES[key] = store
    return store


# ---------------------------------------------------------------------------
# Environment & terminal: batch jobs, browsers, prompts and notebook output
# ---------------------------------------------------------------------------
# Each decision below returns its reason with it, which --doctor prints as it is.

def _batch_scheduler() -> str | None:
    """The batch system whose job we run in, if any."""
    for name, system in _BATCH_VARIABLES.items():
        if os.environ.get(name):
            return system
    return None


def _in_jupyter() -> bool:
    return "ipykernel" in sys.modules


def _login_check() -> tuple[bool, str]:
    """Whether someone could answer an interactive login here, and why."""
    scheduler = _batch_scheduler()
    if scheduler:
        return False, f"this is a {scheduler} batch job"
    for present, why in ((_isatty(sys.stdin), "stdin is a terminal"),
                         (_isatty(sys.stderr), "stderr is a terminal"),
                         (_in_jupyter(), "this is a Jupyter kernel"),
                         (bool(os.environ.get("BROWSER")), "BROWSER is set")):
        if present:
            return True, why
    return False, "there is no terminal, notebook or configured browser (BROWSER) to log in with"


def _no_login_reason() -> str | None:
    """Why nobody could answer an interactive login here; None if someone can."""
    possible, why = _login_check()
    return None if possible else why


def _token_file_state(path: str) -> str:
    """What is wrong with a token file that gave no token."""
    try:
        with open(path, "rb") as fh:
            token = _as_token(_loads(fh.read(_MAX_BODY)))
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError):
        token = None
    if token is None:
        return "holds no token"
    if not token["refresh_token"]:
        return "holds an expired access token and no refresh token"
    if not _refresh_valid(token):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(token["refresh_expires"]))
        return f"holds expired tokens: its refresh token expired at {when}"
    return "holds a refresh token that the server refused (revoked, or used elsewhere)"


def _browser_check() -> tuple[bool, str]:
    """Whether a browser started here would be seen by the user, and why."""
    if os.environ.get("BROWSER"):
        return True, f"BROWSER={os.environ['BROWSER']} is set"
    remote = _is_remote()
    if remote:  # even with X forwarding: the browser would run far from the user
        return False, f"this is an SSH session ({remote}); open the URL on your own machine"
    if sys.platform in ("win32", "darwin"):
        return True, f"a desktop session ({sys.platform})"
    shown = [f"{v}={os.environ[v]}" for v in ("DISPLAY", "WAYLAND_DISPLAY") if os.environ.get(v)]
    if shown:
        return True, f"a display ({', '.join(shown)})"
    return False, "no display (DISPLAY, WAYLAND_DISPLAY) and no BROWSER; open the URL yourself"


def _can_open_browser() -> bool:
    return _browser_check()[0]


def _is_remote() -> str | None:
    """The SSH variables that make this a remote session, if any."""
    found = [v for v in ("SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY") if os.environ.get(v)]
    return " and ".join(found) + " set" if found else None


def _in_container() -> str | None:
    """The container we run in and the sign of it, if any (--doctor only shows it)."""
    for variable, kind in (("APPTAINER_CONTAINER", "Apptainer"),
                           ("SINGULARITY_CONTAINER", "Singularity"),
                           ("KUBERNETES_SERVICE_HOST", "Kubernetes"),
                           ("container", "")):  # set so by systemd-nspawn, LXC, podman
        if os.environ.get(variable):
            return f"{kind or os.environ[variable]} ({variable} is set)"
    for path, kind in (("/.dockerenv", "Docker"), ("/run/.containerenv", "Podman")):
        if os.path.exists(path):
            return f"{kind} ({path} exists)"
    try:
        with open("/proc/1/cgroup", encoding="utf-8", errors="replace") as fh:
            cgroup = fh.read(1 << 16)
    except OSError:
        return None
    hints = [h for h in ("docker", "kubepods", "containerd", "libpod", "lxc") if h in cgroup]
    return f"probably {hints[0]} (/proc/1/cgroup mentions it)" if hints else None


def _open_browser(url: str) -> None:
    """Open *url* without waiting: a BROWSER command may block until it exits."""
    import threading
    import webbrowser

    url = _web_url(url, "the login URL", allow_http=True)  # its http was judged on arrival

    def _open() -> None:
        try:
            if not webbrowser.open(url):
                _logger().debug("no browser could be started")
        except Exception as exc:  # a broken BROWSER setting must not end the login
            _logger().debug("opening the browser failed: %s", exc)

    threading.Thread(target=_open, name="oidc-browser", daemon=True).start()


def _say(text: str) -> None:
    """Prompts and progress go to stderr; stdout is for results."""
    print(text, file=sys.stderr, flush=True)


def _show_device_code(host: str, code: DeviceCode) -> Callable[[str], None] | None:
    """Show the code; in a notebook, return how to replace it with the outcome."""
    uri = _web_url(code["uri"], "the verification URI", allow_http=True)  # judged on arrival
    host = _server_name(host)  # the server's URL, never the store key's form
    user_code = _short(code["user_code"], 100)
    sentence = "To log in to {}, open{}and confirm the code: {}"
    text = sentence.format(host, f"\n    {uri}\n", user_code)
    if _in_jupyter():
        from html import escape

        link = f'<a href="{escape(uri)}" target="_blank" rel="noopener">{escape(uri)}</a>'
        code_html = f"<b><code>{escape(user_code)}</code></b>"
        replace = _display(sentence.format(escape(host), f" {link} ", code_html), text)
        if replace is not None:
            return replace
    _say(text)
    return None


def _display(html: str, text: str) -> Callable[[str], None] | None:
    """Show a paragraph in a notebook; return how to replace it in place, None without IPython."""
    from html import escape
    from importlib import import_module

    try:  # a MIME bundle: front ends that cannot show HTML show the text
        handle = import_module("IPython.display").display(
            {"text/html": f"<p>{html}</p>", "text/plain": text}, raw=True, display_id=True)
    except Exception as exc:  # no IPython in this kernel, or a broken display: plain text
        _logger().debug("IPython display failed: %s", exc)
        return None

    def replace(outcome: str) -> None:
        try:
            handle.update({"text/html": f"<p>{escape(outcome)}</p>", "text/plain": outcome},
                          raw=True)
        except Exception as exc:  # None from an old IPython, or a front end gone away
            _logger().debug("IPython display update failed: %s", exc)

    return replace


async def _countdown(seconds: float, deadline: float, show: _Progress | None) -> None:
    """Sleep *seconds*, showing the time left until *deadline*."""
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        if show is not None:
            show.update(deadline - now)
        await _sleep(min(1.0, end - now))


_PROGRESS_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


class _Progress:
    """The wait for approval on stderr: one live line on a terminal, else a line every 30 s."""

    def __init__(self, stream: Any, live: bool) -> None:
        self.stream, self.live = stream, live
        # NO_COLOR (no-color.org) or TERM=dumb: no escape sequence, only carriage returns.
        self.plain = bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"
        self.next_line = time.monotonic() + _PROGRESS_EVERY
        self.width = 0

    @property
    def how(self) -> str:
        """What the user sees, in words (for --doctor)."""
        if not self.live:
            return f"a line on stderr every {_PROGRESS_EVERY:g} s"
        plain = ", without escape sequences (NO_COLOR or TERM=dumb)" if self.plain else ""
        return "a live countdown line on stderr" + plain

    @classmethod
    def on_stderr(cls, interactive: bool | None) -> _Progress | None:
        """The progress a device login shows, or None where it shows none."""
        # pythonw has no stderr; in a notebook every note would stay on the page
        # as a red box, and the cell's busy mark says enough.
        if sys.stderr is None or _in_jupyter():
            return None
        return cls(sys.stderr, live=_isatty(sys.stderr) and interactive is not False)

    def update(self, left: float) -> None:
        seconds = max(0, int(left))
        when = f"{seconds // 60}:{seconds % 60:02d} left"
        if self.live:
            text = f"Waiting for approval... {when}"
            self._write("\r" + text.ljust(self.width) if self.plain else "\r\033[K" + text)
            self.width = len(text)
        elif time.monotonic() >= self.next_line:
            self.next_line = time.monotonic() + _PROGRESS_EVERY
            self._write(f"still waiting for approval, {when}\n")

    def close(self) -> None:
        """Wipe the live line, so that what follows starts on a clean line."""
        if self.live and self.width:
            self._write("\r" + " " * self.width + "\r" if self.plain else "\r\033[K")
            self.width = 0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not end the login
            pass


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


# -- Human terms --

def _lifetimes(token: Token) -> str:
    """``"access token valid for 54 min, refresh token expired 3 h ago"`` (or ``none``)."""
    now = time.time()
    refresh = _validity(token["refresh_expires"], now) if token["refresh_token"] else "none"
    return f"access token {_validity(token['expires'], now)}, refresh token {refresh}"


def _validity(timestamp: int, now: float, verb: str = "valid for") -> str:
    """``"valid for 54 min"`` (or ``"expires in 54 min"``) or ``"expired 3 h ago"``."""
    seconds = int(timestamp - now)
    if seconds > 0:
        return f"{verb} {_duration(seconds)}"
    return f"expired {_duration(-seconds)} ago"


def _duration(seconds: int) -> str:
    """``"42 s"``, ``"54 min"``, ``"3 h 12 min"``, ``"29 d 23 h"``."""
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(seconds // 3600, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


# ---------------------------------------------------------------------------
# Standard providers: discovery, OAuth metadata and ID token claims
# ---------------------------------------------------------------------------

_ENDPOINTS = ("authorization_endpoint", "token_endpoint", "device_authorization_endpoint",
              "revocation_endpoint", "end_session_endpoint", "jwks_uri")
# Some providers list these in their OAuth document (RFC 8414) only.
_OAUTH_ENDPOINTS = ("device_authorization_endpoint", "revocation_endpoint")


def _same_issuer(said: object, issuer: str) -> bool:
    """Equal up to the case of scheme and host, a default port and a trailing slash."""
    try:
        return isinstance(said, str) and _normalise_host(said) == _host_key(issuer)
    except AuthError:
        return False


def _check_endpoints(meta: dict[str, Any], names: Iterable[str], url: str, issuer: str) -> None:
    """Every endpoint in *meta* is a web URL; an https issuer's are https too."""
    secure = issuer.lower().startswith("https://")
    for name in names:
        value = meta.get(name)
        if value is None and name not in _ENDPOINTS[:2]:
            continue
        if not isinstance(value, str) or not value.startswith(
            ("https://",) if secure else ("https://", "http://")
        ):
            problem = "missing" if value is None else f"not an {'https' if secure else 'http'} URL"
            raise AuthError(f"{url}: {name} is {problem}", status_code=502)
        _web_url(value, f"{name} (in {url})", allow_http=True)  # no hidden characters, a host


async def _oauth_metadata(issuer: str, session: _Session) -> dict[str, Any]:
    """The endpoints of *issuer*'s OAuth document (RFC 8414), or {}; kept like the others."""
    from urllib.parse import urlsplit

    parts = urlsplit(issuer.rstrip("/"))
    well_known = "/.well-known/oauth-authorization-server"
    # RFC 8414, 3.1 puts the well-known part before the issuer's path; some
    # providers (Keycloak's realms among them) serve it after the path instead.
    urls = [f"{parts.scheme}://{parts.netloc}{well_known}{parts.path}"]
    if parts.path:
        urls.append(issuer.rstrip("/") + well_known)
    key = urls[0] + " (checked)"  # no fetched URL holds a space: no document lands here
    cached = _FETCHED.get(key)
    if cached is not None and time.monotonic() < cached[0]:
        return cached[1]
    found: dict[str, Any] = {}
    keep = True
    for url in urls:
        try:
            doc = await _fetch_json(url, session, fresh=True)
        except AuthError as exc:
            keep = keep and not exc._retry  # a passing fault: ask again next time
            _logger().debug("no OAuth metadata at %s: %s", url, exc.message)
            continue
        if not _same_issuer(doc.get("issuer"), issuer):  # RFC 8414, 3.3
            _logger().warning("%s names another issuer (%r), not %s: its endpoints are not "
                              "used", url, _short(str(doc.get("issuer")), 100), issuer)
            continue
        found = {name: doc[name] for name in _OAUTH_ENDPOINTS if doc.get(name) is not None}
        _check_endpoints(found, _OAUTH_ENDPOINTS, url, issuer)
        break
    if keep:
        _FETCHED[key] = (time.monotonic() + _DOCUMENT_TTL, found)
    return found


def _check_claims(claims: dict[str, Any], issuer: str, client_id: str, nonce: str | None,
                  now: float | None = None) -> None:
    """Refuse an ID token that is not from *issuer*, not for *client_id*, stale, or replayed."""
    import hmac

    now = time.time() if now is None else now
    aud, exp, iat = claims.get("aud"), claims.get("exp"), claims.get("iat")
    got = claims.get("nonce")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    problem = ""
    if claims.get("iss") != issuer:
        problem = f"it was issued by {_short(str(claims.get('iss')), 100)!r}, not {issuer!r} (iss)"
    elif client_id not in audiences:
        problem = "it was issued for another client (aud)"
    elif (len(audiences) > 1 or "azp" in claims) and claims.get("azp") != client_id:
        problem = "it was issued to another client (azp)"
    elif not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp + _CLOCK_SKEW <= now:
        problem = "it has expired (exp); check that this machine's clock is right"
    elif not isinstance(iat, (int, float)) or isinstance(iat, bool) or iat - _CLOCK_SKEW > now:
        problem = "it was issued in the future (iat); check that this machine's clock is right"
    elif nonce is not None and not (
        isinstance(got, str) and hmac.compare_digest(got.encode(), nonce.encode())
    ):
        problem = "it does not belong to this login (nonce)"
    if problem:
        raise _id_token_refused(problem)


class _Provider:
    """A standard OpenID provider (a ``client_id`` is given); `_Server` is its twin."""

    def __init__(self, flow: BaseFlow) -> None:
        self.flow, self.config = flow, flow.config
        self.name = flow.config.host  # the issuer, as messages name it

    async def meta(self) -> dict[str, Any]:
        """The provider's checked metadata; endpoints it leaves out come from the OAuth one."""
        issuer = self.config.host.strip()
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        meta = await _fetch_json(url, self.flow.session)
        said = meta.get("issuer")
        if not _same_issuer(said, issuer):
            _FETCHED.pop(url, None)
            raise AuthError(f"{url} names another issuer ({_short(str(said), 100)!r}); is "
                            f"{issuer} the provider's issuer URL?", {"error": "invalid_issuer"},
                            502)
        _check_endpoints(meta, _ENDPOINTS, url, issuer)
        missing = [name for name in _OAUTH_ENDPOINTS if meta.get(name) is None]
        if missing:
            more = await _oauth_metadata(issuer, self.flow.session)
            meta = {**meta, **{name: more[name] for name in missing if name in more}}
        return meta

    def scope(self, meta: dict[str, Any]) -> str:
        scopes = _scopes(self.config.scopes)
        supported = meta.get("scopes_supported")
        if self.config.scopes is None and isinstance(supported, list) and (
            "offline_access" not in supported
        ):  # the default asks for offline_access only where the provider knows it
            scopes.remove("offline_access")
        return " ".join(scopes)

    def _authed(self, meta: dict[str, Any], form: dict[str, str]
                ) -> tuple[dict[str, str], tuple[str, str] | None]:
        """*form* with the client's id (and secret), or HTTP Basic credentials."""
        client_id, secret = str(self.config.client_id), self.config.client_secret
        methods = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if secret and ("client_secret_basic" in methods or "client_secret_post" not in methods):
            return form, (client_id, secret)
        return {**form, "client_id": client_id,
                **({"client_secret": secret} if secret else {})}, None

    async def _token_call(self, form: dict[str, str]) -> _Call:
        meta = await self.meta()
        return (meta["token_endpoint"], *self._authed(meta, form))

    async def refresh_call(self, refresh_token: str, previous: Token | None) -> _Call:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if previous is not None and previous["scope"]:  # RFC 6749, 6: as granted before
            form["scope"] = previous["scope"]
        return await self._token_call(form)

    async def device_call(self) -> _Call:
        meta = await self.meta()
        url = meta.get("device_authorization_endpoint") or ""
        if not url:
            raise _NoDeviceFlow(f"{self.name} does not offer the device flow "
                                "(no device_authorization_endpoint)", status_code=404)
        scope = self.scope(meta)
        return (url, *self._authed(meta, {"scope": scope} if scope else {}))

    def device_refusal(self, exc: AuthError) -> str:
        """What the device endpoint's error *exc* says of this client, if it refuses it."""
        if exc.error == "unauthorized_client":
            return f"refused the device flow to client {self.config.client_id}"
        return ""

    async def device_grant(self, device_code: str) -> _Call:  # RFC 8628, 3.4
        return await self._token_call({"grant_type": "urn:ietf:params:oauth:grant-type:"
                                       "device_code", "device_code": device_code})

    async def login(self, receiver: _LoopbackReceiver) -> tuple[str, str, str | None]:
        """Set *receiver* up for a login; the redirect URI, the PKCE verifier, the nonce."""
        # RFC 8252, 7.3: the loopback IP literal, which is where the receiver listens.
        redirect_uri = f"http://127.0.0.1:{receiver.port}/callback"
        meta = await self.meta()
        verifier, challenge = _pkce_pair()
        state, nonce = _random_string(), _random_string()
        query = {"response_type": "code", "client_id": str(self.config.client_id),
                 "redirect_uri": redirect_uri, "scope": self.scope(meta), "state": state,
                 "nonce": nonce, "code_challenge": challenge, "code_challenge_method": "S256"}
        location = _with_query(meta["authorization_endpoint"],
                               {k: v for k, v in query.items() if v})
        # RFC 9207: the callback names its issuer; a wrong one means a mix-up attack.
        receiver.expect(state, location, iss=str(meta["issuer"]), iss_required=meta.get(
            "authorization_response_iss_parameter_supported") is True)
        return redirect_uri, verifier, nonce

    async def code_grant(self, code: str, redirect_uri: str, verifier: str) -> _Call:
        return await self._token_call({"code": code, "redirect_uri": redirect_uri,
                                       "grant_type": "authorization_code",
                                       "code_verifier": verifier})

    async def accept(self, raw: dict[str, Any], previous: Token | None = None,
                     nonce: str | None = None) -> Token:
        """A token answer made a Token, its ID token checked first and kept for logout."""
        meta = await self.meta()
        id_token = raw.get("id_token") if isinstance(raw.get("id_token"), str) else ""
        if id_token:
            await self._check_id_token(id_token, meta, nonce)
        elif nonce is not None and "openid" in self.scope(meta).split():
            raise AuthError("The provider answered the login without an ID token",
                            {"error": "invalid_id_token"}, 502)
        elif previous is not None:
            id_token = self.flow.store._id_token(previous["access_token"])
        if not isinstance(raw.get("scope"), str):  # RFC 6749, 5.1: as requested
            raw = {**raw, "scope": previous["scope"] if previous else self.scope(meta)}
        token = _make_token(raw, previous)
        if id_token:
            self.flow.store._id_token(token["access_token"], id_token)
        return token

    async def _check_id_token(self, id_token: str, meta: dict[str, Any],
                              nonce: str | None) -> None:
        """Verify the signature where this module can, then the claims."""
        import hashlib
        import hmac

        header, claims, signed, signature = _jws_parts(id_token)
        secret = self.config.client_secret
        problem = _alg_problem(header.get("alg"), meta, secret)
        alg = str(header.get("alg"))
        if not problem and (alg in _RSA_DIGESTS or alg in _PSS_DIGESTS):
            keys = await self._signing_keys(meta, header, "RSA")
            if not any(_rsa_verify(k, alg, signed, signature) for k in keys):
                problem = f"its {alg} signature does not verify"
        elif not problem and alg in _HMAC_DIGESTS and secret:  # OIDC Core, 10.1
            mac = hmac.new(secret.encode(), signed, getattr(hashlib, _HMAC_DIGESTS[alg])).digest()
            if not hmac.compare_digest(mac, signature):
                problem = f"its {alg} signature does not verify"
        elif not problem:
            if not await self._signing_keys(meta, header, _UNVERIFIED_ALGS[alg]):
                problem = (f"its {alg} signature does not verify: no key in the provider's "
                           "key set can have made it")
            else:
                _logger().debug("ID token signed with %s: signature not verified", alg)
        if problem:
            raise _id_token_refused(problem)
        _check_claims(claims, str(meta["issuer"]), str(self.config.client_id), nonce)

    async def _signing_keys(self, meta: dict[str, Any], header: dict[str, Any],
                            kty: str) -> list[dict[str, Any]]:
        """The keys of the provider's JWKS that can have signed a token with *header*."""
        alg, kid = header.get("alg"), header.get("kid")
        keys: list[dict[str, Any]] = []
        for fresh in (False, True):  # an unknown kid: the provider has rotated its keys
            found = (await _fetch_json(meta["jwks_uri"], self.flow.session,
                                       fresh=fresh)).get("keys")
            keys = [k for k in (found if isinstance(found, list) else [])
                    if isinstance(k, dict) and k.get("kty") == kty
                    and k.get("use", "sig") == "sig" and k.get("alg", alg) == alg
                    and (kid is None or k.get("kid") == kid)]
            if keys or fresh:
                break
        return keys

    async def revoke(self, token: Token) -> bool:
        """Revoke the refresh and access token (RFC 7009); True if the server revoked one."""
        try:
            meta = await self.meta()
        except AuthError as exc:
            _logger().warning("cannot revoke the tokens of %s: %s",
                              _server_name(self.flow.host), exc.message)
            return False
        url, revoked = meta.get("revocation_endpoint"), False
        if not url:
            _logger().info("%s offers no token revocation", self.name)
            return False
        for value, hint in ((token["refresh_token"], "refresh_token"),
                            (token["access_token"], "access_token")):
            if value:
                revoked = await self._revoke_one(meta, url, value, hint) or revoked
        return revoked

    async def _revoke_one(self, meta: dict[str, Any], url: str, value: str, hint: str) -> bool:
        form, auth = self._authed(meta, {"token": value, "token_type_hint": hint})
        secrets = [value, *(auth or ())]
        try:
            resp = await self.flow.session.request("POST", url, form=form, auth=auth)
            if resp.status == 200:
                return True
            refused = _http_error(resp, resp.json(), secrets)
        except AuthError as exc:  # no answer at all
            refused = exc
        # A provider may not revoke self-contained (JWT) access tokens: no warning then.
        log = _logger().info if refused.error == "unsupported_token_type" else _logger().warning
        log("revoking the %s failed: %s", hint, _blank(refused.message, secrets))
        return False

    async def end_session(self, id_token: str) -> str | None:
        """The ``end_session_endpoint`` URL that ends the provider's browser session."""
        try:
            end = (await self.meta()).get("end_session_endpoint")
        except AuthError as exc:
            _logger().warning("no browser logout URL: %s", exc.message)
            return None
        if not end:
            return None
        return _with_query(end, {"client_id": str(self.config.client_id),
                                 **({"id_token_hint": id_token} if id_token else {})})


if TYPE_CHECKING:
    # A request to a token endpoint: the URL, the form, HTTP Basic credentials or None.
    _Call = tuple[str, dict[str, str], "tuple[str, str] | None"]


# ---------------------------------------------------------------------------
# Flows: BaseFlow, DeviceFlow (RFC 8628), CodeFlow (RFC 7636)
# ---------------------------------------------------------------------------

class _Server:
    """A py-oidc-auth server: its routes on the host, its own form fields, no revocation."""

    def __init__(self, flow: BaseFlow) -> None:
        self.flow, self.config = flow, flow.config
        self.name = flow.host

    def _url(self, route: str) -> str:
        if route.startswith(("http://", "https://")):
            return route
        return self.flow.host + "/" + route.lstrip("/")

    # py-oidc-auth reads hyphenated fields ("refresh-token", "device-code").
    async def refresh_call(self, refresh_token: str, previous: Token | None) -> _Call:
        form = {"refresh-token": refresh_token, "grant_type": "refresh-token"}
        return self._url(self.config.token_route), form, None

    async def device_call(self) -> _Call:
        return self._url(self.config.device_route), {}, None

    def device_refusal(self, exc: AuthError) -> str:
        return ""

    async def device_grant(self, device_code: str) -> _Call:
        form = {"device-code": device_code, "grant_type": "device-code"}
        return self._url(self.config.token_route), form, None

    async def login(self, receiver: _LoopbackReceiver) -> tuple[str, str, str | None]:
        """Follow the login route's redirect by hand: it names the provider URL and state."""
        from urllib.parse import parse_qs, urlencode, urlsplit

        redirect_uri = f"http://localhost:{receiver.port}/callback"
        query = urlencode({"redirect_uri": redirect_uri, "offline_access": "true",
                           "prompt": "consent"})
        login_url = f"{self._url(self.config.login_route)}?{query}"
        resp = await self.flow.session.request("GET", login_url, follow=False)
        location = resp.headers.get("Location") or ""
        if not 300 <= resp.status < 400 or not location:
            error = _http_error(resp, resp.json())
            raise AuthError(f"The login route did not redirect to a login page: "
                            f"{error.message}", error.detail, error.status_code)
        location = _web_url(location, f"the login redirect (from {login_url})",
                            self.config.allow_http)
        state = parse_qs(urlsplit(location).query).get("state", [""])[0]
        if not state:
            raise AuthError(f"{login_url} redirected to a login page without a state",
                            status_code=502)
        receiver.expect(state, location)
        # py-oidc-auth's state is "random|redirect_uri|code_verifier".
        parts = state.split("|", 2)
        return redirect_uri, parts[2] if len(parts) == 3 else "", None

    async def code_grant(self, code: str, redirect_uri: str, verifier: str) -> _Call:
        form = {"code": code, "redirect_uri": redirect_uri, "grant_type": "authorization_code"}
        if verifier:
            form["code_verifier"] = verifier
        return self._url(self.config.token_route), form, None

    async def accept(self, raw: dict[str, Any], previous: Token | None = None,
                     nonce: str | None = None) -> Token:
        return _make_token(raw, previous)

    async def revoke(self, token: Token) -> bool:
        return False

    async def end_session(self, id_token: str) -> str | None:
        return None


class BaseFlow:
    """Shared token lifecycle, caching, and persistence.

    Use `DeviceFlow` or `CodeFlow`, or the convenience function `authenticate`.
    There is one instance per class and host (``DeviceFlow(h) is DeviceFlow(h)``);
    each construction applies its arguments anew. Tokens live in a `TokenStore`
    shared by all flows of a host.

    Parameters
    ----------
    host, store, timeout
        As in `authenticate`.
    config : Config or None
        All settings at once; *host* and the other settings of `Config` are then ignored.
    interactive : bool or None
        `DeviceFlow` only: show a countdown and open a browser (None: detect).
    login_route, token_route, device_route, redirect_ports, app_name, token_env_var
        As in `Config`.
    client_id, client_secret, scopes, ca_bundle, allow_http
        As in `Config`. Each client id and scope set has its own instance and tokens.
    """

    _instances: ClassVar[dict[tuple[type, str], BaseFlow]] = {}
    _CONFIG: ClassVar[frozenset[str]] = frozenset(vars(Config("")))  # its field names
    _OPTIONS: ClassVar[frozenset[str]] = _CONFIG - {"host"} | {"store", "timeout", "interactive"}

    def __new__(cls: type[_F], host: str = "", config: Config | None = None,
                **kwargs: Any) -> _F:
        """Return the one instance of this class for the host."""
        key = (cls, _store_key(config.host, config.client_id, config.scopes)
               if config is not None
               else _store_key(host, kwargs.get("client_id"), kwargs.get("scopes")))
        instance = cls._instances.get(key)
        if instance is None:
            instance = cls._instances[key] = super().__new__(cls)
        return cast("_F", instance)

    def __init__(self, host: str = "", config: Config | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - self._OPTIONS
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
        if config is None:
            ports, scopes = kwargs.get("redirect_ports"), kwargs.get("scopes")
            config = Config(**{**{k: v for k, v in kwargs.items() if k in self._CONFIG},
                               "host": host,
                               "redirect_ports": None if ports is None else list(ports),
                               "scopes": None if scopes is None else _scopes(scopes)})
        timeout = _check_timeout(kwargs.get("timeout", 30))
        _check_ports(config.redirect_ports)
        key = _store_key(config.host, config.client_id, config.scopes)
        issuer, client_id, scopes = _split_key(key)
        if client_id and not config.client_id:  # a store key given as the host
            config = config._replace(host=issuer, client_id=client_id, scopes=scopes)
        self.config = config
        self.host = key
        self.timeout: int | None = timeout
        self._store: TokenStore | None = kwargs.get("store")
        self._session: _Session | None = None
        # The one place the two dialects part: every difference is a method of these.
        self._dialect = _Provider(self) if config.client_id else _Server(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.host!r})"

    @classmethod
    def reset_instances(cls) -> None:
        """Clear all cached per host instances (useful in tests)."""
        BaseFlow._instances.clear()

    @property
    def store(self) -> TokenStore:
        """The token store in use: the file named by ``Config.token_env_var`` when set."""
        return _default_store(self.config.app_name, self.config.token_env_var, self._store)

    @property
    def session(self) -> _Session:
        """The HTTP session: this module's own small ``urllib`` session, not httpx."""
        wanted = _Session(self.timeout, self.config.ca_bundle, self.config.allow_http)
        if self._session is None or vars(self._session) != vars(wanted):
            self._session = wanted
        return self._session

    @property
    def token(self) -> Token | None:
        """The cached token for this host, or None (expired entries are pruned)."""
        return self.store.get(self.host)

    async def refresh(self, refresh_token: str) -> Token:
        """Obtain and store a new `Token` with *refresh_token*, from an earlier login.

        Raises `AuthError` when the server refuses it (e.g. the token was revoked).
        """
        previous = self.store.get(self.host)
        if previous is not None and previous["refresh_token"] != refresh_token:
            previous = None
        return await self._save(await self._refresh_request(refresh_token, previous))

    async def authenticate(self, *, force: bool = False) -> Token:
        """Return a cached or refreshed token, else log in interactively.

        *force* skips the cache and forces a new login. Raises `AuthError` if the
        login fails, is refused, or takes longer than ``timeout``.
        """
        with _TimeLimit(self.timeout):
            if not force:
                token = await self._cached_or_refreshed()
                if token is not None:
                    return token
            return await self._interactive_login()

    async def logout(self) -> str | None:
        """Revoke this host's tokens where the provider offers it, then forget them.

        A standard provider's ``revocation_endpoint`` (RFC 7009) revokes the refresh
        and the access token; the local copy is removed in any case. Returns the
        provider's ``end_session_endpoint`` URL with ``client_id`` and ``id_token_hint``,
        to end its browser session too; None without one.
        """
        token = self.store.get(self.host)
        id_token = self.store._id_token(token["access_token"]) if token is not None else ""
        if token is not None:
            await self._sign_out(token)
            self.store.remove(self.host)
        return await self._dialect.end_session(id_token)

    # -- Internals, also for authenticate() and the command line --

    @classmethod
    def _detached(cls: type[_F], config: Config | None, **kwargs: Any) -> _F:
        """A flow outside the per-host table, for one call of authenticate_async."""
        flow = object.__new__(cls)
        flow.__init__(config=config, **kwargs)  # type: ignore[misc]
        return flow

    async def _interactive_login(self) -> Token:
        raise NotImplementedError

    async def _cached_or_refreshed(
        self, enough: Callable[[Token], bool] = _access_valid
    ) -> Token | None:
        """The cached token if *enough*, else a refreshed one; None when a login is needed."""
        token = self.store.get(self.host)
        if token is None or enough(token):
            return token
        return await self._refreshed(enough) if _refresh_valid(token) else None

    async def _refreshed(self, enough: Callable[[Token], bool] = _access_valid) -> Token | None:
        """The stored token refreshed under the store's lock; None when a login is needed."""
        fresh: list[Token] = []

        async def renew(current: Token | None) -> Token | None:
            # Another process may have refreshed while we waited for the lock.
            if current is None or enough(current) or not _refresh_valid(current):
                return current
            try:
                token = await self._refresh_request(current["refresh_token"], current)
            except AuthError as exc:
                # Some providers refuse a dead refresh token with a bare 400 or 401, no
                # OAuth error at all: that, too, means the refresh token is no longer good
                # (the server's answer, not a 400 made here, e.g. for a broken CA bundle).
                if exc.error in ("invalid_grant", "invalid_token") or (
                    exc._answered and exc.status_code in (400, 401) and not exc.error
                ):
                    _logger().info("the refresh token for %s was refused (%s); a new login is "
                                   "needed", self.host, exc.error or exc.status_code)
                    return None  # the store forgets it
                raise
            fresh.append(token)
            return token

        token = await self.store._renew_async(self.host, renew)
        return token if token is not None and (fresh or enough(token)) else None

    async def _refresh_request(self, refresh_token: str, previous: Token | None) -> Token:
        url, form, auth = await self._dialect.refresh_call(refresh_token, previous)
        raw = await self.session.post_form(
            url, form, auth=auth, deadline=time.monotonic() + (self.timeout or _HTTP_TIMEOUT) * 2,
        )
        _logger().debug("refreshed the token for %s", self.host)
        return await self._dialect.accept(raw, previous)

    async def _save(self, token: Token) -> Token:
        await self.store._renew_async(self.host, token)
        return token

    async def _sign_out(self, token: Token) -> bool:
        """Revoke *token* where the server offers it (the caller forgets it); True if revoked."""
        return await self._dialect.revoke(token)

    def _timed_out(self, waiting: str, hint: str = "") -> AuthError:
        return AuthError(f"Gave up waiting {waiting}: the timeout of {_time_limit(self.timeout):g}"
                         f" s ran out; pass a larger timeout={hint} to give more time",
                         {"error": "timeout"}, 408)


def _check_timeout(timeout: object) -> int | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    return cast(int, timeout)


def _check_ports(ports: Sequence[int]) -> None:
    if not ports:
        raise ValueError("redirect_ports must name at least one port")
    for port in ports:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"redirect_ports must be integers from 0 to 65535, not {port!r}")


class DeviceFlow(BaseFlow):
    """OAuth 2.0 Device Authorization Grant (RFC 8628).

    Best suited for CLI tools, headless servers and batch environments: the
    user opens a URL on any device, confirms a short code, and the client
    polls until approval. Parameters as for `BaseFlow`.

    Examples
    --------
    >>> flow = DeviceFlow("https://myapp.example.com", timeout=120)  # doctest: +SKIP
    >>> token = await flow.authenticate()  # doctest: +SKIP

    Step by step:

    >>> code = await flow.get_device_code()  # doctest: +SKIP
    >>> print(f"Open {code['uri']} and enter {code['user_code']}")  # doctest: +SKIP
    >>> token = await flow.poll(code["device_code"], code["interval"])  # doctest: +SKIP
    """

    def __init__(self, host: str = "", config: Config | None = None, **kwargs: Any) -> None:
        super().__init__(host, config, **kwargs)
        self.interactive: bool | None = kwargs.get("interactive")
        self._auto_open = True
        if not hasattr(self, "_device_deadlines"):  # survives a re-construction
            self._device_deadlines: dict[str, float] = {}

    async def authenticate(self, *, force: bool = False, auto_open: bool = True) -> Token:
        """`BaseFlow.authenticate` with the device flow; *auto_open* opens the URL in a browser."""
        self._auto_open = auto_open
        return await super().authenticate(force=force)

    async def get_device_code(self) -> DeviceCode:
        """Request a new `DeviceCode` (``uri``, ``user_code``, ``device_code``, ``interval``).

        Raises `AuthError` if the device endpoint is unavailable or its answer invalid.
        """
        url, form, auth = await self._dialect.device_call()
        # One attempt: a 503 here means "no device flow", not "try again".
        resp = await self.session.request("POST", url, form=form, auth=auth)
        raw = resp.json()
        if resp.status >= 400:
            raise self._device_error(resp, raw, [*form.values(), *(auth or ())])
        if not isinstance(raw, dict):
            raise AuthError(f"POST {url} answered {resp.status} with "
                            f"{'HTML' if resp.body.lstrip()[:1] == b'<' else 'not a JSON object'}"
                            "; is this the right host and route?", status_code=502)
        try:
            uris = [raw[name] for name in ("verification_uri_complete", "verification_uri")
                    if raw.get(name)] or [raw["verification_uri"]]
            code: DeviceCode = {
                "uri": _web_url(uris[0], "the verification URI", self.config.allow_http),
                "user_code": _short(str(raw["user_code"]), 100),
                "device_code": str(raw["device_code"]),
                "interval": _device_interval(raw.get("interval")),
            }
            for uri in uris[1:]:
                _web_url(uri, "the verification URI", self.config.allow_http)
            expires_in = _device_lifetime(raw.get("expires_in"), url)
        except KeyError as exc:
            raise AuthError(f"POST {url}: the device answer lacks {exc}",
                            status_code=502) from None
        self._device_deadlines[code["device_code"]] = time.monotonic() + expires_in
        return code

    async def poll(self, device_code: str, interval: int = 5) -> Token:
        """Poll for the `Token` of *device_code* (from `get_device_code`) until approval.

        Never polls faster than *interval* seconds, adds 5 s on every ``slow_down``.
        Waits at most until the device code expires or ``timeout`` passes, and polls
        one last time then: an approval made in time always counts. Raises `AuthError`
        on timeout (``detail["error"] == "timeout"``), ``access_denied`` or
        ``expired_token``.
        """
        start = time.monotonic()
        expires = deadline = self._device_deadlines.pop(device_code, start + 1800)
        left = _time_left(self.timeout)
        if left is not None:
            deadline = min(deadline, start + left)
        interval = max(1, int(interval))
        show = _Progress.on_stderr(self.interactive)
        url, form, auth = await self._dialect.device_grant(device_code)
        try:
            while True:
                # The last poll is made at the deadline itself, however soon after the one
                # before: an approval made in time counts (the HTTP layer gives it grace).
                last = time.monotonic() + interval >= deadline
                await _countdown(deadline - time.monotonic() if last else interval,
                                 deadline, show)
                try:
                    raw = await self.session.post_form(url, form, deadline=deadline, auth=auth)
                except AuthError as exc:
                    if exc.error in ("authorization_pending", "slow_down") and last:
                        raise self._gave_up(start, deadline < expires) from None
                    if exc.error == "slow_down":  # RFC 8628, 3.5
                        interval += 5
                        _logger().debug("slow_down: polling every %d s now", interval)
                    elif exc.error != "authorization_pending":
                        raise self._poll_error(exc) from None
                    continue
                return await self._save(await self._dialect.accept(raw))
        finally:
            if show:
                show.close()

    # -- Internals --

    def _device_error(self, resp: _Response, payload: Any, secrets: list[str]) -> AuthError:
        """The device endpoint's error answer; `_NoDeviceFlow` when it means no device flow."""
        exc = _http_error(resp, payload, secrets)
        what = self._dialect.device_refusal(exc)
        if not what and (exc.status_code in _NO_DEVICE_STATUS or (
            # py-oidc-auth's 502 when its provider has no device endpoint
            exc.status_code == 502 and b"device_authorization" in resp.body
        )):
            what = "does not offer the device flow"
        if not what:
            return exc
        return _NoDeviceFlow(f"{self._dialect.name} {what} ({exc.message})", exc.detail,
                             exc.status_code)

    def _poll_error(self, exc: AuthError) -> AuthError:
        """What a poll's final error *exc* means, in words a user can act on."""
        server = _server_name(self.host)
        if exc.error == "access_denied":
            return AuthError(f"The login to {server} was denied", exc.detail, exc.status_code)
        if exc.error == "expired_token":
            return AuthError(f"The device code for {server} expired before the login was "
                             "approved; start the login again", exc.detail, exc.status_code)
        if exc.error in ("unauthorized_client", "unsupported_grant_type"):
            # A provider that hands out device codes to a client that may not redeem
            # them: authenticate() then uses the code flow.
            return _NoDeviceFlow(f"{server} refused the device login at its token endpoint "
                                 f"({exc.message}): this client may not use the device flow",
                                 exc.detail, exc.status_code)
        return exc

    def _gave_up(self, start: float, ours: bool) -> AuthError:
        """The end of a wait: our own time limit (*ours*), or the device code's lifetime."""
        if not ours:  # the same end as the server's expired_token
            ran_out = {"error": "expired_token",
                       "error_description": "the device code's expires_in ran out"}
            return self._poll_error(AuthError("", ran_out, 408))
        return self._timed_out(f"for the login to {_server_name(self.host)} to be approved after "
                               f"{time.monotonic() - start:.0f} s",
                               " (None waits as long as the device code lives)")

    async def _interactive_login(self) -> Token:
        code = await self.get_device_code()
        replace = _show_device_code(self.host, code)
        if self._auto_open and self.interactive is not False and _can_open_browser():
            _open_browser(code["uri"])
        server = _server_name(self.host)
        outcome = f"Login to {server} cancelled."
        try:
            token = await self.poll(code["device_code"], code["interval"])
            outcome = f"Logged in to {server}."
            return token
        except AuthError as exc:
            outcome = f"Login to {server} failed: {_short(exc.message)}"
            raise
        finally:
            if replace is not None:  # a notebook: the link and code give way to the outcome
                replace(outcome)


def _device_interval(value: object) -> int:
    """RFC 8628, 3.2: 5 s when the server gives no usable interval; 1 to 60 s."""
    number = _finite(value)
    return 5 if not number or number < 0 else int(min(max(number, 1), 60))


def _device_lifetime(value: object, url: str) -> float:
    """The device code's lifetime in seconds (600 when not given), at most a day."""
    if value is None or value in ("", 0):
        return 600.0
    number = _finite(value)
    if number is None or number <= 0:
        raise AuthError(f"POST {url}: the device answer's expires_in "
                        f"{_short(_dumps(value), 40)} is not a number of seconds; "
                        "tell the server's operators", status_code=502)
    return min(number, 86400.0)


# How long a code flow made with timeout=None waits: forever for the API; the command
# line, where a person is always in the loop, gives up after _CLI_CODE_FLOW_WAIT.
_CODE_FLOW_WAIT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "_CODE_FLOW_WAIT", default=None)
_CLI_CODE_FLOW_WAIT = 300


class CodeFlow(BaseFlow):
    """OAuth 2.0 Authorization Code Grant with PKCE.

    Opens the provider's login page in a local browser, receives the
    callback on a loopback HTTP server (RFC 8252) and exchanges the code for
    tokens.  Best suited for desktops; on a remote machine it prints the
    ``ssh -L`` command that forwards the callback port. Parameters as for
    `BaseFlow`.

    Examples
    --------
    >>> flow = CodeFlow("https://myapp.example.com", timeout=120)  # doctest: +SKIP
    >>> token = await flow.authenticate()  # doctest: +SKIP
    """

    def __init__(self, host: str = "", config: Config | None = None, **kwargs: Any) -> None:
        super().__init__(host, config, **kwargs)
        if self.timeout is None:
            self.timeout = _CODE_FLOW_WAIT.get()

    async def _interactive_login(self) -> Token:
        import asyncio

        loop = asyncio.get_running_loop()
        result: asyncio.Future[dict[str, str]] = loop.create_future()
        receiver = _LoopbackReceiver(self.config.redirect_ports, loop, result)
        try:
            # The verifier and nonce stay in memory: never in a URL, a log or a message.
            redirect_uri, verifier, nonce = await self._dialect.login(receiver)
            # The provider URL carries the state (py-oidc-auth's holds the PKCE verifier):
            # show and open the receiver's one-time entry page that redirects to it instead.
            self._tell_user(receiver.entry_url, receiver.port)
            if _can_open_browser():
                _open_browser(receiver.entry_url)
            try:
                params = await asyncio.wait_for(result, _time_left(self.timeout))
            except asyncio.TimeoutError:
                raise self._timed_out(f"for the login to {_server_name(self.host)}") from None
        finally:
            await asyncio.to_thread(receiver.close)
        if "error" in params:  # made printable and short by the receiver
            description = params.get("error_description", "")
            raise AuthError(
                f"The login to {_server_name(self.host)} failed: {params['error']}"
                + (f": {description}" if description else ""),
                {"error": params["error"], "error_description": description}, 400)
        url, form, auth = await self._dialect.code_grant(params["code"], redirect_uri, verifier)
        raw = await self.session.post_form(url, form, auth=auth)
        return await self._save(await self._dialect.accept(raw, nonce=nonce))

    def _tell_user(self, url: str, port: int) -> None:
        url = _web_url(url, "the login URL")
        within = f" within {_duration(int(self.timeout))}" if self.timeout else ""
        _say(f"To log in to {_server_name(self.host)}{within}, open this URL in a browser:"
             f"\n    {url}")
        if _is_remote():
            _say(f"This is a remote session: forward the callback port first, on your own "
                 f"machine run\n    ssh -L {port}:localhost:{port} <this-host>")


# ---------------------------------------------------------------------------
# Loopback receiver (RFC 8252, 7.3)
# ---------------------------------------------------------------------------

_PAGE = ("<!doctype html><meta charset=utf-8><title>{title}</title>"
         "<body style='font-family:sans-serif;margin:3em'><h1>{title}</h1><p>{text}</p>")
_ONLY_CALLBACKS = "This address only receives login callbacks."
# A browser sends its request at once: a connection that has not sent its head in
# this time is dropped, so idle or dripping clients hold neither a thread nor close().
_REQUEST_SECONDS = 5.0
_MAX_REQUEST = 16384
_MAX_CONNECTIONS = 64


class _LoopbackReceiver:
    """The code flow's callback listener on every loopback address of one port.

    The browser starts at ``entry_url``, an unguessable page served once, which
    redirects to the provider; the provider sends it back to ``/callback``.
    """

    def __init__(self, ports: Sequence[int], loop: asyncio.AbstractEventLoop,
                 result: asyncio.Future[dict[str, str]]) -> None:
        import secrets
        import threading

        self._loop, self._result = loop, result
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._connections: set[socket.socket] = set()
        self._served = False
        self._expected = ("", "", "", False)  # state, login URL, issuer, issuer required
        # Another user sees the port in the process list: only this path serves the
        # redirect that carries the state (and py-oidc-auth's verifier inside it).
        self._entry = "/" + secrets.token_urlsafe(32)
        self._sockets = _listen_on_loopback(ports)
        self.port: int = self._sockets[0].getsockname()[1]
        self.entry_url = f"http://127.0.0.1:{self.port}{self._entry}"
        self._thread = threading.Thread(target=self._serve, name="oidc-callback", daemon=True)
        self._thread.start()

    def expect(self, state: str, login_url: str, iss: str = "",
               iss_required: bool = False) -> None:
        """Serve *login_url* at the entry page; accept only callbacks that carry *state*."""
        with self._lock:
            self._expected = (state, login_url, iss, iss_required)

    def close(self) -> None:
        """Stop listening and drop every open connection; returns at once."""
        self._closed.set()
        self._thread.join(2)
        with self._lock:
            _abort(self._connections)  # wakes each connection's thread, which closes it
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> _LoopbackReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        import selectors
        import threading

        with selectors.DefaultSelector() as selector:
            for sock in self._sockets:
                selector.register(sock, selectors.EVENT_READ, sock)
            while not self._closed.is_set():
                for key, _ in selector.select(0.1):
                    try:
                        conn, _ = key.data.accept()
                    except OSError:  # gone before it was accepted
                        continue
                    try:
                        with self._lock:
                            if len(self._connections) >= _MAX_CONNECTIONS:
                                raise RuntimeError("too many connections")
                            self._connections.add(conn)
                        threading.Thread(target=self._handle, args=(conn,),
                                         name="oidc-callback", daemon=True).start()
                    except RuntimeError:  # full, or no thread to be had: drop it, go on
                        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)
        conn.close()

    def _handle(self, conn: socket.socket) -> None:
        try:
            if not _peer_is_this_user(conn):
                _logger().debug("loopback receiver: refused a connection of another user")
                return
            line = _read_request(conn)
            if line:
                page, outcome = self._answer(line)
                try:
                    conn.sendall(page)
                finally:  # only now: the flow then closes us, which would cut the page
                    if outcome is not None:
                        self._deliver(outcome)
        except OSError:  # timed out, reset, or dropped by close()
            pass
        finally:
            self._drop(conn)

    def _answer(self, line: str) -> tuple[bytes, dict[str, str] | None]:
        """The page for a request, and the outcome it hands the flow, if any."""
        from urllib.parse import parse_qs, urlsplit

        method, target, *_ = [*line.split(" ", 2), "", ""]
        try:
            parts = urlsplit(target)
        except ValueError:  # a target urlsplit cannot read, e.g. "//[x"
            return _page(400, "Bad request", _ONLY_CALLBACKS), None
        entry = _same(parts.path, self._entry)
        # The path only: the query holds the code, the entry path is the secret.
        _logger().debug("loopback receiver: %s %s", _printable(method)[:10],
                        "(entry page)" if entry else _printable(parts.path)[:100])
        if method != "GET":
            return _page(405, "Not allowed", _ONLY_CALLBACKS), None
        if parts.path == "/callback":
            return self._callback({k: v[0] for k, v in parse_qs(parts.query).items()})
        if entry and self._expected[1]:  # the login URL is known: serve it once
            return self._entry_page()
        return _page(404, "Not found", _ONLY_CALLBACKS), None

    def _entry_page(self) -> tuple[bytes, dict[str, str] | None]:
        with self._lock:
            first, self._served = not self._served, True
        if first:
            return _page(302, "Login", "Continue at the login page.", self._expected[1]), None
        # Someone else may hold the state now: this login can no longer be trusted.
        return self._stop("login_page_reused", "This login page was opened twice, possibly "
                          "by another user of this machine. The login was stopped: start it "
                          "again.", status=409)

    def _callback(self, query: dict[str, str]) -> tuple[bytes, dict[str, str] | None]:
        with self._lock:
            (expected, _, iss, iss_required), served = self._expected, self._served
        if self._result.done():
            return _page(409, "Already done", "This login has already finished."), None
        if not (expected and _same(query.get("state", ""), expected)):
            # Not our login (an error without state too): refuse it, keep waiting.
            return _page(400, "Login not accepted",
                         "This callback does not belong to the waiting login (state "
                         "mismatch). Start the login again from your terminal."), None
        if not served:  # the right state, yet nobody was sent to the provider with it
            return self._stop("login_page_not_opened", "A login answer arrived before the "
                              "login page was opened. The login was stopped: start it again.")
        if "error" in query:
            error = _printable(query["error"])[:100]
            description = _printable(query.get("error_description", ""))[:300]
            return (_page(400, "Login failed", f"{error}: {description}"),
                    {"error": error, "error_description": description})
        if not query.get("code"):
            return _page(400, "Login failed", "The callback carries no code."), None
        if iss and ("iss" in query or iss_required) and query.get("iss") != iss:
            # RFC 9207, 2.4: a response from another issuer; never exchange its code.
            return self._stop("invalid_issuer", f"The login answer did not come from {iss} "
                              "(iss).", title="Login not accepted")
        page = _page(200, "Login successful",
                     "You can close this window and return to your terminal.")
        return page, {"code": query["code"]}

    def _stop(self, error: str, text: str, status: int = 400,
              title: str = "Login stopped") -> tuple[bytes, dict[str, str]]:
        """End the login with *error*, and tell the browser why."""
        return _page(status, title, text), {"error": error, "error_description": text}

    def _deliver(self, params: dict[str, str]) -> None:
        def _set() -> None:
            if not self._result.done():
                self._result.set_result(params)

        self._loop.call_soon_threadsafe(_set)


def _same(text: str, secret: str) -> bool:
    import hmac

    return hmac.compare_digest(text.encode(), secret.encode())


def _page(status: int, title: str, text: str, location: str = "") -> bytes:
    """A complete HTTP/1.1 answer with a small HTML page; the connection then closes."""
    from html import escape
    from http import HTTPStatus

    body = _PAGE.format(title=escape(title), text=escape(text)).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: text/html; charset=utf-8", f"Content-Length: {len(body)}",
            "Cache-Control: no-store", "Referrer-Policy: no-referrer", "Connection: close"]
    if location:  # a server's URL: no line break may end the header early
        head.append(f"Location: {_printable(location)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body


def _read_request(conn: socket.socket) -> str:
    """The request line, once the whole head has arrived in time; "" if not."""
    deadline = time.monotonic() + _REQUEST_SECONDS
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > _MAX_REQUEST:
            return ""
        conn.settimeout(left)
        chunk = conn.recv(4096)
        if not chunk:
            return ""
        data += chunk
    return data.split(b"\n", 1)[0].decode("latin-1").strip()


def _peer_is_this_user(conn: socket.socket) -> bool:
    """Whether the other end of a loopback connection runs as this user (or root)."""
    import socket
    import struct

    if not sys.platform.startswith("linux"):  # only Linux lists the owners of TCP sockets
        return True

    def key(address: Any) -> str:  # as the kernel writes it: host-order words, hex
        packed = socket.inet_pton(conn.family, address[0])
        words = struct.unpack(f"={len(packed) // 4}I", packed)
        return "".join(f"{word:08X}" for word in words) + f":{address[1]:04X}"

    ours, theirs = key(conn.getsockname()), key(conn.getpeername())
    six = "6" if conn.family == socket.AF_INET6 else ""
    try:
        with open(f"/proc/net/tcp{six}", encoding="ascii", errors="replace") as fh:
            rows = [line.split() for line in fh]
    except OSError:
        return True
    owners = {(row[1], row[2]): row[7] for row in rows[1:] if len(row) > 7}
    if (ours, theirs) not in owners:
        return True  # the table does not show sockets (WSL 1): nothing to judge by
    allowed = {str(os.geteuid()), "0", os.environ.get("SUDO_UID", "0")}
    return owners.get((theirs, ours)) in allowed


def _listen_on_loopback(ports: Sequence[int]) -> list[socket.socket]:
    """Sockets on the first of *ports* free on every loopback address: a browser may try any."""
    errors = []
    for port in ports:
        # Port 0: the port the kernel picked for 127.0.0.1 may be taken on ::1; pick again.
        for _ in range(5 if port == 0 else 1):
            sockets: list[socket.socket] = []
            try:
                for family, host in _loopback_addresses():
                    sock = _bind(family, host, sockets[0].getsockname()[1] if sockets else port)
                    if sock is not None:
                        sockets.append(sock)
                return sockets
            except BaseException as exc:
                for sock in sockets:
                    sock.close()
                if not isinstance(exc, OSError):
                    raise
                error = f"{port}: {exc.strerror or exc}"
        errors.append(error)
    raise AuthError("No free port for the login callback (" + "; ".join(errors)
                    + "); pass other redirect_ports")


def _bind(family: int, host: str, port: int) -> socket.socket | None:
    """A listening socket on *host* and *port*; None where the machine has no IPv6."""
    import errno
    import socket

    sock = None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if sys.platform == "win32":  # SO_REUSEADDR on Windows lets others steal the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:  # binds over an earlier login's TIME_WAIT; a second listener still fails
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
        sock.setblocking(False)
        return sock
    except BaseException as exc:
        if sock is not None:
            sock.close()
        if family == socket.AF_INET6 and isinstance(exc, OSError) and exc.errno in (
                errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            return None  # IPv6 is off here: nobody else can listen there either
        raise


def _loopback_addresses() -> list[tuple[int, str]]:
    """127.0.0.1 (first: the redirect URI of standard providers), ::1, and localhost's."""
    import socket

    found: list[tuple[int, str]] = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
    try:
        infos = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    for family, _, _, _, address in infos:
        host = str(address[0])
        if family not in (socket.AF_INET, socket.AF_INET6) or (family, host) in found:
            continue
        if _is_loopback(host):
            found.append((family, host))
        else:  # never listen beyond loopback; browsers map localhost to loopback anyway
            _logger().debug("localhost resolves to %s: not listening there", host)
    return found


# ---------------------------------------------------------------------------
# authenticate: cached, refreshed or a new login, sync and async
# ---------------------------------------------------------------------------

def authenticate(
    host: str,
    *,
    login_route: str = "/auth/v2/login",
    token_route: str = "/auth/v2/token",
    device_route: str = "/auth/v2/device",
    redirect_ports: list[int] | None = None,
    store: TokenStore | None = None,
    app_name: str = "py-oidc-auth",
    force: bool = False,
    timeout: int | None = 30,
    client_id: str | None = None,
    client_secret: str | None = None,
    scopes: str | Sequence[str] | None = None,
    ca_bundle: str | None = None,
    allow_http: bool = False,
) -> Token:
    """Authenticate to an OIDC protected server and return a token.

    1. A valid cached access token for *host* is returned at once.
    2. An expired one is refreshed with its refresh token.
    3. Otherwise an interactive login starts: the device flow, or the
       authorization code flow (local browser) when the server has no device
       flow. Where nobody can answer a login (a batch job, no terminal) an
       `AuthError` says what to do instead.

    Tokens are stored per host (per issuer, client id and scopes for a
    provider), so several servers can be used side by side. Works in scripts
    and inside a running event loop (Jupyter).

    Parameters
    ----------
    host : str
        Base URL of the application server (e.g. ``"https://myapp.example.com"``);
        with ``client_id``, the OpenID provider's issuer URL.
    store : TokenStore or None
        Custom `TokenStore`. When None a default store in the platform cache
        directory is used (e.g. ``~/.cache/<app_name>/token-store.json``).
    force : bool
        Skip the cache and force a fresh interactive login.
    timeout : int or None
        Maximum seconds to wait for the user to complete the login. None
        waits indefinitely.
    login_route, token_route, device_route, redirect_ports, app_name : optional
        As in `Config`.
    client_id, client_secret, scopes, ca_bundle, allow_http : optional
        As in `Config`; ``scopes`` may also be one space separated string.

    Returns
    -------
    Token
        A token dict; ``token["headers"]`` is ready to use:
        ``{"Authorization": "Bearer eyJ..."}``.

    Raises
    ------
    AuthError
        If authentication fails (timeout, user denial, server error, or no
        interactive session available in a batch environment).

    Examples
    --------
    >>> token = authenticate(host="https://myapp.example.com")  # doctest: +SKIP
    >>> token = authenticate("https://myapp.example.com", force=True)  # doctest: +SKIP
    >>> token = authenticate("https://myapp.example.com", app_name="my-project")  # doctest: +SKIP

    A standard OpenID provider, directly:

    >>> token = authenticate("https://keycloak.example.org/realms/science",
    ...                      client_id="cli")  # doctest: +SKIP
    """
    arguments = dict(locals())  # the parameters as given, handed on whole
    if not force:
        # The hot path: no flow objects, no asyncio, no network.
        token = _default_store(app_name, _TOKEN_FILE_VAR, store).get(
            _store_key(host, client_id, scopes))
        if token is not None and _access_valid(token):
            return token
    return _run_sync(authenticate_async(**arguments))


async def authenticate_async(
    host: str,
    *,
    login_route: str = "/auth/v2/login",
    token_route: str = "/auth/v2/token",
    device_route: str = "/auth/v2/device",
    redirect_ports: list[int] | None = None,
    store: TokenStore | None = None,
    app_name: str = "py-oidc-auth",
    force: bool = False,
    timeout: int | None = 30,
    client_id: str | None = None,
    client_secret: str | None = None,
    scopes: str | Sequence[str] | None = None,
    ca_bundle: str | None = None,
    allow_http: bool = False,
) -> Token:
    """`authenticate` (same parameters, `Token` and `AuthError`) for code inside an event loop."""
    options = dict(locals())
    del options["force"]
    device = DeviceFlow._detached(None, **options)  # its Config made from the options
    with _TimeLimit(timeout):  # the whole login, requests included
        if not force:
            token = await device._cached_or_refreshed()
            if token is not None:
                return token
        refusal = _login_refusal(device, force)
        if refusal is not None:
            raise refusal
        try:
            return await device._interactive_login()
        except _NoDeviceFlow as exc:
            refused = exc
        code = CodeFlow._detached(device.config, store=store, timeout=timeout)
        if not refused.error:  # a server without the device flow: nothing to tell
            _logger().debug("%s; using the code flow", refused.message)
            return await code._interactive_login()
        # The provider refused this client the device flow: say so now, and again if
        # the code flow fails too, since the client's registration may be the cause.
        _say(f"The device login was refused ({_short(refused.message, 300)}); "
             "trying the browser login instead.")
        try:
            return await code._interactive_login()
        except AuthError as exc:
            raise AuthError(
                f"{exc.message}. Before that, the device login was refused: "
                f"{_short(refused.message, 300)}. Check the client id and its registration "
                "at the provider (allowed grant types, redirect URIs)",
                {**exc.detail, "device_error": refused.error}, exc.status_code) from None


def _login_refusal(device: DeviceFlow, force: bool) -> AuthError | None:
    """The error to raise at once when nobody here could answer a login, else None."""
    env_var = device.config.token_env_var
    token_file = None if force else os.environ.get(env_var)
    reason = None if token_file else _no_login_reason()
    if not token_file and not reason:
        return None
    server, command = _server_name(device.host), _login_command(device.host)
    if token_file:  # "use this file": a job handed one fails when it is used up, never logs in
        message = (f"Not logged in to {server}: the token file {token_file} ({env_var}) "
                   f"{_token_file_state(token_file)}. Make a new token file on a "
                   f"workstation: {command} --export {token_file}")
    else:
        message = (f"Not logged in to {server}, and {reason}. Log in once on a workstation "
                   f"({command}); in a batch job, point {env_var} at a token file made "
                   f"there ({command} --export token.json).")
    return AuthError(message, {"error": "login_required"}, 401)


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C or "Interrupt kernel" during a sync login in a running loop (a notebook)."""

    def _render_traceback_(self) -> list[str]:
        # IPython's hook: one line instead of frames through threading and this module.
        return [f"KeyboardInterrupt: {self}"]


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run *coro* to completion, also when the caller's thread runs a loop (Jupyter)."""
    import asyncio

    try:
        asyncio.get_running_loop()
        outside_a_loop = False
    except RuntimeError:
        outside_a_loop = True
    if outside_a_loop:  # not in the except clause: a failure is not shown "During handling"
        return asyncio.run(coro)
    import threading

    # On a loop of its own in a worker thread; the caller's loop is blocked while we
    # wait (the call is synchronous).  The worker gets the caller's context: ipykernel
    # keeps the current cell in context variables, so output lands in that cell.
    done: dict[str, Any] = {}

    async def _main() -> _T:
        done["loop"], done["task"] = asyncio.get_running_loop(), asyncio.current_task()
        if done.get("cancel"):  # interrupted before the task was known
            done["task"].cancel()
        return await coro

    def _work() -> None:
        try:
            done["result"] = asyncio.run(_main())
        except BaseException as exc:
            done["error"] = exc

    worker = threading.Thread(target=contextvars.copy_context().run, args=(_work,),
                              name="oidc-auth", daemon=True)
    worker.start()
    _join(worker, done)
    if "error" in done:
        raise done["error"]
    return cast("_T", done["result"])


def _join(worker: Any, done: dict[str, Any]) -> None:
    """Wait for *worker*; when interrupted, cancel its login (freeing its port) and raise."""
    import asyncio

    caller = asyncio.current_task()
    try:
        while worker.is_alive():
            worker.join(0.25)  # a timed wait lets Ctrl-C / "interrupt kernel" through
            # Python 3.11+: asyncio.run turns Ctrl-C into a cancel of its main task,
            # which this blocked call would only see after the login.
            if caller is not None and getattr(caller, "cancelling", lambda: 0)():
                raise asyncio.CancelledError
    except BaseException as exc:
        done["cancel"] = True
        if "task" in done:
            done["loop"].call_soon_threadsafe(done["task"].cancel)
        if not isinstance(exc, KeyboardInterrupt):
            raise
        worker.join(1.0)  # let it say "cancelled" while the cell still shows its output
        raise _Interrupted("the login was cancelled") from None


# ---------------------------------------------------------------------------
# Adapters: BearerAuth for requests and httpx
# ---------------------------------------------------------------------------

class BearerAuth:
    """Bearer-token auth for ``requests`` and ``httpx`` that keeps itself fresh.

    Pass it as ``auth=`` to ``requests`` (a call or a ``Session``), to
    ``httpx.Client`` or to ``httpx.AsyncClient``. Each request carries the
    header of `authenticate` (`authenticate_async` for async clients), so a
    token is refreshed shortly before it expires. A 401 all the same counts as
    expiry: the request is sent once more with a fresh token. A second 401, or
    one to a token without a refresh token, is returned as it is: an API's 401
    never starts a login. Neither package is imported here; an instance made
    after ``import httpx`` is an ``httpx.Auth``. For the retry a ``requests``
    body must be bytes or str.

    Parameters
    ----------
    host : str
        Base URL of the server that issues the tokens.
    **authenticate_kwargs
        Keyword arguments of `authenticate`, except ``force``.
    """

    def __new__(cls, host: str, **authenticate_kwargs: Any) -> BearerAuth:
        """Make an ``httpx.Auth`` as well when httpx is loaded (not imported here)."""
        # httpx turns any other callable into a one-shot auth: the header, no retry.
        base = getattr(sys.modules.get("httpx"), "Auth", None)
        if isinstance(base, type) and not issubclass(cls, base):
            if cls not in _HTTPX_AUTH:
                _HTTPX_AUTH[cls] = type(cls.__name__, (cls, base), {
                    "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                    "__doc__": cls.__doc__})
            cls = _HTTPX_AUTH[cls]
        return super().__new__(cls)

    def __init__(self, host: str, **authenticate_kwargs: Any) -> None:
        unknown = set(authenticate_kwargs) - set(authenticate.__kwdefaults__ or ()) | (
            {"force"} & set(authenticate_kwargs))
        if unknown:
            raise TypeError(f"BearerAuth got unexpected keyword arguments: "
                            f"{', '.join(sorted(unknown))}")
        _host_key(host)  # a bad URL fails here, not at the first request
        self.host = host
        self._kwargs = authenticate_kwargs

    def __repr__(self) -> str:
        return f"BearerAuth({_host_key(self.host)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        from functools import partial

        return partial(BearerAuth, self.host, **self._kwargs), ()

    def __call__(self, request: Any) -> Any:
        """Add the header to a ``requests`` request, with a hook that retries a 401."""
        token = self._token()
        request.headers["Authorization"] = token["headers"]["Authorization"]
        register = getattr(request, "register_hook", None)
        if register is not None:  # httpx's function auth has no hooks: header only
            register("response", lambda response, **kw: self._retry_401(response, token, **kw))
        return request

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        """The ``httpx.Client`` flow: send, and on a 401 once more with a fresh token."""
        request.read()  # the whole body first, so that the retry can send it again
        flow = self._flow(request)
        step = next(flow)
        while True:
            answer = self._token() if step is None else (yield step)
            try:
                step = flow.send(answer)
            except StopIteration:
                return

    auth_flow = sync_auth_flow

    async def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        """The ``httpx.AsyncClient`` flow, with `authenticate_async`."""
        await request.aread()
        flow = self._flow(request)
        step = next(flow)
        while True:
            if step is None:
                answer = await authenticate_async(self.host, **self._kwargs)
            else:
                answer = yield step
            try:
                step = flow.send(answer)
            except StopIteration:
                return

    def _token(self) -> Token:
        return authenticate(self.host, **self._kwargs)

    def _flow(self, request: Any) -> Generator[Any, Any, None]:
        """The httpx flow of both clients: yields None for a token, a request to send it."""
        token = yield None
        request.headers["Authorization"] = token["headers"]["Authorization"]
        response = yield request
        if _refused(response, token):
            header = _renewal(token, (yield None))
            if header is not None:
                request.headers["Authorization"] = header
                yield request

    def _retry_401(self, response: Any, sent: Token, **send_kwargs: Any) -> Any:
        """The ``requests`` response hook: resend a 401 once, with a fresh token."""
        request = response.request
        if (
            getattr(request, "_oidc_retry", False)
            or not (request.body is None or isinstance(request.body, (bytes, str)))
            or getattr(response, "connection", None) is None
            or not _refused(response, sent)
        ):
            return response
        header = _renewal(sent, self._token())
        if header is None:
            return response
        response.content  # noqa: B018 -- read the 401 so its connection can be reused
        response.close()
        retry = request.copy()
        retry.headers["Authorization"] = header
        retry._oidc_retry = True
        new = response.connection.send(retry, **send_kwargs)
        new.history.append(response)
        new.request = retry
        return new


_HTTPX_AUTH: dict[type, type[BearerAuth]] = {}


def _refused(response: Any, token: Token) -> bool:
    """Whether *response* refuses *token* and a refresh may help; then it counts as expired."""
    if (
        response.status_code != 401
        # not after a redirect to another host, which dropped the header
        or response.request.headers.get("Authorization") != token["headers"]["Authorization"]
        or not _refresh_valid(token)
    ):
        return False
    _seen(token["access_token"], _lifetime(token), refused=True)
    return True


def _renewal(sent: Token, token: Token) -> str | None:
    """The header to retry with, or None when the refused token came back."""
    if token["access_token"] == sent["access_token"]:
        _seen(sent["access_token"], _lifetime(sent))
        return None
    return token["headers"]["Authorization"]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

_EXIT_MIN_VALID = 3

_EPILOG = """\
examples:
  URL=https://myapp.example.com
  oidc-auth $URL                           log in, or reuse the cached token
  curl -H "Authorization: Bearer $(oidc-auth $URL --access-token)" $URL/api/data
  curl -H "$(oidc-auth $URL --header)" $URL/api/data
  oidc-auth $URL --json                    the token as JSON, without the refresh token
  oidc-auth $URL --export ~/job-token.json   a private token file for batch jobs
  OIDC_TOKEN_FILE=~/job-token.json oidc-auth $URL --min-valid 3600 || exit
  oidc-auth --list                         cached hosts and how long their tokens last
  oidc-auth --logout $URL                  revoke at the server if it can, then forget
  oidc-auth --doctor                       what the library sees here, for bug reports

exit codes:
  0    success
  1    the login, the refresh or the token store failed (the message says why)
  2    usage error
  3    --min-valid: the token would expire too soon, even after a refresh
  130  interrupted

environment:
  OIDC_TOKEN_FILE      use and refresh this token file (--export makes one); never log in
  BROWSER              the browser to open; also allows a login without a terminal
  NO_COLOR, TERM=dumb  show the countdown without escape sequences
  HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE   proxy and CA bundle for the connection
  OIDC_ALLOW_HTTP=1    allow plain http:// to other machines, as --allow-http does
"""


def _epilog(prog: str) -> str:
    """The help's examples, spelled with the command the user ran."""
    import re

    if prog == "oidc-auth":
        return _EPILOG
    grow = len(prog) - len("oidc-auth")

    def respell(line: Any) -> str:
        text: str = line.group().replace("oidc-auth", prog)
        return re.sub(r"   +", lambda gap: " " * max(2, len(gap.group()) - grow), text,
                      count=1)

    return re.sub(r"^  .*oidc-auth.*$", respell, _EPILOG, flags=re.M)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``oidc-auth`` command line; return its exit code (``--help`` lists them)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    # Also for a HOST that is a store key with a client id; a py-oidc-auth server ignores it.
    args.client_secret = args.client_secret or os.environ.get("OIDC_CLIENT_SECRET") or None
    args.scope = _scopes(args.scope) if args.scope else None
    _LOG_SETUP[:] = [lambda: _setup_logging(args.verbose)]  # logging: imported only if used
    if args.verbose:  # the log starts with what runs
        _logger().debug("py_oidc_auth_client %s (%s), Python %s", __version__,
                        os.path.abspath(__file__), sys.version.split()[0])
    try:
        return _cli(args)
    except (AuthError, OSError, ValueError) as exc:  # OSError: e.g. an unusable cache folder
        # Messages carry server text: printable, whatever made them.
        print(f"oidc-auth: error: {_printable(_in_cli_words(exc))}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except KeyboardInterrupt:
        print("oidc-auth: interrupted", file=sys.stderr)
        return 130


def _parser() -> Any:
    import argparse

    prog = _command()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Log in to a py-oidc-auth server (or use the cached token) and print it.\n"
                    "Prompts and progress go to stderr; stdout carries only the result.",
        epilog=_epilog(prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("host", nargs="?", metavar="HOST", help="base URL of the server")
    group = parser.add_argument_group("output (one of them; default: a one-line summary)")
    output = group.add_mutually_exclusive_group()
    output.add_argument("--access-token", action="store_true",
                        help="print only the access token")
    output.add_argument("--header", action="store_true",
                        help='print the line "Authorization: Bearer <access token>"')
    output.add_argument("--json", action="store_true",
                        help="print the token as JSON on stdout, without the refresh token")
    group.add_argument("--show-secrets", action="store_true",
                       help="with --json: include the refresh token")
    group = parser.add_argument_group("batch jobs")
    group.add_argument("--export", metavar="FILE",
                       help="also write the token, refresh token included, to FILE (readable "
                            "by you only) for a batch job's OIDC_TOKEN_FILE")
    group.add_argument("--min-valid", metavar="SECONDS", type=int,
                       help=f"exit {_EXIT_MIN_VALID} unless the token stays usable for SECONDS "
                            "more, refreshing it first if that helps: the refresh token counts, "
                            "but only the access token with --access-token, --header or --json")
    group = parser.add_argument_group("the token cache")
    group.add_argument("--list", action="store_true",
                       help="list the hosts with cached tokens and how long they last")
    group.add_argument("--remove", metavar="HOST", help="remove the cached token of HOST")
    group.add_argument("--logout", metavar="HOST",
                       help="revoke the token of HOST at the server (where it offers that), "
                            "then remove it from the cache")
    group.add_argument("--clear", action="store_true", help="remove all cached tokens")
    group.add_argument("--app-name", default="py-oidc-auth",
                       help="cache directory name (default: py-oidc-auth)")
    _add_login_arguments(parser.add_argument_group("the login"))
    group = parser.add_argument_group("diagnostics")
    group.add_argument("--doctor", action="store_true",
                       help="show what the library detects here and what it decides")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="debug log on stderr, secrets redacted")
    group.add_argument("--version", action="version", version=f"oidc-auth {__version__}")
    return parser


def _add_login_arguments(group: Any) -> None:
    group.add_argument("--timeout", type=int, metavar="SECONDS",
                       help="seconds to wait for the login (default: as long as the device "
                            f"code lives, {_CLI_CODE_FLOW_WAIT // 60} min for a login in the "
                            "browser; 0 waits as long as the server allows)")
    group.add_argument("--force", action="store_true", help="log in even if a token is cached")
    group.add_argument("--allow-http", action="store_true",
                       help="allow plain http:// to a host that is not this machine (tokens "
                            f"and secrets travel in clear); also {_ALLOW_HTTP_VAR}=1")
    group.add_argument("-l", "--login-route", default="/auth/v2/login",
                       help="default: %(default)s")
    group.add_argument("-t", "--token-route", default="/auth/v2/token",
                       help="default: %(default)s")
    group.add_argument("-d", "--device-route", default="/auth/v2/device",
                       help="default: %(default)s")
    group.add_argument("-p", "--ports", type=int, nargs="+", metavar="PORT",
                       help="ports to try for the login callback")
    group.add_argument("--client-id", metavar="ID",
                       help="log in to a standard OpenID provider directly, as this client: "
                            "HOST is then the provider's issuer URL")
    group.add_argument("--client-secret", metavar="SECRET",
                       help="the client's secret, for a confidential client (others on this "
                            "machine may see command lines: prefer $OIDC_CLIENT_SECRET)")
    group.add_argument("--scope", action="append", metavar="SCOPE",
                       help="scopes to ask the provider for, repeatable or space separated "
                            "(default: openid offline_access)")


def _check_args(parser: Any, args: Any) -> None:
    """Refuse (exit code 2) what the groups above cannot express; make each HOST a store key."""
    def given(*names: str) -> list[str]:  # the options not left at their defaults
        return [f"--{n.replace('_', '-')}" for n in names
                if getattr(args, n) != parser.get_default(n)]

    on_token = given("json", "access_token", "header", "export", "min_valid")  # need a HOST
    on_cache = given("list", "clear", "remove", "logout")
    if given("client_secret", "scope") and not args.client_id:
        parser.error("--client-secret and --scope need --client-id")
    if args.doctor and (on_token or on_cache or args.force):
        parser.error("--doctor goes alone (a HOST may be given)")
    if not args.host and not args.doctor:
        for flag in on_token:
            parser.error(f"{flag} needs a HOST")
        if not on_cache:
            parser.error("give a HOST, or one of --list, --clear, --remove HOST, "
                         "--logout HOST, --doctor")
    if args.show_secrets and not args.json:
        parser.error("--show-secrets goes with --json")
    for flag, seconds in (("--timeout", args.timeout), ("--min-valid", args.min_valid)):
        if seconds is not None and seconds < 0:
            parser.error(f"{flag} must be 0 or more")
    try:
        args.key, args.remove, args.logout = (
            host and _store_key(host, args.client_id, args.scope)
            for host in (args.host, args.remove, args.logout))
    except AuthError as exc:
        parser.error(exc.message)


def _setup_logging(verbose: bool) -> None:
    """Log to stderr, secrets redacted; debug messages with ``--verbose``."""
    import logging

    handler = logging.StreamHandler()
    handler.addFilter(_redact_record)
    handler.setFormatter(logging.Formatter("oidc-auth: %(levelname)s: %(message)s"
                                           if verbose else "oidc-auth: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    if verbose:
        logging.getLogger(__name__).setLevel(logging.DEBUG)


def _in_cli_words(exc: Exception) -> str:
    """The message of *exc*, with the provider's error; a time limit told as ``--timeout``."""
    message = str(exc)
    if isinstance(exc, AuthError) and exc.error == "timeout":  # ours, not the device code's
        import re

        message, said = re.subn(r"\btimeout=(?: \([^)]*\))?", "--timeout SECONDS", message)
        if not said and "--timeout" not in message:
            message += "; to wait longer, pass --timeout SECONDS (0: no limit)"
    return message


def _cli(args: Any) -> int:
    store = _default_store(args.app_name)
    if args.doctor:
        _doctor(args, store)
        return 0
    _act_on_cache(args, store)
    if not args.host:
        return 0
    token = _cli_token(args)
    if args.min_valid is not None:
        enough = _min_valid(args, token)
        if enough is None:
            return _EXIT_MIN_VALID
        token = enough
    if args.export:
        _export(args.export, args.key, token, store)
    if args.access_token:
        print(token["access_token"])
    elif args.header:
        print(f"Authorization: {token['headers']['Authorization']}")
    elif args.json:  # with --show-secrets, exactly what --export writes
        shown = _token_file_object(args.key, token)
        print(_dumps(shown if args.show_secrets else
                     {k: v for k, v in shown.items() if k != "refresh_token"}, indent=2))
    elif not args.export:
        print(f"Logged in to {_server_name(args.key)}: {_lifetimes(token)}")
    return 0


def _act_on_cache(args: Any, store: TokenStore) -> None:
    """``--clear``, ``--remove``, ``--logout`` and ``--list``, in this order."""
    if args.clear:
        store.clear()
        _say(f"Removed all tokens from {store.path}")
    if args.remove:
        removed = store.remove(args.remove)
        _say(f"{'Removed' if removed else 'No token for'} {args.remove}")
    if args.logout:
        _logout(args, store)
    if args.list:
        import shlex

        now, listed = time.time(), 0
        for host in store.hosts():
            token = store.get(host)
            if token is not None:  # quoted where a shell needs it: "#...&scope=" keys
                listed += 1
                print(f"{shlex.quote(host)}\taccess {_validity(token['expires'], now)}\t"
                      + (f"refresh {_validity(token['refresh_expires'], now)}"
                         if token["refresh_token"] else "no refresh token"))
        if not listed:  # on stderr: a script reading stdout sees no hosts
            _say(f"No cached tokens in {store.path}")


def _cli_token(args: Any) -> Token:
    """The token of HOST: `authenticate` with the command line's options."""
    if args.verbose:
        token_file = os.environ.get(_TOKEN_FILE_VAR)
        _logger().debug("token store: %s", _default_store(args.app_name, _TOKEN_FILE_VAR).path
                        + (f" ({_TOKEN_FILE_VAR})" if token_file else ""))
        _logger().debug("interactive login: %s", _no_login_reason() or "possible")
    # A person is at the other end: by default wait as long as the device code lives
    # (authenticate's timeout=None), and a few minutes for a login in the browser.
    wait = _CODE_FLOW_WAIT.set(_CLI_CODE_FLOW_WAIT if args.timeout is None else None)
    try:
        return authenticate(args.host, force=args.force, **_cli_options(args))
    finally:
        _CODE_FLOW_WAIT.reset(wait)


def _cli_options(args: Any) -> dict[str, Any]:
    """`authenticate`'s keyword arguments that the command line sets, but ``force``."""
    return {"login_route": args.login_route, "token_route": args.token_route,
            "device_route": args.device_route, "redirect_ports": args.ports,
            "app_name": args.app_name, "timeout": args.timeout or None,
            "client_id": args.client_id, "client_secret": args.client_secret,
            "scopes": args.scope, "allow_http": args.allow_http}


def _cli_flow(args: Any, key: str, store: TokenStore | None = None) -> DeviceFlow:
    """A flow for store *key*, configured by the command line's options."""
    issuer, client_id, scopes = _split_key(key)
    return DeviceFlow._detached(None, host=issuer, store=store, **{
        **_cli_options(args), "client_id": client_id, "scopes": scopes})


# -- --min-valid, --export, --logout --

def _min_valid(args: Any, token: Token) -> Token | None:
    """*token*, refreshed if that makes it last ``--min-valid`` seconds; None if nothing does."""
    # A bare access token cannot refresh itself; a token kept with its refresh
    # token (the cache, a token file, --json --show-secrets) lasts as long as that.
    bare = args.access_token or args.header or (args.json and not args.show_secrets)
    want = time.time() + args.min_valid

    def until(token: Token) -> int:
        if bare or not token["refresh_token"]:
            return token["expires"]
        return max(token["expires"], token["refresh_expires"])

    refreshed = until(token) < want and _refresh_valid(token)
    if refreshed:
        flow = _cli_flow(args, args.key)
        token = _run_sync(flow._refreshed(lambda t: until(t) >= want)) or token
    if until(token) >= want:
        return token
    command = _login_command(args.key)
    by_access = bare or not token["refresh_token"]
    token_file = os.environ.get(_TOKEN_FILE_VAR)
    if by_access and _refresh_valid(token):
        advice = ("the server grants shorter access tokens: ask for less, or get a fresh one "
                  f"each time it is needed ({command} --access-token)")
    elif token_file:
        advice = f"make a new token file on a workstation: {command} --export {token_file}"
    else:
        advice = f"log in again: {command} --force"
    print(f"oidc-auth: error: the {'access' if by_access else 'refresh'} token for "
          f"{_server_name(args.key)} {_validity(until(token), time.time(), 'expires in')}"
          f"{' even after a refresh' if refreshed else ''}, sooner than --min-valid "
          f"{args.min_valid} asks ({_duration(args.min_valid)}); {advice}", file=sys.stderr)
    return None


def _export(path: str, key: str, token: Token, store: TokenStore) -> None:
    """Write *token* as ``--json --show-secrets`` prints it, bound to *key*, to a private file."""
    target = os.path.abspath(os.path.expanduser(path))
    if target == store.path:
        raise ValueError(f"{path} is the token cache itself; export to another file")
    data = (_dumps(_token_file_object(key, token), indent=2) + "\n").encode()
    try:
        # The lock a job takes to refresh this file: a re-export never crosses it.
        with _FileLock(target + ".lock"):
            _atomic_write(target, data)
    except OSError as exc:
        raise AuthError(f"Cannot write the token file {target}: {exc.strerror or exc}") from None
    _say(f"Wrote the token for {_server_name(key)} to {target} (readable by you only): "
         f"{_lifetimes(token)}.\nIn a batch job: export {_TOKEN_FILE_VAR}={target}")


def _logout(args: Any, store: TokenStore) -> None:
    key = args.logout
    token, host = store.get(key), _server_name(key)
    if token is None:
        _say(f"No token for {host}")
        return
    flow = _cli_flow(args, key, store)
    outcome = ""
    try:
        if not _run_sync(flow._sign_out(token)):
            outcome = "the server offers no revocation"
    except AuthError as exc:
        outcome = f"revoking it at the server failed ({exc.message})"
    store.remove(key)
    if not outcome:
        _say(f"Logged out of {host}: the server revoked the token, and it was removed "
             f"from {store.path}")
    else:
        _say(f"Logged out of {host} on this machine only: removed the token from {store.path}; "
             f"{outcome}, so the access token stays usable until it expires "
             f"({_validity(token['expires'], time.time(), 'expires in')})")


# -- --verbose: secrets never reach the log --

_SECRET_PATTERNS = (  # compiled once, by re's own cache
    # JWTs: access, ID and many refresh tokens.
    (r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)?", "[redacted]"),
    # Credentials in headers.
    (r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+", r"\1\2[redacted]"),
    # name=value and "name": "value" pairs that carry a secret.
    (r"(?i)\b((?:access|refresh|id)[_-]?token|device[_-]?code|code[_-]?verifier"
     r"|client[_-]?secret|password|code|state)(\"?\s*[:=]\s*\"?)([^\s\"'&,;}]+)",
     r"\1\2[redacted]"),
    # user:password@ in URLs.
    (r"//[^/@\s:]+:[^/@\s]+@", "//[redacted]@"),
)


def _redact_text(text: str) -> str:
    """Blank out anything in *text* that looks like a token, a code or another secret."""
    import re

    for pattern, repl in _SECRET_PATTERNS:
        text = re.sub(pattern, repl, text)
    # Opaque tokens: long runs that mix upper case, lower case and digits, or long hex.
    return re.sub(r"[A-Za-z0-9_~+=-]{20,}", _redact_random, text)


def _redact_random(match: Any) -> str:
    word: str = match.group()
    mixed = (any(c.isupper() for c in word) and any(c.islower() for c in word)
             and any(c.isdigit() for c in word))
    hexadecimal = len(word) >= 32 and all(c in "0123456789abcdefABCDEF" for c in word)
    return "[redacted]" if mixed or hexadecimal else word


def _redact_record(record: logging.LogRecord) -> bool:
    """A logging filter that redacts secrets in the message and any traceback."""
    try:
        record.msg, record.args = _printable(_redact_text(record.getMessage())), None
    except Exception:  # a malformed log call: logging reports it, without the arguments
        record.msg, record.args = _printable(_redact_text(str(record.msg))), None
    if record.exc_info and not record.exc_text:
        import logging

        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = _redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = _redact_text(record.stack_info)
    return True


# -- --doctor: the decisions the code makes here, asked of the functions that make them --

def _doctor(args: Any, store: TokenStore) -> None:
    """Print what the library detects and decides here, and why; never a secret."""
    import platform

    key = args.key or ""
    stdin, stderr = (("is" if _isatty(stream) else "is not") for stream in (sys.stdin, sys.stderr))
    progress = _Progress.on_stderr(None)
    browser, because = _browser_check()
    login, why = _login_check()
    token_file = os.environ.get(_TOKEN_FILE_VAR)
    rows = [
        ("version", f"py_oidc_auth_client {__version__} ({os.path.abspath(__file__)})"),
        ("python", f"{platform.python_version()} on {platform.platform()}"),
        ("terminal", f"stdin {stdin} a terminal, stderr {stderr}"),
        ("progress", progress.how if progress else "none (no stderr, or a notebook)"),
        ("batch job", _batch_scheduler() or "no"),
        ("ssh session", _is_remote() or "no"),
        ("container", _in_container() or "none detected"),
        ("jupyter", "yes (ipykernel is loaded)" if _in_jupyter() else "no"),
        ("browser", f"{'opened' if browser else 'not opened'}: {because}"),
        ("login", f"never: {_TOKEN_FILE_VAR} is set (see the token file)" if token_file
         else f"{'allowed' if login else 'refused'} ({why})"),
        ("token cache", f"{store.path}: {_describe_file(store.path)}; its folder "
                        f"{_describe_file(os.path.dirname(store.path))}"),
        ("token file", (f"{_TOKEN_FILE_VAR}={token_file}: {_describe_file(token_file)}; "
                        + _describe_token(_default_store(args.app_name, _TOKEN_FILE_VAR)))
         if token_file else f"{_TOKEN_FILE_VAR} is not set: tokens come from the cache"),
        *([("cached token", f"{key}: {_describe_token(store, key)}")] if key else []),
        ("proxies", _proxy_settings(key)),
        ("CA bundle", _ca_settings()),
        ("platformdirs", _platformdirs_version()),
    ]
    width = max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        print(f"{name + ':':<{width}}{value}")


def _platformdirs_version() -> str:
    try:
        from importlib.metadata import version

        return version("platformdirs")
    except Exception:  # not installed, or installed without metadata
        return "not installed: the cache is under XDG_CACHE_HOME or ~/.cache"


def _describe_file(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist yet"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if sys.platform == "win32":
        return "exists (Windows: permissions follow the folder's ACL)"
    mode = stat.S_IMODE(st.st_mode)
    text = f"mode {mode:04o}, " + ("owner-only" if not mode & 0o077 else
                                   f"READABLE BY OTHERS, fix with: chmod go= {path}")
    if st.st_uid != os.getuid():
        text += f", owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    return text


def _describe_token(store: TokenStore, host: str = "") -> str:
    """How long the token of *host* (or of a token file) lasts; read only, no secret."""
    try:
        server, token, bad = store._inspect(host)
    except AuthError as exc:  # a symbolic link: say so, as the store would
        return exc.message
    if token is None:
        return bad or "no token"
    whose = "" if server is None else (
        f"for {_printable(_short(server, 200))}: " if server else
        'names no server (add "server": HOST, or export it anew): ')
    return whose + _lifetimes(token)


def _proxy_settings(key: str) -> str:
    """The proxy a request to the server of *key* (else to any server) goes through."""
    import urllib.request
    from urllib.parse import urlsplit

    netloc = urlsplit(_server_name(key)).netloc if key else "example.org"
    shown = [f"{scheme} via {proxy}" for scheme in ("https", "http")
             if (proxy := _proxy_for(f"{scheme}://{netloc}"))]
    no_proxy = urllib.request.getproxies().get("no")  # the environment, or the system's
    if no_proxy:
        shown.append(f"NO_PROXY {no_proxy}")
    return ", ".join(shown) or "none (HTTPS_PROXY, HTTP_PROXY and NO_PROXY are not set)"


def _ca_settings() -> str:
    """The CA certificates a request trusts, and the variables that choose them."""
    import ssl

    shown = []
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        value = os.environ.get(name)
        if value:
            shown.append(f"{name}={value}" + ("" if os.path.exists(value) else " (MISSING)"))
    try:
        (bundle, source, _), _ = _ssl_context(None)
    except AuthError as exc:  # the request would fail the same way
        return "; ".join([*shown, exc.message])
    if bundle:  # else OpenSSL reads SSL_CERT_FILE and SSL_CERT_DIR itself
        return "; ".join([*shown, f"trusts only {bundle} ({source})"])
    paths = ssl.get_default_verify_paths()  # after SSL_CERT_FILE and SSL_CERT_DIR
    return "; ".join([*shown, f"OpenSSL looks in {paths.cafile or '(no file)'} and "
                              f"{paths.capath or '(no folder)'}"])


# ---------------------------------------------------------------------------
# Aliases: the reference's submodule import paths keep working
# ---------------------------------------------------------------------------

_ALIASES = ("exceptions", "flows", "utils", "token_store", "schema")

for _alias in _ALIASES:
    sys.modules.setdefault(f"{__name__}.{_alias}", sys.modules[__name__])


def __getattr__(name: str) -> Any:
    if name in _ALIASES:
        return sys.modules[__name__]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
