"""What servers send: URLs, text, numbers and ID tokens, from hostile local servers.

Every attack is made for real: a local HTTP server answers as a hostile or broken
server would, the command line runs as a second process with a ``BROWSER`` script
that records its argv, and ID tokens are signed with ``cryptography`` keys.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import stat
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from conftest import DEVICE, LOGIN, TOKEN
from conftest import bare_device_answer as device_answer
from tests import oac

crypto = pytest.importorskip("cryptography")
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402

WELL_KNOWN = "/.well-known/openid-configuration"
CLIENT = "cli"
MODULE_DIR = str(Path(oac.__file__).resolve().parent)

# Terminal commands a hostile server may hide in text: OSC 52 writes the clipboard,
# CSI 2J clears the screen, C1 CSI, BEL, and a right-to-left override.
LACED = "\x1b]52;c;ZXZpbA==\x07 \x1b[2J\x9b31m \u202egnp.exe\u202c \x07bell\x1b[0m"


def control_chars(text: str) -> list[str]:
    """The control, C1 and bidi characters in *text* (newlines are allowed)."""
    return [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0
            or 0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 40) -> subprocess.CompletedProcess[str]:
    """The real command line in a second process, with the test's private HOME."""
    full = {k: v for k, v in os.environ.items() if k != "OIDC_ALLOW_HTTP"}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "py_oidc_auth_client", *args],
                          cwd=MODULE_DIR, env=full, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 1 with one ``oidc-auth: error:`` line: never a usage error or a traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("oidc-auth: error:")]
    return line


@pytest.fixture(autouse=True)
def _fresh_documents(no_cached_documents):
    """Every test here talks to a provider whose documents must not come from a cache."""


@pytest.fixture
def browser(tmp_path):
    """A BROWSER script that records its argv (one JSON line per run) and returns."""
    log = tmp_path / "browser-argv.jsonl"
    script = tmp_path / "browser.py"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"with open({str(log)!r}, 'a') as f:\n"
                      "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return types.SimpleNamespace(env={"BROWSER": str(script)}, log=log)


def argv_seen(browser: Any) -> list[list[str]]:
    log = browser.log
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def token_answer(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    answer = {"access_token": jwt({"alg": "none"}, {"iat": now, "exp": now + 3600}),
              "token_type": "Bearer", "expires_in": 3600, "refresh_token": "refresh-1",
              "refresh_expires_in": 86400, "scope": "openid"}
    answer.update(changes)
    return {k: v for k, v in answer.items() if v is not None}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(header: Any, claims: Any, signature: bytes = b"sig", raw_claims: str = "") -> str:
    """A compact JWS; *raw_claims* is JSON text sent as is (NaN, 1e400)."""
    body = raw_claims or json.dumps(claims)
    return f"{b64u(json.dumps(header).encode())}.{b64u(body.encode())}.{b64u(signature)}"


# ---------------------------------------------------------------------------
# 5. Only web URLs reach a browser
# ---------------------------------------------------------------------------

HOSTILE_URLS = [
    "file:///etc/passwd",
    "javascript:alert(1)",
    "--remote-debugging-port=9222",
    "-https://idp.example/device",
    "http://idp.example/device",  # plain http to another host
    "https://idp.example/device --incognito",
    "https://idp.example/device\x1b[2J",
    "https://\u202eidp.example/device",
    "https:///device",  # no host
    "data:text/html,<script>alert(1)</script>",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", ["verification_uri", "verification_uri_complete"])
@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_hostile_verification_uri_never_reaches_the_browser(fake_server, browser, field, url):
    fake_server.reply("POST", DEVICE, 200, device_answer(**{field: url}))
    fake_server.reply("POST", TOKEN, 400, {"error": "access_denied"})
    proc = cli(fake_server.url, "--timeout", "10", env=browser.env)
    line = one_error_line(proc)
    assert argv_seen(browser) == []  # the browser was never started
    assert "verification URI" in line and oac._short(url, 100) in line
    assert control_chars(proc.stderr) == []
    assert fake_server.hits(TOKEN) == []  # refused before any polling


@pytest.mark.timeout(60)
def test_a_web_verification_uri_still_reaches_the_browser(fake_server, browser):
    fake_server.reply("POST", DEVICE, 200, device_answer(  # time for the browser to start
        verification_uri_complete="https://idp.example/device?user_code=ABCD-EFGH", interval=3))
    fake_server.reply("POST", TOKEN, 400, {"error": "access_denied"})
    proc = cli(fake_server.url, "--timeout", "10", env=browser.env)
    assert "denied" in one_error_line(proc)
    assert argv_seen(browser) == [["https://idp.example/device?user_code=ABCD-EFGH"]]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/device", "http://[::1]/device",
                                 "http://localhost/device", "HTTPS://idp.example/a?b=c#d"])
