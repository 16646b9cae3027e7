"""The human in the loop, automated: log in and approve (or deny) at the provider.

Works against the pages of ``oidc-provider``'s development interactions, over plain
HTTP with a cookie jar, like a browser without JavaScript.  Standard library only, so
that ``browser.py`` can run it under any Python.

``visit(url, ...)`` starts at either

* a provider authorize URL (code flow): logs in, consents, and finally GETs the
  client's loopback ``http://localhost:PORT/callback?...`` URL, or
* a device verification URL (``verification_uri_complete``, or ``verification_uri``
  plus ``user_code``): confirms the code, logs in and consents.

``action`` is ``"approve"`` or ``"deny"``.  A code-flow denial aborts the login
interaction, so the provider redirects to the callback with ``error=access_denied``; a
device denial presses "Abort" on the confirmation page.  ``tamper_state`` changes the
``state`` of the callback URL before it is fetched, ``tamper_iss`` its RFC 9207 ``iss``;
``tamper_nonce`` changes the ``nonce`` of an authorize URL before the provider sees it,
so that the provider's ID token names another login.  Every step is reported to
``record(event_dict)``; the events also come back as a list.
"""

from __future__ import annotations

import html.parser
import http.cookiejar
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

__all__ = ["HumanError", "approve_device", "deny_device", "visit"]

_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
_MAX_STEPS = 30


class HumanError(RuntimeError):
    """The provider's pages did not go the expected way."""


Event = dict[str, Any]


def approve_device(
    uri: str, user_code: str | None = None, *, user: str = "alice", timeout: float = 20
) -> list[Event]:
    """Approve a device login at ``uri`` (``verification_uri[_complete]``)."""
    return visit(_device_url(uri, user_code), action="approve", user=user, timeout=timeout)


def deny_device(uri: str, user_code: str | None = None, *, timeout: float = 20) -> list[Event]:
    """Deny a device login at ``uri`` ("Abort" on the confirmation page)."""
    return visit(_device_url(uri, user_code), action="deny", timeout=timeout)


def visit(
    url: str,
    *,
    action: str = "approve",
    user: str = "alice",
    tamper_state: bool = False,
    timeout: float = 20,
    record: Callable[[Event], None] | None = None,
    tamper_iss: bool = False,
    tamper_nonce: bool = False,
) -> list[Event]:
    """Play the human for ``url``; see the module docstring."""
    if action not in ("approve", "deny"):
        raise ValueError(f"unknown action {action!r}")
    events: list[Event] = []

    def note(event: str, **fields: Any) -> None:
        item = {"t": time.time(), "event": event, **fields}
        events.append(item)
        if record is not None:
            record(item)

    browser = _Browser(timeout)
    browser.tamper_nonce = tamper_nonce
    deadline = time.monotonic() + timeout
    note("open", url=_strip_query(url))
    status, page_url, body = browser.request("GET", url)
    for _ in range(_MAX_STEPS):
        if time.monotonic() > deadline:
            raise HumanError("gave up: deadline passed")
        if browser.callback is not None:
            _finish_callback(browser, tamper_state, note, tamper_iss)
            return events
        forms = _parse_forms(body, page_url)
        title = _title(body)
        if "Sign-in Success" in title:
            note("approved", kind="device")
            return events
        if "request was interrupted" in body:  # the page after "Abort"
            note("denied", kind="device")
            return events
        for problem in ("code you entered is incorrect", "error processing your request"):
            if problem in body:
                raise HumanError(f"provider says: {problem} (HTTP {status})")
        if not forms:
            where = _strip_query(page_url)
            raise HumanError(f"unexpected page {title!r} (HTTP {status}) at {where}")
        form = _pick_form(forms)
        fields = dict(form["fields"])
        prompt = fields.get("prompt")
        if form.get("id") == "op.deviceInputForm":
            raise HumanError("device page asks for a user code: none was given")
        if form.get("id") == "op.deviceConfirmForm":
            if action == "deny":
                fields.pop("confirm", None)
                fields["abort"] = "yes"
                note("deny", kind="device", user_code=fields.get("user_code"))
            else:
                note("confirm", kind="device", user_code=fields.get("user_code"))
        elif prompt == "login":
            if action == "deny":
                abort = form["action"].rstrip("/") + "/abort"
                note("deny", kind="code")
                status, page_url, body = browser.request("GET", abort)
                continue
            fields["login"] = user
            fields["password"] = "any"
            note("login", user=user)
        elif prompt == "consent":
            note("consent")
        else:
            note("submit", action=_strip_query(form["action"]))
        status, page_url, body = browser.request(form["method"], form["action"], fields)
    raise HumanError("too many steps")


