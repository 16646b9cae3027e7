"""The README's HTTP-client and network snippets, run as written against local servers.

Placeholders (the example host, proxy and CA file) are swapped for a local server, a
local forward proxy and a test CA; nothing else in a snippet is changed.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import TOKEN, make_jwt
from tests import extra, oac

extra("requests")
extra("httpx")
extra("trustme")

pytestmark = pytest.mark.timeout(30)
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
HOST = "https://myapp.example.com"
PROXY = "http://proxy.example.com:3128"
CA_FILE = "/etc/pki/my-company-ca.pem"


def blocks(heading: str) -> list[tuple[str, str]]:
    """The fenced ``(language, code)`` blocks of one ``## heading`` section."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no section {heading!r}"
    return re.findall(r"^```(\w*)\n(.*?)^```", match.group(1), re.M | re.S)


def run_python(code: str, replacements: dict[str, str]) -> None:
    for placeholder, value in replacements.items():
        code = code.replace(placeholder, value)
    if "await " in code:  # top-level await, as in a notebook
        code = "async def _snippet():\n" + textwrap.indent(code, "    ")
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        asyncio.run(namespace["_snippet"]())
    else:
        exec(compile(code, "README.md", "exec"), {})


def apply_exports(code: str, replacements: dict[str, str], monkeypatch) -> list[str]:
    names = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[0] == "export" and len(words) == 2, line
        name, _, value = words[1].partition("=")
        monkeypatch.setenv(name, replacements.get(value, value))
        names.append(name)
    return names


def api_answer(issued: set[str]):
    def answer(req):
        header = next((v for k, v in req.headers.items() if k.lower() == "authorization"), "")
        if header.partition(" ")[2] in issued:
            return 200, {}, {"data": [1, 2, 3]}
        return 401, {}, {"detail": "Not authenticated"}
    return answer


def seed(url: str, lifetime: int = 3600) -> oac.Token:
    now = int(time.time())
    access = make_jwt(lifetime, now, jti=uuid.uuid4().hex)
    token = oac.Token(access_token=access, token_type="Bearer", expires=now + lifetime,
                      refresh_token="refresh-1", refresh_expires=now + 86400, scope="openid",
                      headers={"Authorization": f"Bearer {access}"})
    oac.TokenStore(app_name="py-oidc-auth").put(url, token)
    return token


def test_the_http_client_snippets(fake_server, capsys):
    snippets = blocks("Using the token with requests / httpx")
    assert [lang for lang, _ in snippets] == ["python"] * 3
    token = seed(fake_server.url)
    fake_server.reply("GET", "/api/data", 200, api_answer({token["access_token"]}))
    for _, code in snippets:
        run_python(code, {HOST: fake_server.url})
    assert capsys.readouterr().out == "{'data': [1, 2, 3]}\n" * 3
    assert len(fake_server.hits("/api/data")) == 3
    assert fake_server.hits(TOKEN) == []


def test_the_http_client_snippets_survive_a_refused_token(fake_server, capsys):
    old = seed(fake_server.url)
    fresh = make_jwt(3600, jti=uuid.uuid4().hex)
    fake_server.reply("GET", "/api/data", 200, api_answer({fresh}))
    fake_server.reply("POST", TOKEN, 200, {"access_token": fresh, "expires_in": 3600})
    for _, code in blocks("Using the token with requests / httpx"):
        run_python(code, {HOST: fake_server.url})
    assert capsys.readouterr().out == "{'data': [1, 2, 3]}\n" * 3
    assert len(fake_server.hits(TOKEN)) == 1  # refreshed once, then reused
    sent = [h.headers.get("Authorization") for h in fake_server.hits("/api/data")]
    assert sent == [old["headers"]["Authorization"]] + [f"Bearer {fresh}"] * 3  # 401, retry


def test_the_proxy_and_ca_snippets(tls_server, forward_proxy, monkeypatch, make_token):
    snippets = blocks("Proxies and private CAs")
    langs = [lang for lang, _ in snippets]
    assert langs == ["sh", "sh", "sh", "python", "text"]
    (_, proxy), (_, cert_file), (_, requests_bundle), (_, python), (_, message) = snippets
    values = {PROXY: forward_proxy.url, CA_FILE: tls_server.ca_file, HOST: tls_server.url}
    tls_server.reply("POST", TOKEN, 200, lambda req: (200, {}, {
        "access_token": make_jwt(3600, jti=uuid.uuid4().hex), "expires_in": 3600}))
    store = oac.TokenStore(app_name="py-oidc-auth")

    def refresh_works() -> None:
        store.put(tls_server.url, make_token(lifetime=-10))
        oac.authenticate(tls_server.url)

    # Without the CA the library refuses the server, with the message the README shows.
    store.put(tls_server.url, make_token(lifetime=-10))
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(tls_server.url)
    shown = message.strip().split("error: ", 1)[1]
    assert info.value.message.replace(tls_server.url, HOST) == shown

    # The proxy variables (HTTPS_PROXY, NO_PROXY) and SSL_CERT_FILE.
    assert apply_exports(proxy, values, monkeypatch) == ["HTTPS_PROXY", "NO_PROXY"]
    assert apply_exports(cert_file, values, monkeypatch) == ["SSL_CERT_FILE"]
    refresh_works()
    assert forward_proxy.seen == [f"CONNECT {tls_server.url.split('//')[1]}"]

    # REQUESTS_CA_BUNDLE alone.
    for name in ("SSL_CERT_FILE", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name)
    assert apply_exports(requests_bundle, values, monkeypatch) == ["REQUESTS_CA_BUNDLE"]
    refresh_works()
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")

    # The ca_bundle option in code: authenticate() refreshes over TLS with it.
    store.put(tls_server.url, make_token(lifetime=-10))
    hits = len(tls_server.hits(TOKEN))
    run_python(python, values)
    assert len(tls_server.hits(TOKEN)) == hits + 1