def test_loopback_http_and_https_urls_are_accepted(fake_server, tmp_store, url):
    assert device_uri(fake_server, tmp_store, url) == url


def device_uri(fake_server, tmp_store, url: str, **options: Any) -> str:
    """The verification URI a device flow shows for *url* from the server."""
    oac.DeviceFlow.reset_instances()
    fake_server.routes.pop(("POST", "/auth/v2/device"), None)  # this answer, not one before
    fake_server.reply("POST", "/auth/v2/device", 200, device_answer(verification_uri=url))
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store, **options)
    return run(flow.get_device_code())["uri"]


def test_plain_http_to_another_host_only_when_allowed(fake_server, tmp_store, monkeypatch):
    url = "http://idp.example/device"
    with pytest.raises(oac.AuthError):
        device_uri(fake_server, tmp_store, url)
    assert device_uri(fake_server, tmp_store, url, allow_http=True) == url
    monkeypatch.setenv("OIDC_ALLOW_HTTP", "1")
    assert device_uri(fake_server, tmp_store, url) == url
    with pytest.raises(oac.AuthError):  # the opt-in is for http, not other schemes
        device_uri(fake_server, tmp_store, "file:///etc/passwd", allow_http=True)


def test_an_http_verification_uri_follows_the_flows_allow_http(fake_server, tmp_store):
    fake_server.reply("POST", "/auth/v2/device", 200,
                      device_answer(verification_uri="http://idp.example/device"))
    with pytest.raises(oac.AuthError, match=r"http://idp\.example/device"):
        run(oac.DeviceFlow(fake_server.url, store=tmp_store).get_device_code())
    oac.DeviceFlow.reset_instances()
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store, allow_http=True)
    assert run(flow.get_device_code())["uri"] == "http://idp.example/device"


@pytest.fixture
def notebook(monkeypatch):
    """A kernel: ipykernel loaded, IPython.display recording what it is given."""
    shown: list[Any] = []
    ipython = types.ModuleType("IPython")
    display = types.ModuleType("IPython.display")
    display.display = lambda *objs, **kw: shown.extend(objs)  # type: ignore[attr-defined]
    ipython.display = display  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    return shown


@pytest.mark.parametrize("url", ["javascript:alert(document.cookie)",
                                 'https://idp.example/" onmouseover="alert(1)',
                                 "file:///etc/passwd"])
def test_notebook_link_never_carries_a_hostile_href(fake_server, tmp_store, notebook, url):
    fake_server.reply("POST", DEVICE, 200, device_answer(verification_uri_complete=url))
    fake_server.reply("POST", TOKEN, 400, {"error": "access_denied"})
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store, timeout=10, interactive=False)
    with pytest.raises(oac.AuthError, match="verification URI"):
        run(flow.authenticate())
    with pytest.raises(oac.AuthError):  # shown directly: the same check
        oac._show_device_code(fake_server.url, {"uri": url, "user_code": "A", "device_code": "d",
                                                "interval": 5})
    html = " ".join(str(obj) for obj in notebook)
    assert "javascript:" not in html and "file:" not in html and "onmouseover" not in html