# -- Internals --------------------------------------------------------------


def _device_url(uri: str, user_code: str | None) -> str:
    if not user_code:
        return uri
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qsl(parts.query)
    query = [(k, v) for k, v in query if k != "user_code"] + [("user_code", user_code)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _strip_query(url: str) -> str:
    return urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()


def _is_callback(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname in _LOOPBACK_HOSTS and parts.path == "/callback"


def _finish_callback(browser: _Browser, tamper: bool, note: Callable[..., None],
                     tamper_iss: bool = False) -> None:
    url = browser.callback or ""
    parts = urllib.parse.urlsplit(url)
    params = dict(urllib.parse.parse_qsl(parts.query))
    fetched = url
    forged = dict(params)
    if tamper and "state" in params:
        forged["state"] = "forged" + params["state"][6:]
    if tamper_iss:
        forged["iss"] = "https://mix-up.example.test"
    if forged != params:
        fetched = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(forged)))
    try:
        status, _, body = browser.request("GET", fetched, follow=False)
    except OSError as exc:  # the client's server may be gone already
        status, body = 0, f"{type(exc).__name__}: {exc}"
    if "error" in params:
        note("denied", kind="code", error=params["error"])
    # The code and state go to the private log only, so a test can prove that a
    # refused code was never exchanged (by exchanging it itself).
    note(
        "callback",
        port=parts.port,
        params=sorted(params),
        error=params.get("error"),
        code=params.get("code"),
        state=params.get("state"),
        tampered=bool(tamper or tamper_iss),
        status=status,
        body=body[:300],
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Browser:
    """Cookie jar + manual redirects, stopping at the client's loopback callback."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.callback: str | None = None
        self.tamper_nonce = False
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
            _NoRedirect(),
        )

    def request(
        self, method: str, url: str, form: dict[str, str] | None = None, follow: bool = True
    ) -> tuple[int, str, str]:
        for _ in range(_MAX_STEPS):
            if self.tamper_nonce:
                url = _forge_nonce(url)
            data = urllib.parse.urlencode(form).encode() if form is not None else None
            req = urllib.request.Request(url, data=data, method=method)
            req.add_header("User-Agent", "py-oidc-auth-client-test-human")
            if data is not None:
                req.add_header("Content-Type", "application/x-www-form-urlencoded")
            try:
                resp = self.opener.open(req, timeout=self.timeout)
            except urllib.error.HTTPError as err:
                resp = err
            with resp:
                status = resp.status if hasattr(resp, "status") else resp.code
                location = resp.headers.get("Location")
                body = resp.read(1 << 20).decode("utf-8", "replace")
            if not follow or status not in (301, 302, 303, 307, 308) or not location:
                return status, url, body
            nxt = urllib.parse.urljoin(url, location)
            if _is_callback(nxt):
                self.callback = nxt
                return status, nxt, ""
            if status in (301, 302, 303):
                method, form = "GET", None
            url = nxt
        raise HumanError("redirect loop")


def _forge_nonce(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    if not any(k == "nonce" for k, _ in query):
        return url
    query = [(k, "forged-" + v if k == "nonce" and not v.startswith("forged-") else v)
             for k, v in query]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class _FormParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self.title = ""
        self._in_title = False
        self._form: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._form = {
                "id": a.get("id", ""),
                "action": a.get("action", ""),
                "method": (a.get("method") or "GET").upper(),
                "fields": [],
            }
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None and a.get("name"):
            if a.get("type", "text") in ("hidden", "text", "password", "email"):
                self._form["fields"].append((a["name"], a.get("value", "")))
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def _parse_forms(body: str, base: str) -> list[dict[str, Any]]:
    parser = _FormParser()
    parser.feed(body)
    for form in parser.forms:
        form["action"] = urllib.parse.urljoin(base, form["action"] or base)
    return parser.forms


def _title(body: str) -> str:
    parser = _FormParser()
    parser.feed(body)
    return parser.title.strip()


def _pick_form(forms: list[dict[str, Any]]) -> dict[str, Any]:
    # A page has one interesting form; the device confirm page wins over others.
    for form in forms:
        if form["id"] == "op.deviceConfirmForm":
            return form
    return forms[0]


if __name__ == "__main__":  # manual use: python human.py URL [approve|deny]
    import sys

    out = visit(sys.argv[1], action=sys.argv[2] if len(sys.argv) > 2 else "approve")
    print(json.dumps(out, indent=1))