def test_notebook_link_of_a_good_uri_is_shown(notebook):
    oac._show_device_code("https://app.example", {
        "uri": "https://idp.example/device?user_code=AB&x=<1>", "user_code": "AB<b>",
        "device_code": "d", "interval": 5})
    (bundle,) = notebook
    assert 'href="https://idp.example/device?user_code=AB&amp;x=&lt;1&gt;"' in bundle["text/html"]
    assert "AB&lt;b&gt;" in bundle["text/html"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("location", ["javascript:alert(1)", "file:///etc/passwd",
                                      "https://idp.example/auth?state=s%7Cx%7Cv \x1b[2J"])
def test_hostile_login_redirect_is_refused(fake_server, tmp_store, location):
    fake_server.reply("GET", LOGIN, 307, b"", {"Location": location})
    flow = oac.CodeFlow(fake_server.url, store=tmp_store, timeout=5)
    with pytest.raises(oac.AuthError, match="login redirect") as info:
        run(flow.authenticate())
    assert control_chars(info.value.message) == []


@pytest.mark.parametrize("endpoint", ["https://idp.example/auth\x1b]52;c;eA==\x07",
                                      "https:///auth", "https://idp.example/a b"])
def test_hostile_authorization_endpoint_from_discovery_is_refused(fake_server, tmp_store,
                                                                   endpoint):
    provider = Provider(fake_server, authorization_endpoint=endpoint)
    flow = oac.DeviceFlow(provider.issuer, client_id=CLIENT, store=tmp_store, timeout=5)
    with pytest.raises(oac.AuthError, match="authorization_endpoint") as info:
        run(flow.get_device_code())
    assert control_chars(info.value.message) == []


# ---------------------------------------------------------------------------
# 6. Server text is stripped of control characters
# ---------------------------------------------------------------------------


def laced_device_route(fake_server: Any) -> None:
    fake_server.reply("POST", DEVICE, 400, {"error": "invalid_request" + LACED,
                                            "error_description": "no" + LACED})


def laced_user_code(fake_server: Any) -> None:
    fake_server.reply("POST", DEVICE, 200, device_answer(user_code="AB" + LACED))
    fake_server.reply("POST", TOKEN, 400, {"error": "access_denied",
                                           "error_description": LACED})


def laced_wrapped_error(fake_server: Any) -> None:
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 400, {"detail": "Upstream OIDC error: " + json.dumps(
        {"error": "server_error" + LACED, "error_description": LACED})})


def laced_json_string(fake_server: Any) -> None:
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 500, json.dumps("Internal error" + LACED),
                      {"Content-Type": "application/json"})


def laced_json_list(fake_server: Any) -> None:
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 400, ["Internal error" + LACED])


def laced_detail_string(fake_server: Any) -> None:
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 401, {"detail": "bad" + LACED})


def laced_uri(fake_server: Any) -> None:
    fake_server.reply("POST", DEVICE, 200, device_answer(verification_uri="https://x/" + LACED))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verbose", [[], ["--verbose"]])
@pytest.mark.parametrize("script", [laced_device_route, laced_user_code, laced_wrapped_error,
                                    laced_json_string, laced_json_list, laced_detail_string,
                                    laced_uri])
def test_server_text_reaches_stderr_without_control_characters(fake_server, browser, script,
                                                               verbose):
    script(fake_server)
    proc = cli(fake_server.url, "--timeout", "10", *verbose, env=browser.env)
    one_error_line(proc)
    assert control_chars(proc.stderr) == [], proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("changes", [{"token_type": "Bearer" + LACED},
                                     {"token_type": "Bearer\r\nX-Injected: 1"},
                                     {"access_token": "abc\r\nX-Injected: 1"},
                                     {"access_token": "abc\x1b]52;c;ZXZpbA==\x07"}])
def test_token_answers_that_would_inject_header_lines_are_refused(fake_server, changes):
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 200, token_answer(**changes))
    proc = cli(fake_server.url, "--header", "--timeout", "10", env={"BROWSER": "true"})
    assert "cannot be used in an HTTP header" in one_error_line(proc)
    assert control_chars(proc.stdout + proc.stderr) == []
    assert "X-Injected" not in proc.stdout


@pytest.mark.timeout(60)
def test_discovery_errors_reach_stderr_without_control_characters(fake_server):
    Provider(fake_server, issuer="https://evil.example" + LACED)
    proc = cli(fake_server.url, "--client-id", CLIENT, "--timeout", "10",
               env={"BROWSER": "true"})
    line = one_error_line(proc)
    assert "evil.example" in line
    assert control_chars(proc.stderr) == []


def test_error_answers_are_printable_in_message_and_detail(fake_server, tmp_store):
    fake_server.reply("POST", TOKEN, 400, {"error": "invalid_request" + LACED,
                                           "error_description": LACED * 50})
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store, timeout=10)
    with pytest.raises(oac.AuthError) as info:
        run(flow.refresh("refresh-token-1"))
    exc = info.value
    for text in (exc.message, repr(exc), *exc.detail.values()):
        assert control_chars(text) == []
    assert len(exc.message) < 400


# ---------------------------------------------------------------------------
# 10. ID tokens: an explicit list of algorithms
# ---------------------------------------------------------------------------

_RSA: list[Any] = []


def rsa_key() -> Any:
    if not _RSA:
        _RSA.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _RSA[0]


def rsa_jwk(kid: str = "k1") -> dict[str, Any]:
    numbers = rsa_key().public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "use": "sig", "n": b64u(numbers.n.to_bytes(256, "big")),
            "e": b64u(numbers.e.to_bytes(3, "big"))}


HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def rs256(claims: Any, raw_claims: str = "", alg: str = "RS256", salt: Any = None,
          **header: Any) -> str:
    """An ID token signed by the provider's RSA key (RS* or PS*)."""
    head = {"alg": alg, "kid": "k1", **header}
    body = raw_claims or json.dumps(claims)
    signed = f"{b64u(json.dumps(head).encode())}.{b64u(body.encode())}".encode()
    digest = HASHES[alg[2:]]()
    pad = padding.PKCS1v15() if alg.startswith("RS") else padding.PSS(
        padding.MGF1(digest), padding.PSS.DIGEST_LENGTH if salt is None else salt)
    signature = rsa_key().sign(signed, pad, digest)
    return f"{signed.decode()}.{b64u(signature)}"


class Provider:
    """A standard OpenID provider on the fake server: discovery, JWKS, token endpoint."""

    def __init__(self, fake: Any, **meta: Any) -> None:
        self.fake = fake
        self.issuer = fake.url
        self.meta = {"issuer": fake.url, "authorization_endpoint": f"{fake.url}/authorize",
                     "token_endpoint": f"{fake.url}/token", "jwks_uri": f"{fake.url}/jwks",
                     "device_authorization_endpoint": f"{fake.url}/device"}
        self.meta.update(meta)
        self.meta = {k: v for k, v in self.meta.items() if v is not None}
        self.keys = [rsa_jwk()]
        self.id_token = ""
        fake.reply("GET", WELL_KNOWN, 200, lambda req: (200, {}, self.meta))
        fake.reply("GET", "/jwks", 200, lambda req: (200, {}, {"keys": self.keys}))
        fake.reply("POST", "/token", 200, lambda req: (200, {}, token_answer(
            id_token=self.id_token)))

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": CLIENT, "sub": "alice", "iat": now,
                  "exp": now + 300, **changes}
        return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture
def provider(fake_server):
    return Provider(fake_server)


def refreshed(provider: Provider, store: oac.TokenStore, **kwargs: Any) -> oac.Token:
    """A refresh at the provider: its token answer (and ID token) go through the checks."""
    flow = oac.DeviceFlow(provider.issuer, client_id=CLIENT, store=store, timeout=10, **kwargs)
    token: oac.Token = run(flow.refresh("refresh-0"))
    return token


def refused(provider: Provider, store: oac.TokenStore, **kwargs: Any) -> str:
    with pytest.raises(oac.AuthError) as info:
        refreshed(provider, store, **kwargs)
    assert info.value.error == "invalid_id_token", info.value.message
    assert control_chars(info.value.message) == []
    return info.value.message


def test_a_good_rs256_id_token_is_accepted(provider, tmp_store):
    provider.id_token = rs256(provider.claims())
    assert refreshed(provider, tmp_store)["access_token"]


@pytest.mark.timeout(30)
def test_a_good_rs256_id_token_is_accepted_in_a_device_login(provider, tmp_store):
    provider.fake.reply("POST", "/device", 200, device_answer())
    provider.id_token = rs256(provider.claims())
    flow = oac.DeviceFlow(provider.issuer, client_id=CLIENT, store=tmp_store, timeout=10)
    code = run(flow.get_device_code())
    assert run(flow.poll(code["device_code"], code["interval"]))["access_token"]


@pytest.mark.parametrize("alg", ["none", "NONE", "None", "nOnE", "", " none "])
def test_none_in_any_spelling_is_refused(provider, tmp_store, alg):
    provider.id_token = jwt({"alg": alg}, provider.claims(), b"")
    assert "not signed" in refused(provider, tmp_store)


@pytest.mark.parametrize("alg", [["RS256"], {"alg": "RS256"}, 256, None, True])
def test_an_alg_that_is_not_a_name_is_refused(provider, tmp_store, alg):
    provider.id_token = jwt({"alg": alg, "kid": "k1"}, provider.claims())
    assert "alg" in refused(provider, tmp_store)


@pytest.mark.parametrize("alg", ["RS256 ", "rs256", "foo", "HS256\x1b[2J", "RSA-OAEP", "ES256K"])
def test_an_algorithm_outside_the_list_is_refused(provider, tmp_store, alg):
    provider.meta["id_token_signing_alg_values_supported"] = ["RS256", alg]
    provider.id_token = jwt({"alg": alg, "kid": "k1"}, provider.claims())
    message = refused(provider, tmp_store)
    assert "is not one of RS256" in message


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "ES512"])
def test_an_unverifiable_algorithm_the_provider_does_not_list_is_refused(provider, tmp_store,
                                                                         alg):
    provider.id_token = jwt({"alg": alg, "kid": "k1"}, provider.claims(), b"garbage")
    assert "id_token_signing_alg_values_supported" in refused(provider, tmp_store)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_an_unverifiable_algorithm_is_refused_when_no_key_can_have_made_it(provider, tmp_store,
                                                                          alg):
    provider.meta["id_token_signing_alg_values_supported"] = ["RS256", alg]  # RSA keys only
    provider.id_token = jwt({"alg": alg, "kid": "k1"}, provider.claims(), b"garbage")
    assert "no key in the provider's key set" in refused(provider, tmp_store)


def test_an_unverifiable_algorithm_is_accepted_only_by_the_documented_rule(provider, tmp_store):
    provider.meta["id_token_signing_alg_values_supported"] = ["RS256", "ES256"]
    provider.keys.append({"kty": "EC", "kid": "k2", "crv": "P-256", "x": "AA", "y": "AA"})
    provider.id_token = jwt({"alg": "ES256", "kid": "k2"}, provider.claims(), b"unchecked")
    assert refreshed(provider, tmp_store)["access_token"]  # listed, keyed, from the endpoint
    provider.id_token = jwt({"alg": "ES256", "kid": "k2"}, provider.claims(aud="other"))
    assert "(aud)" in refused(provider, tmp_store)  # claims are checked all the same


def test_an_unverifiable_algorithm_over_plain_http_is_refused():
    meta = {"id_token_signing_alg_values_supported": ["ES256"], "jwks_uri": "https://op/jwks",
            "token_endpoint": "http://op.example/token"}
    assert "plain http" in oac._alg_problem("ES256", meta, None)
    assert oac._alg_problem("ES256", {**meta, "token_endpoint": "https://op/token"}, None) == ""


def test_rs256_without_a_jwks_uri_is_refused(fake_server, tmp_store):
    provider = Provider(fake_server, jwks_uri=None)
    provider.id_token = rs256(provider.claims())
    assert "no jwks_uri" in refused(provider, tmp_store)
    assert fake_server.hits("/jwks") == []


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_rsa_signatures_are_verified_here(provider, tmp_store, alg):
    provider.id_token = rs256(provider.claims(), alg=alg)  # not listed by the provider: verified
    assert refreshed(provider, tmp_store)["access_token"]
    head, _, signature = rs256(provider.claims(), alg=alg).split(".")
    forged = b64u(json.dumps(provider.claims(sub="mallory")).encode())
    provider.id_token = f"{head}.{forged}.{signature}"
    assert f"{alg} signature does not verify" in refused(provider, tmp_store)


@pytest.mark.parametrize("salt", [0, 20, padding.PSS.MAX_LENGTH])
def test_pss_signatures_need_the_salt_length_of_rfc_7518(provider, tmp_store, salt):
    provider.id_token = rs256(provider.claims(), alg="PS256", salt=salt)
    assert "PS256 signature does not verify" in refused(provider, tmp_store)


@pytest.mark.parametrize("bits", [2049, 2057])  # the encoded message is one byte shorter
def test_pss_verification_agrees_with_cryptography_for_any_key_size(bits):
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    numbers = key.public_key().public_numbers()
    size = (bits + 7) // 8
    public = {"n": b64u(numbers.n.to_bytes(size, "big")), "e": b64u(numbers.e.to_bytes(3, "big"))}
    for i in range(10):
        message = f"message {i}".encode()
        signature = key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()),
                                                  padding.PSS.DIGEST_LENGTH), hashes.SHA256())
        assert oac._rsa_verify(public, "PS256", message, signature)
        assert not oac._rsa_verify(public, "PS256", message + b".", signature)


def test_rs256_with_a_garbage_signature_is_refused(provider, tmp_store):
    provider.id_token = jwt({"alg": "RS256", "kid": "k1"}, provider.claims(), b"x" * 256)
    assert "RS256 signature does not verify" in refused(provider, tmp_store)


def test_hs256_without_a_client_secret_is_refused(provider, tmp_store):
    provider.id_token = jwt({"alg": "HS256"}, provider.claims(), b"anything")
    assert "client secret" in refused(provider, tmp_store)


@pytest.mark.parametrize("raw", ['"exp": NaN', '"exp": Infinity', '"exp": -Infinity',
                                 '"exp": 1e400', '"iat": NaN', '"auth_time": Infinity'])
def test_non_finite_numbers_in_claims_are_refused(provider, tmp_store, raw):
    claims = provider.claims()
    name = raw.split('"')[1]
    claims.pop(name, None)
    text = json.dumps(claims)[:-1] + ", " + raw + "}"
    provider.id_token = rs256(None, raw_claims=text)  # validly signed
    assert "not finite" in refused(provider, tmp_store)


def test_non_finite_numbers_in_the_header_are_refused(provider, tmp_store):
    head = b64u(b'{"alg": "RS256", "kid": "k1", "x": NaN}')
    body = b64u(json.dumps(provider.claims()).encode())
    provider.id_token = f"{head}.{body}.{b64u(b'sig')}"
    assert "not finite" in refused(provider, tmp_store)


# ---------------------------------------------------------------------------
# 11. Numbers from servers never crash
# ---------------------------------------------------------------------------

BAD_NUMBERS = [float("nan"), float("inf"), -float("inf"), 1e13, 1e300, "1e13", "NaN", [5],
               10 ** 400]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e13", "1e400",
                                   '"abc"', "-5"])
def test_device_expires_in_from_a_server_never_crashes_the_cli(fake_server, value):
    body = json.dumps(device_answer(expires_in=12345)).replace("12345", value)
    fake_server.reply("POST", DEVICE, 200, body, {"Content-Type": "application/json"})
    fake_server.reply("POST", TOKEN, 400, {"error": "access_denied"})
    proc = cli(fake_server.url, "--timeout", "10", env={"BROWSER": "true"})
    line = one_error_line(proc)
    assert ("expires_in" in line) if value != "1e13" else ("denied" in line)


@pytest.mark.parametrize("value", [*BAD_NUMBERS, None, 0, -3, "", True])
def test_device_interval_from_a_server_is_the_rfc_default_or_bounded(fake_server, tmp_store,
                                                                      value):
    body = json.dumps(device_answer(interval=12345)).replace(
        "12345", "1e400" if value == 10 ** 400 else json.dumps(value))
    fake_server.reply("POST", DEVICE, 200, body, {"Content-Type": "application/json"})
    code = run(oac.DeviceFlow(fake_server.url, store=tmp_store).get_device_code())
    assert code["interval"] == (60 if value in (1e13, 1e300) else 5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e13", "1e400", '"1e13"',
                                   "10000000000000000000000000"])
def test_token_lifetimes_from_a_server_never_crash_the_cli(fake_server, value):
    answer = json.dumps(token_answer(expires_in=12345, refresh_expires_in=67890))
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 200,
                      answer.replace("12345", value).replace("67890", value),
                      {"Content-Type": "application/json"})
    proc = cli(fake_server.url, "--json", "--show-secrets", "--timeout", "10",
               env={"BROWSER": "true"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    token = json.loads(proc.stdout)
    now = time.time()
    # Not a number: the access token's own exp (1 h here); too far: cut to 10 years.
    assert now < token["expires"] <= now + oac._MAX_LIFETIME + 5
    assert now < token["refresh_expires"] <= now + oac._MAX_LIFETIME + 5
    # The summary line (human durations) of the stored token works too.
    listing = cli("--list")
    assert listing.returncode == 0 and "Traceback" not in listing.stderr


@pytest.mark.parametrize("value", ["\u00b2", "9" * 400, "1e9", "-1", "NaN"])
def test_a_garbled_retry_after_is_ignored(fake_server, tmp_store, value):
    fake_server.reply("POST", TOKEN, 503, b"", {"Retry-After": value})
    fake_server.reply("POST", TOKEN, 400, {"error": "invalid_request"})
    started = time.monotonic()
    # Retried after the backoff, or given up at once when the 60-s cap passes the deadline.
    with pytest.raises(oac.AuthError, match=r"invalid_request|gave up"):
        run(oac.DeviceFlow(fake_server.url, store=tmp_store).refresh("refresh-token-1"))
    assert time.monotonic() - started < 30


@pytest.mark.timeout(60)
def test_keycloak_offline_refresh_expires_in_0_refreshes_instead_of_logging_in(fake_server):
    now = int(time.time())
    first = token_answer(access_token=jwt({"alg": "none"}, {"iat": now, "exp": now + 2}),
                         expires_in=2, refresh_token="offline-1", refresh_expires_in=0)
    fake_server.reply("POST", DEVICE, 200, device_answer())
    fake_server.reply("POST", TOKEN, 200, first)
    proc = cli(fake_server.url, "--json", "--show-secrets", "--timeout", "10",
               env={"BROWSER": "true"})
    assert proc.returncode == 0, proc.stderr
    stored = json.loads(proc.stdout)
    assert stored["refresh_expires"] >= now + oac._UNKNOWN_REFRESH_LIFETIME - 5
    time.sleep(2.5)  # the access token has expired
    fake_server.routes.clear()
    fake_server.reply("POST", TOKEN, 200, token_answer(refresh_token=None,
                                                       refresh_expires_in=None))
    proc = cli(fake_server.url, "--json")  # no terminal, no browser: no login possible
    assert proc.returncode == 0, proc.stderr
    (refresh,) = fake_server.hits(TOKEN)[1:]
    assert refresh.form["refresh-token"] == "offline-1"
    assert len(fake_server.hits(DEVICE)) == 1  # only the first login


def test_refresh_expires_in_0_at_a_standard_provider_means_no_known_expiry(provider,
                                                                          tmp_store):
    provider.fake.routes.pop(("POST", "/token"))
    provider.fake.reply("POST", "/token", 200, token_answer(refresh_expires_in=0))
    token = refreshed(provider, tmp_store)
    assert token["refresh_expires"] >= time.time() + oac._UNKNOWN_REFRESH_LIFETIME - 5


# ---------------------------------------------------------------------------
# 12. Redact before you shorten
# ---------------------------------------------------------------------------


def echoing(field: str, offset: int, form: str) -> Any:
    """A token route that echoes the submitted *field* at *offset* of its error text."""
    def answer(req: Any) -> tuple[int, dict[str, str], Any]:
        text = "e" * offset + req.form[field] + " was refused"
        if form == "oauth":
            return 400, {}, {"error": "invalid_request", "error_description": text}
        if form == "wrapped":
            return 400, {}, {"detail": f"Upstream OIDC error: {text}"}
        if form == "list":
            return 400, {}, [text]
        return 400, {"Content-Type": "application/json"}, json.dumps(text)  # a JSON string

    return answer


def leaks(secret: str, *texts: str) -> list[str]:
    """The 8-character pieces of *secret* that appear in any of *texts*."""
    return sorted({secret[i:i + 8] for i in range(len(secret) - 7)
                   if any(secret[i:i + 8] in text for text in texts)})


def exc_texts(exc: oac.AuthError) -> list[str]:
    return [exc.message, repr(exc), str(exc),
            *(v for v in exc.detail.values() if isinstance(v, str))]


OFFSETS = [0, 20, 100, 150, 190, 197, 250]


@pytest.mark.parametrize("form", ["oauth", "wrapped", "string", "list"])
@pytest.mark.parametrize("offset", OFFSETS)
def test_an_echoed_refresh_token_is_redacted_before_shortening(fake_server, tmp_store,
                                                              offset, form):
    secret = secrets.token_urlsafe(300)
    fake_server.reply("POST", TOKEN, 400, echoing("refresh-token", offset, form))
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store, timeout=10)
    with pytest.raises(oac.AuthError) as info:
        run(flow.refresh(secret))
    assert leaks(secret, *exc_texts(info.value)) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("form", ["oauth", "wrapped", "string", "list"])
@pytest.mark.parametrize("offset", [0, 150, 190])
def test_an_echoed_device_code_is_redacted_before_shortening(fake_server, tmp_store,
                                                            offset, form):
    secret = secrets.token_urlsafe(200)
    fake_server.reply("POST", DEVICE, 200, device_answer(device_code=secret))
    fake_server.reply("POST", TOKEN, 400, echoing("device-code", offset, form))
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store, timeout=10)
    code = run(flow.get_device_code())
    with pytest.raises(oac.AuthError) as info:
        run(flow.poll(code["device_code"], 1))
    assert leaks(secret, *exc_texts(info.value)) == []


@pytest.mark.parametrize("offset", [0, 150, 190])
def test_an_echoed_refresh_token_at_a_standard_provider_is_redacted(provider, tmp_store,
                                                                     offset):
    secret = secrets.token_urlsafe(250)
    provider.fake.routes.pop(("POST", "/token"))
    provider.fake.reply("POST", "/token", 400, echoing("refresh_token", offset, "wrapped"))
    flow = oac.DeviceFlow(provider.issuer, client_id=CLIENT, store=tmp_store)
    with pytest.raises(oac.AuthError) as info:
        run(flow.refresh(secret))
    assert leaks(secret, *exc_texts(info.value)) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("offset", [0, 150, 190])
def test_an_echoed_refresh_token_never_reaches_cli_stderr(fake_server, offset):
    secret = secrets.token_urlsafe(300)
    now = int(time.time())
    oac.TokenStore(app_name="py-oidc-auth").put(fake_server.url, oac.Token(
        access_token="expired-access", token_type="Bearer", expires=now - 10,
        refresh_token=secret, refresh_expires=now + 86400, scope="openid",
        headers={"Authorization": "Bearer expired-access"}))
    fake_server.reply("POST", TOKEN, 400, echoing("refresh-token", offset, "string"))
    proc = cli(fake_server.url, "--verbose")
    one_error_line(proc)
    assert leaks(secret, proc.stderr, proc.stdout) == []
