"""A standard OpenID provider, directly, against a scripted fake provider.

Discovery (issuer check, missing endpoints, cache lifetime), the device and code
flows' wire format, PKCE, state/iss/nonce, ID token claims and signatures (keys made
here with ``cryptography``), refresh, revocation and logout, store keys and the CLI.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import re
import string
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from conftest import Terminal, User, bare_device_answer, free_port, login, make_jwt, run_child
from tests import oac

crypto = pytest.importorskip("cryptography")
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402

WELL_KNOWN = "/.well-known/openid-configuration"
CLIENT = "cli"
SECRET = "s3cret-client-pw"
HASHES = {"RS256": hashes.SHA256, "RS384": hashes.SHA384, "RS512": hashes.SHA512}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def part(obj: Any) -> str:
    return b64u(json.dumps(obj).encode())


_KEYS: dict[int, Any] = {}


def rsa_key(bits: int = 2048, slot: int = 0) -> Any:
    if (bits, slot) not in _KEYS:
        _KEYS[(bits, slot)] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _KEYS[(bits, slot)]


def jwk(key: Any, kid: str = "k1", **extra: Any) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    size = (numbers.n.bit_length() + 7) // 8
    return {"kty": "RSA", "kid": kid, "use": "sig", "n": b64u(numbers.n.to_bytes(size, "big")),
            "e": b64u(numbers.e.to_bytes(3, "big")), **extra}


def sign(claims: dict[str, Any], key: Any = None, alg: str = "RS256", kid: str | None = "k1",
         secret: str = SECRET) -> str:
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{part(header)}.{part(claims)}".encode()
    if alg.startswith("RS"):
        signature = (key or rsa_key()).sign(signing_input, padding.PKCS1v15(), HASHES[alg]())
    elif alg.startswith("HS"):
        signature = hmac.new(secret.encode(), signing_input, "sha" + alg[2:]).digest()
    else:
        signature = b"not-checked"
    return f"{signing_input.decode()}.{b64u(signature)}"


class Provider:
    """The fake server scripted as an OpenID provider at its own URL."""

    def __init__(self, fake: Any, **meta: Any) -> None:
        self.fake, self.issuer = fake, fake.url
        self.meta: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "device_authorization_endpoint": f"{self.issuer}/device",
            "revocation_endpoint": f"{self.issuer}/revoke",
            "end_session_endpoint": f"{self.issuer}/logout",
            "jwks_uri": f"{self.issuer}/jwks",
            "scopes_supported": ["openid", "offline_access", "profile"],
            "authorization_response_iss_parameter_supported": True,
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
        }
        for name, value in meta.items():
            if value is None:
                self.meta.pop(name, None)
            else:
                self.meta[name] = value
        self.keys = [jwk(rsa_key())]
        fake.reply("GET", WELL_KNOWN, 200, lambda req: (200, {}, self.meta))
        fake.reply("GET", "/jwks", 200, lambda req: (200, {}, {"keys": self.keys}))
        self.nonce: str | None = None
        self.claims: dict[str, Any] = {}
        self.id_token: str | None = None  # a fixed one instead of a made one

    def claims_now(self, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": CLIENT, "sub": "alice", "iat": now,
                  "exp": now + 300}
        if self.nonce is not None:
            claims["nonce"] = self.nonce
        claims.update(self.claims)
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token_answer(self, req: Any = None, *, refresh: str | None = "r-1",
                     scope: str | None = None, id_token: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"access_token": make_jwt(600), "token_type": "Bearer",
                                "expires_in": 600}
        if refresh:
            body["refresh_token"] = refresh
        if scope is not None:
            body["scope"] = scope
        if id_token:
            body["id_token"] = self.id_token or sign(self.claims_now())
        return body

    def tokens(self, **kwargs: Any) -> None:
        self.fake.reply("POST", "/token", 200, lambda req: (200, {}, self.token_answer(**kwargs)))


@pytest.fixture(autouse=True)
def _fresh_documents(no_cached_documents):
    """Every test here talks to a provider whose documents must not come from a cache."""


@pytest.fixture
def provider(fake_server) -> Provider:
    return Provider(fake_server)


def device_flow(provider: Provider, store: oac.TokenStore, **kwargs: Any) -> oac.DeviceFlow:
    kwargs.setdefault("timeout", 10)
    return oac.DeviceFlow(provider.issuer, client_id=CLIENT, store=store, **kwargs)


def store_key(issuer: str, client_id: str | None = None, scopes: Any = None) -> str:
    """Where the flows keep their tokens: their ``host``, issuer#client_id=...&scope=...

    A BaseFlow of its own, so that no DeviceFlow or CodeFlow of a test is configured anew.
    """
    return oac.BaseFlow(issuer, client_id=client_id, scopes=scopes).host


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def end_session(flow: oac.BaseFlow) -> str | None:
    """Make *flow* read the provider's metadata: its logout asks for the end session URL."""
    return run(flow.logout())


def basic(client: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client}:{secret}".encode()).decode()


# ---------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------


def test_discovery_is_fetched_once_and_kept_for_its_lifetime(provider, tmp_store, monkeypatch):
    flow = device_flow(provider, tmp_store)
    assert end_session(flow) == f"{provider.issuer}/logout?client_id={CLIENT}"
    end_session(flow)
    end_session(oac.CodeFlow(provider.issuer, client_id="other", store=tmp_store))
    assert len(provider.fake.hits(WELL_KNOWN)) == 1  # one document per issuer, in memory

    monkeypatch.setattr(oac, "_DOCUMENT_TTL", 0.2)
    oac._FETCHED.clear()
    end_session(flow)
    end_session(flow)
    assert len(provider.fake.hits(WELL_KNOWN)) == 2
    time.sleep(0.3)
    end_session(flow)  # expired: fetched again
    assert len(provider.fake.hits(WELL_KNOWN)) == 3


def test_default_lifetime_is_bounded():
    assert 0 < oac._DOCUMENT_TTL <= 24 * 3600


@pytest.mark.parametrize("issuer", ["https://evil.example.com", "", None, 42])
def test_discovery_with_another_issuer_is_refused_and_not_kept(provider, tmp_store, issuer):
    provider.meta["issuer"] = issuer
    flow = device_flow(provider, tmp_store)
    for _ in range(2):
        with pytest.raises(oac.AuthError) as info:
            run(flow.get_device_code())
        assert info.value.error == "invalid_issuer"
        assert provider.issuer in info.value.message
    assert len(provider.fake.hits(WELL_KNOWN)) == 2  # a bad document is not cached
    assert provider.fake.hits("/device") == []


def test_issuer_equal_up_to_a_trailing_slash_and_case_is_accepted(provider, tmp_store):
    provider.meta["issuer"] = provider.issuer.upper().replace("HTTP://", "http://") + "/"
    assert end_session(device_flow(provider, tmp_store)) is not None


@pytest.mark.parametrize("field, value, words", [
    ("token_endpoint", None, "token_endpoint is missing"),
    ("authorization_endpoint", None, "authorization_endpoint is missing"),
    ("token_endpoint", "ftp://x/token", "token_endpoint is not an http URL"),
    ("revocation_endpoint", 7, "revocation_endpoint is not an http URL"),
])
def test_broken_discovery_documents_are_clear_errors(fake_server, tmp_store, field, value,
                                                     words):
    provider = Provider(fake_server, **{field: value})
    with pytest.raises(oac.AuthError) as info:
        run(device_flow(provider, tmp_store).get_device_code())
    assert words in info.value.message


@pytest.mark.parametrize("status, body", [(404, {"detail": "Not Found"}), (200, "<html>"),
                                          (200, [1, 2])])
def test_no_discovery_document_is_a_clear_error(fake_server, tmp_store, status, body):
    fake_server.reply("GET", WELL_KNOWN, status, body)
    with pytest.raises(oac.AuthError) as info:
        run(oac.DeviceFlow(fake_server.url, client_id=CLIENT, store=tmp_store).get_device_code())
    assert WELL_KNOWN in info.value.message
    assert "issuer URL" in info.value.message


@pytest.mark.timeout(20)
def test_discovery_retries_a_dropped_connection(fake_server, tmp_store):
    fake_server.reply("GET", WELL_KNOWN, 200, "__drop__")
    provider = Provider(fake_server)
    assert end_session(device_flow(provider, tmp_store)) is not None
    assert len(fake_server.hits(WELL_KNOWN)) == 2


def test_discovery_url_keeps_the_issuer_path(fake_server, tmp_store):
    realm = fake_server.url + "/realms/science"
    fake_server.reply("GET", "/realms/science" + WELL_KNOWN, 200, {
        "issuer": realm, "authorization_endpoint": realm + "/auth",
        "token_endpoint": realm + "/token", "end_session_endpoint": realm + "/logout"})
    flow = oac.DeviceFlow(realm + "/", client_id=CLIENT, store=tmp_store)
    assert end_session(flow) == f"{realm}/logout?client_id={CLIENT}"


# ---------------------------------------------------------------------------
# Device flow
# ---------------------------------------------------------------------------


device_answer = functools.partial(bare_device_answer, device_code="dev-code-123",
                                  verification_uri="https://p.example/device", expires_in=60)


@pytest.mark.timeout(20)
def test_device_flow_sends_the_standard_fields(provider, tmp_store):
    fake = provider.fake
    fake.reply("POST", "/device", 200, device_answer())
    fake.reply("POST", "/token", 400, {"error": "authorization_pending"})
    fake.reply("POST", "/token", 400, {"error": "slow_down"})
    provider.tokens(scope="openid offline_access")
    flow = device_flow(provider, tmp_store, scopes="openid profile offline_access")
    code = run(flow.get_device_code())
    assert code == {"uri": "https://p.example/device", "user_code": "ABCD-EFGH",
                    "device_code": "dev-code-123", "interval": 1}
    (device,) = fake.hits("/device")
    assert device.form == {"client_id": CLIENT, "scope": "offline_access openid profile"}
    assert "Authorization" not in device.headers

    start = time.monotonic()
    token = run(flow.poll(code["device_code"], code["interval"]))
    polls = fake.hits("/token")
    assert len(polls) == 3
    assert all(p.form == {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                          "device_code": "dev-code-123", "client_id": CLIENT} for p in polls)
    assert polls[2].time - polls[1].time >= 5.5  # slow_down: 1 s + 5 s (RFC 8628, 3.5)
    assert time.monotonic() - start >= 6.5
    key = f"{provider.issuer}#client_id=cli&scope=offline_access+openid+profile"
    assert tmp_store.get(key) == token
    assert fake.hits("/auth/v2/device") == []


@pytest.mark.parametrize("error, words", [("access_denied", "denied"),
                                          ("expired_token", "expired")])
def test_device_flow_stops_at_once_on_denial_and_expiry(provider, tmp_store, error, words):
    provider.fake.reply("POST", "/device", 200, device_answer())
    provider.fake.reply("POST", "/token", 400, {"error": error})
    flow = device_flow(provider, tmp_store)
    code = run(flow.get_device_code())
    with pytest.raises(oac.AuthError) as info:
        run(flow.poll(code["device_code"], 1))
    assert words in info.value.message
    assert len(provider.fake.hits("/token")) == 1


def test_without_device_endpoint_there_is_no_device_flow(fake_server, tmp_store):
    provider = Provider(fake_server, device_authorization_endpoint=None)
    with pytest.raises(oac._NoDeviceFlow) as info:
        run(device_flow(provider, tmp_store).get_device_code())
    assert "does not offer the device flow" in info.value.message
    assert fake_server.hits("/device") == []


def test_a_client_without_the_device_grant_has_no_device_flow(provider, tmp_store):
    provider.fake.reply("POST", "/device", 400, {"error": "unauthorized_client",
                                                 "error_description": "grant not allowed"})
    with pytest.raises(oac._NoDeviceFlow):
        run(device_flow(provider, tmp_store).get_device_code())


@pytest.mark.timeout(20)
def test_authenticate_falls_back_to_the_code_flow(fake_server, tmp_store, terminal, monkeypatch):
    provider = Provider(fake_server, device_authorization_endpoint=None)
    provider.tokens()
    monkeypatch.setenv("BROWSER", "true")  # someone can answer a login
    monkeypatch.setattr(oac, "_can_open_browser", lambda: False)
    user = ProviderUser(terminal, provider)
    user.start()
    try:
        with terminal:
            token = run(oac.authenticate_async(
                provider.issuer, client_id=CLIENT, store=tmp_store,
                redirect_ports=[free_port()], timeout=10))
    finally:
        user.finish()
    assert len(fake_server.hits("/token")) == 1
    assert fake_server.hits("/device") == []
    assert tmp_store.get(store_key(provider.issuer, CLIENT)) == token


def test_confidential_client_uses_http_basic(provider, tmp_store):
    provider.fake.reply("POST", "/device", 200, device_answer())
    flow = device_flow(provider, tmp_store, client_secret=SECRET)
    run(flow.get_device_code())
    (device,) = provider.fake.hits("/device")
    assert device.headers["Authorization"] == basic(CLIENT, SECRET)
    assert "client_secret" not in device.form and "client_id" not in device.form


def test_basic_credentials_are_form_encoded_first(provider, tmp_store):
    provider.fake.reply("POST", "/device", 200, device_answer())
    flow = oac.DeviceFlow(provider.issuer, client_id="my client", client_secret="a:b&c",
                          store=tmp_store)
    run(flow.get_device_code())
    assert provider.fake.hits("/device")[0].headers["Authorization"] == basic("my+client",
                                                                              "a%3Ab%26c")


def test_confidential_client_uses_the_form_when_basic_is_not_offered(fake_server, tmp_store):
    provider = Provider(fake_server,
                        token_endpoint_auth_methods_supported=["client_secret_post"])
    fake_server.reply("POST", "/device", 200, device_answer())
    run(device_flow(provider, tmp_store, client_secret=SECRET).get_device_code())
    (device,) = fake_server.hits("/device")
    assert device.form["client_id"] == CLIENT and device.form["client_secret"] == SECRET
    assert "Authorization" not in device.headers


def test_an_echoed_secret_is_redacted(provider, tmp_store):
    provider.fake.reply("POST", "/device", 401, {
        "error": "invalid_client", "error_description": f"bad secret {SECRET} for {CLIENT}"})
    with pytest.raises(oac.AuthError) as info:
        run(device_flow(provider, tmp_store, client_secret=SECRET).get_device_code())
    assert info.value.error == "invalid_client"
    for text in (str(info.value), repr(info.value), json.dumps(info.value.detail)):
        assert SECRET not in text


def test_default_scopes_leave_out_offline_access_where_unknown(fake_server, tmp_store):
    provider = Provider(fake_server, scopes_supported=["openid", "email"])
    fake_server.reply("POST", "/device", 200, device_answer())
    run(device_flow(provider, tmp_store).get_device_code())
    assert fake_server.hits("/device")[0].form["scope"] == "openid"
    # ...but asked-for scopes are sent as asked.
    run(device_flow(provider, tmp_store, scopes=["openid", "offline_access"]).get_device_code())
    assert fake_server.hits("/device")[1].form["scope"] == "offline_access openid"


def test_no_scopes_means_no_scope_parameter(provider, tmp_store):
    provider.fake.reply("POST", "/device", 200, device_answer())
    run(device_flow(provider, tmp_store, scopes=[]).get_device_code())
    assert provider.fake.hits("/device")[0].form == {"client_id": CLIENT}


# ---------------------------------------------------------------------------
# Code flow: PKCE, state, iss, nonce
# ---------------------------------------------------------------------------


class ProviderUser(User):
    """The user: reads the start URL, notes the authorize query, opens the callback."""

    def __init__(self, terminal: Terminal, provider: Provider, *, iss: Any = "issuer",
                 state: str | None = None, visits: Any = None) -> None:
        def visit(base: str, real_state: str) -> str:
            query = {"code": "the-code", "state": state or real_state}
            if iss is not None:
                query["iss"] = provider.issuer if iss == "issuer" else iss
            return f"{base}?{urlencode(query)}"

        super().__init__(terminal, tuple(visits or (visit,)))
        self.provider = provider

    def run(self) -> None:
        # Hand the nonce to the fake token endpoint, as a real provider keeps it.
        original = self.visits

        def remember(base: str, state: str, visit: Any = original[0]) -> str:
            query = parse_qs(urlsplit(self.location).query)
            self.provider.nonce = self.provider.nonce or query.get("nonce", [None])[0]
            return visit(base, state)

        self.visits = (remember, *original[1:])
        super().run()


def code_login(provider: Provider, store: oac.TokenStore, user: ProviderUser,
               force: bool = False, **kwargs: Any) -> oac.Token:
    kwargs.setdefault("timeout", 10)
    flow = oac.CodeFlow(provider.issuer, client_id=CLIENT, store=store,
                        redirect_ports=[free_port()], **kwargs)
    return login(flow, user, force=force)


@pytest.mark.timeout(20)
def test_code_flow_sends_pkce_state_nonce_and_exchanges_with_the_verifier(
    provider, tmp_store, terminal, caplog
):
    caplog.set_level(logging.DEBUG, logger="py_oidc_auth_client")
    provider.tokens()
    user = ProviderUser(terminal, provider)
    token = code_login(provider, tmp_store, user, scopes=["openid", "profile"])

    authorize = urlsplit(user.location)
    endpoint = f"{authorize.scheme}://{authorize.netloc}{authorize.path}"
    assert endpoint == f"{provider.issuer}/authorize"
    query = {k: v[0] for k, v in parse_qs(authorize.query).items()}
    port = urlsplit(query["redirect_uri"]).port
    assert query["redirect_uri"] == f"http://127.0.0.1:{port}/callback"  # RFC 8252, 7.3
    assert query["response_type"] == "code" and query["client_id"] == CLIENT
    assert query["scope"] == "openid profile"
    assert query["code_challenge_method"] == "S256"
    assert len(query["state"]) >= 43 and len(query["nonce"]) >= 43
    assert query["state"] != query["nonce"]
    assert "code_verifier" not in query and "prompt" not in query

    (exchange,) = provider.fake.hits("/token")
    verifier = exchange.form["code_verifier"]
    assert exchange.form == {"grant_type": "authorization_code", "code": "the-code",
                             "redirect_uri": query["redirect_uri"], "code_verifier": verifier,
                             "client_id": CLIENT}
    assert b64u(hashlib.sha256(verifier.encode()).digest()) == query["code_challenge"]
    assert verifier not in user.location
    assert provider.fake.hits("/authorize") == []  # the browser goes there, not the client
    assert tmp_store.get(store_key(provider.issuer, CLIENT, "openid profile")) == token
    # Nothing secret was logged or shown.
    shown = caplog.text + terminal.getvalue()
    for secret in (verifier, "the-code", token["access_token"], "r-1", query["nonce"]):
        assert secret not in shown


@pytest.mark.timeout(20)
def test_confidential_code_exchange_uses_basic(provider, tmp_store, terminal):
    provider.tokens()
    code_login(provider, tmp_store, ProviderUser(terminal, provider), client_secret=SECRET)
    (exchange,) = provider.fake.hits("/token")
    assert exchange.headers["Authorization"] == basic(CLIENT, SECRET)
    assert "client_id" not in exchange.form


@pytest.mark.timeout(20)
@pytest.mark.parametrize("iss", ["https://evil.example.com", None])
def test_callback_with_a_wrong_or_missing_iss_is_refused(provider, tmp_store, terminal, iss):
    provider.tokens()
    user = ProviderUser(terminal, provider, iss=iss)
    with pytest.raises(oac.AuthError) as info:
        code_login(provider, tmp_store, user)
    assert "invalid_issuer" in info.value.message
    assert user.pages[0].status == 400
    assert "did not come from" in user.pages[0].body
    assert provider.fake.hits("/token") == []  # its code is never exchanged
    assert tmp_store.hosts() == []


@pytest.mark.timeout(20)
def test_iss_is_optional_where_the_provider_does_not_advertise_it(fake_server, tmp_store,
                                                                  terminal):
    provider = Provider(fake_server, authorization_response_iss_parameter_supported=None)
    provider.tokens()
    code_login(provider, tmp_store, ProviderUser(terminal, provider, iss=None))
    assert len(fake_server.hits("/token")) == 1
    # ...but a present one must still be right.
    user = ProviderUser(Terminal(), provider, iss="https://evil.example.com")
    with pytest.raises(oac.AuthError, match="invalid_issuer"):
        code_login(provider, tmp_store, user, force=True)


@pytest.mark.timeout(20)
def test_callback_with_a_wrong_state_is_refused_and_the_flow_waits(provider, tmp_store,
                                                                   terminal):
    provider.tokens()
    user = ProviderUser(terminal, provider, state="not-the-state")
    with pytest.raises(oac.AuthError) as info:
        code_login(provider, tmp_store, user, timeout=2)
    assert info.value.status_code == 408
    assert user.pages[0].status == 400
    assert provider.fake.hits("/token") == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize("nonce", ["another-login", None])
def test_id_token_with_a_wrong_or_missing_nonce_is_refused(provider, tmp_store, terminal, nonce):
    provider.nonce = "x"  # not the login's: the user hook leaves it
    provider.claims = {"nonce": nonce}
    provider.tokens()
    with pytest.raises(oac.AuthError) as info:
        code_login(provider, tmp_store, ProviderUser(terminal, provider))
    assert "nonce" in info.value.message
    assert tmp_store.hosts() == []


@pytest.mark.timeout(20)
def test_login_without_id_token_is_refused_when_openid_was_asked(provider, tmp_store,
                                                                 terminal):
    provider.tokens(id_token=False)
    with pytest.raises(oac.AuthError, match="without an ID token"):
        code_login(provider, tmp_store, ProviderUser(terminal, provider))
    # Plain OAuth (no openid scope): no ID token expected.
    code_login(provider, tmp_store, ProviderUser(Terminal(), provider), scopes=["api"])
    assert tmp_store.hosts() == [store_key(provider.issuer, CLIENT, "api")]


def test_pkce_pair():
    seen = set()
    for _ in range(50):
        verifier, challenge = oac._pkce_pair()
        assert 43 <= len(verifier) <= 128  # RFC 7636, 4.1
        assert set(verifier) <= set(string.ascii_letters + string.digits + "-._~")
        assert challenge == b64u(hashlib.sha256(verifier.encode("ascii")).digest())
        assert "=" not in challenge
        seen.add(verifier)
    assert len(seen) == 50


# ---------------------------------------------------------------------------
# ID token: claims
# ---------------------------------------------------------------------------

NOW = 1_800_000_000


def good_claims(**changes: Any) -> dict[str, Any]:
    claims = {"iss": "https://op.example", "aud": CLIENT, "sub": "alice", "iat": NOW,
              "exp": NOW + 300, "nonce": "n-1"}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def check(claims: dict[str, Any], nonce: str | None = "n-1", now: float = NOW) -> None:
    oac._check_claims(claims, "https://op.example", CLIENT, nonce, now)


def test_good_claims_pass():
    check(good_claims())
    check(good_claims(aud=[CLIENT]))
    check(good_claims(aud=[CLIENT, "api"], azp=CLIENT))
    check(good_claims(nonce=None), nonce=None)  # device flow and refresh: no nonce
    check(good_claims(), now=NOW + 300 + 60)  # within the clock skew
    check(good_claims(iat=NOW + 60))


@pytest.mark.parametrize("claims, now, words", [
    (good_claims(iss="https://evil.example"), NOW, "(iss)"),
    (good_claims(iss=None), NOW, "(iss)"),
    (good_claims(iss="https://op.example/"), NOW, "(iss)"),  # exact, as the document says
    (good_claims(aud="other"), NOW, "(aud)"),
    (good_claims(aud=["other", "api"]), NOW, "(aud)"),
    (good_claims(aud=None), NOW, "(aud)"),
    (good_claims(aud=[CLIENT, "api"]), NOW, "(azp)"),  # several audiences need azp
    (good_claims(aud=[CLIENT, "api"], azp="api"), NOW, "(azp)"),
    (good_claims(azp="other"), NOW, "(azp)"),
    (good_claims(exp=None), NOW, "(exp)"),
    (good_claims(exp="soon"), NOW, "(exp)"),
    (good_claims(), NOW + 300 + oac._CLOCK_SKEW, "(exp)"),
    (good_claims(iat=None), NOW, "(iat)"),
    (good_claims(iat=NOW + oac._CLOCK_SKEW + 1), NOW, "(iat)"),
    (good_claims(nonce="n-2"), NOW, "(nonce)"),
    (good_claims(nonce=None), NOW, "(nonce)"),
])
def test_each_bad_claim_is_refused(claims, now, words):
    with pytest.raises(oac.AuthError) as info:
        check(claims, now=now)
    assert words in info.value.message
    assert info.value.error == "invalid_id_token"
    assert "n-1" not in info.value.message


# ---------------------------------------------------------------------------
# ID token: signatures
# ---------------------------------------------------------------------------


def verify(token: str, key: dict[str, Any] | None = None) -> bool:
    header, _, signed, signature = oac._jws_parts(token)
    return oac._rsa_verify(key or jwk(rsa_key()), header["alg"], signed, signature)


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
def test_rsa_signatures_verify_with_the_standard_library(alg):
    token = sign(good_claims(), alg=alg)
    assert verify(token)
    head, body, sig = token.split(".")
    assert not verify(f"{head}.{part(good_claims(sub='mallory'))}.{sig}")  # changed claims
    assert not verify(token, jwk(rsa_key(slot=1)))  # another key
    assert not verify(f"{head}.{body}.{sig[:-4]}AAAA")  # changed signature
    assert not verify(f"{head}.{body}.{b64u(b'short')}")


def test_rsa_verification_refuses_weak_or_broken_keys():
    token = sign(good_claims(), key=rsa_key(1024), kid=None)
    assert not verify(token, jwk(rsa_key(1024)))  # under 2048 bits
    good = jwk(rsa_key())
    assert not verify(sign(good_claims()), {**good, "e": b64u(b"\x01")})  # e = 1
    assert not verify(sign(good_claims()), {**good, "n": "!!"})
    assert not verify(sign(good_claims()), {"kty": "RSA"})
    # A signature value >= n is refused before any arithmetic.
    n = int.from_bytes(base64.urlsafe_b64decode(good["n"] + "=="), "big")
    head, body, _ = sign(good_claims()).split(".")
    assert not verify(f"{head}.{body}.{b64u((n + 1).to_bytes(256, 'big'))}")


def test_the_expected_block_is_the_emsa_pkcs1_v1_5_encoding():
    # The same check as cryptography's verifier, on 20 random messages.
    key = rsa_key()
    for i in range(20):
        token = sign(good_claims(sub=f"user{i}"), alg="RS256")
        _, _, signed, signature = oac._jws_parts(token)
        key.public_key().verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        assert oac._rsa_verify(jwk(key), "RS256", signed, signature)


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c", f"{part([1])}.{part({})}.", "x.y.z.w"])
def test_malformed_id_tokens_are_refused(token):
    with pytest.raises(oac.AuthError, match="not a signed JWT"):
        oac._jws_parts(token)


def id_token_check(provider: Provider, store: oac.TokenStore, token: str, **kwargs: Any) -> None:
    """A refresh that the provider answers with *token* as the ID token."""
    provider.id_token = token
    provider.tokens()
    run(device_flow(provider, store, **kwargs).refresh("r-old"))


def test_signed_id_token_is_checked_against_the_jwks(provider, tmp_store):
    id_token_check(provider, tmp_store, sign(provider.claims_now()))
    with pytest.raises(oac.AuthError, match="RS256 signature does not verify"):
        id_token_check(provider, tmp_store, sign(provider.claims_now(), key=rsa_key(slot=1)))
    with pytest.raises(oac.AuthError, match="signature does not verify"):  # no such kid
        id_token_check(provider, tmp_store, sign(provider.claims_now(), kid="unknown"))
    with pytest.raises(oac.AuthError, match=r"\(aud\)"):  # signed, but for another client
        id_token_check(provider, tmp_store, sign(provider.claims_now(aud="other")))


def test_a_new_key_id_fetches_the_jwks_again(provider, tmp_store):
    id_token_check(provider, tmp_store, sign(provider.claims_now()))
    assert len(provider.fake.hits("/jwks")) == 1
    provider.keys = [jwk(rsa_key(slot=1), kid="k2")]  # the provider rotated its key
    id_token_check(provider, tmp_store, sign(provider.claims_now(), key=rsa_key(slot=1),
                                             kid="k2"))
    assert len(provider.fake.hits("/jwks")) == 2
    id_token_check(provider, tmp_store, sign(provider.claims_now(), key=rsa_key(slot=1),
                                             kid="k2"))
    assert len(provider.fake.hits("/jwks")) == 2  # kept again


def test_hmac_id_tokens_are_verified_with_the_client_secret(provider, tmp_store):
    id_token_check(provider, tmp_store, sign(provider.claims_now(), alg="HS256"),
                   client_secret=SECRET)
    with pytest.raises(oac.AuthError, match="HS256 signature does not verify"):
        id_token_check(provider, tmp_store, sign(provider.claims_now(), alg="HS256",
                                                 secret="wrong"), client_secret=SECRET)


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])  # PS256 is verified now
def test_other_algorithms_are_trusted_from_the_token_endpoint_but_claims_still_checked(
    provider, tmp_store, alg, caplog
):
    caplog.set_level(logging.DEBUG, logger="py_oidc_auth_client")
    # Only algorithms the provider lists, with a key of the right type in its key set.
    provider.meta["id_token_signing_alg_values_supported"] = ["RS256", alg]
    provider.keys += [{"kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"},
                      {"kty": "OKP", "kid": "k1", "crv": "Ed25519", "x": "AA"}]
    id_token_check(provider, tmp_store, sign(provider.claims_now(), alg=alg))
    assert f"signed with {alg}: signature not verified" in caplog.text
    with pytest.raises(oac.AuthError, match=r"\(iss\)"):
        id_token_check(provider, tmp_store, sign(provider.claims_now(iss="https://x"), alg=alg))


@pytest.mark.parametrize("header", [{"alg": "none"}, {}, {"alg": 5}])
def test_unsigned_id_tokens_are_refused(provider, tmp_store, header):
    token = f"{part(header)}.{part(provider.claims_now())}."
    with pytest.raises(oac.AuthError, match=r"not signed|not an algorithm name"):
        id_token_check(provider, tmp_store, token)


# ---------------------------------------------------------------------------
# Refresh
# ---------------------------------------------------------------------------


def stored(provider: Provider, store: oac.TokenStore, lifetime: int = 3600, scope: str = "openid",
           refresh: str = "r-old", **key: Any) -> oac.Token:
    now = int(time.time())
    token = oac._token(make_jwt(lifetime, now), "Bearer", now + lifetime, refresh, now + 86400,
                       scope)
    store.put(store_key(provider.issuer, CLIENT, key.get("scopes")), token)
    return token


@pytest.mark.timeout(20)
def test_expired_token_is_refreshed_with_the_granted_scope(provider, tmp_store):
    old = stored(provider, tmp_store, lifetime=1, scope="openid profile")
    time.sleep(1.1)
    provider.tokens(refresh="r-new")
    token = run(device_flow(provider, tmp_store).authenticate())
    (post,) = provider.fake.hits("/token")
    assert post.form == {"grant_type": "refresh_token", "refresh_token": "r-old",
                         "scope": "openid profile", "client_id": CLIENT}
    assert token["access_token"] != old["access_token"]
    assert token["refresh_token"] == "r-new"
    assert token["scope"] == "openid profile"  # absent in the answer: unchanged (RFC 6749, 5.1)
    assert tmp_store.get(store_key(provider.issuer, CLIENT)) == token


@pytest.mark.timeout(20)
def test_refresh_keeps_a_refresh_token_that_was_not_rotated(provider, tmp_store):
    old = stored(provider, tmp_store, lifetime=1)
    time.sleep(1.1)
    provider.tokens(refresh=None, id_token=False)
    token = run(device_flow(provider, tmp_store).authenticate())
    assert token["refresh_token"] == "r-old"
    assert token["refresh_expires"] == old["refresh_expires"]


@pytest.mark.timeout(20)
def test_refused_refresh_token_means_a_new_login(provider, tmp_store, monkeypatch):
    stored(provider, tmp_store, lifetime=1)
    time.sleep(1.1)
    provider.fake.reply("POST", "/token", 400, {"error": "invalid_grant"})
    monkeypatch.setattr(oac, "_no_login_reason", lambda *args: "this is a test")
    with pytest.raises(oac.AuthError) as info:
        run(oac.authenticate_async(provider.issuer, client_id=CLIENT, store=tmp_store))
    assert info.value.error == "login_required"
    assert f"--client-id {CLIENT}" in info.value.message
    assert tmp_store.hosts() == []


@pytest.mark.timeout(20)
def test_a_token_refreshed_by_another_process_is_used(provider, tmp_store):
    stored(provider, tmp_store, lifetime=1)
    time.sleep(1.1)
    flow = device_flow(provider, tmp_store)
    other = oac.TokenStore(tmp_store.path)  # another process's view of the same file
    fresh = stored(provider, other, refresh="r-other")
    assert run(flow.authenticate()) == fresh
    assert provider.fake.hits("/token") == []


@pytest.mark.timeout(20)
def test_refresh_checks_a_new_id_token(provider, tmp_store):
    stored(provider, tmp_store, lifetime=1)
    time.sleep(1.1)
    provider.claims = {"aud": "someone-else"}
    provider.tokens()
    with pytest.raises(oac.AuthError, match=r"\(aud\)"):
        run(device_flow(provider, tmp_store).authenticate())


# ---------------------------------------------------------------------------
# Revocation and logout
# ---------------------------------------------------------------------------


def test_revoke_sends_both_tokens_and_logout_forgets_them(provider, tmp_store):
    provider.fake.reply("POST", "/revoke", 200, b"")
    stored(provider, tmp_store)
    provider.id_token = sign(provider.claims_now())
    provider.tokens()
    flow = device_flow(provider, tmp_store, client_secret=SECRET)
    token = run(flow.refresh("r-old"))  # comes with an ID token
    url = run(flow.logout())
    first, second = provider.fake.hits("/revoke")
    assert first.form == {"token": "r-1", "token_type_hint": "refresh_token"}
    assert second.form == {"token": token["access_token"], "token_type_hint": "access_token"}
    assert first.headers["Authorization"] == basic(CLIENT, SECRET)
    assert tmp_store.hosts() == []
    assert url == f"{provider.issuer}/logout?" + urlencode(
        {"client_id": CLIENT, "id_token_hint": provider.id_token})


def test_revoke_is_true_when_the_server_revoked_something(provider, tmp_store, caplog):
    token = stored(provider, tmp_store)
    flow = device_flow(provider, tmp_store)
    down = []

    def revoke(req: Any) -> tuple[int, dict[str, str], Any]:
        if down:
            return 503, {}, {"error": "temporarily_unavailable", "error_description": "later"}
        if req.form["token_type_hint"] == "refresh_token":
            return 200, {}, b""
        return 400, {}, {"error": "unsupported_token_type"}  # a JWT access token

    provider.fake.reply("POST", "/revoke", 200, revoke)
    with caplog.at_level(logging.INFO, logger="py_oidc_auth_client"):
        run(flow.logout())
        assert "unsupported_token_type" in caplog.text  # said, but no warning
        assert "WARNING" not in [r.levelname for r in caplog.records]
        down.append(True)
        token = stored(provider, tmp_store)
        run(flow.logout())
    assert "WARNING" in [r.levelname for r in caplog.records]
    assert tmp_store.hosts() == []  # forgotten here in any case
    assert len(provider.fake.hits("/revoke")) == 4  # one attempt each, never a retry loop
    for secret in (token["access_token"], token["refresh_token"]):
        assert secret not in caplog.text


def test_without_revocation_endpoint_logout_only_forgets(fake_server, tmp_store):
    provider = Provider(fake_server, revocation_endpoint=None, end_session_endpoint=None)
    stored(provider, tmp_store)
    flow = device_flow(provider, tmp_store)
    assert run(flow.logout()) is None
    assert tmp_store.hosts() == []
    assert fake_server.hits("/revoke") == []


def test_py_oidc_auth_mode_revokes_nothing(fake_server, tmp_store, make_token):
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store)
    token = make_token()
    tmp_store.put(fake_server.url, token)
    assert run(flow.logout()) is None
    assert tmp_store.hosts() == []
    assert fake_server.requests == []


def test_the_id_token_survives_in_the_store_for_logout(provider, tmp_store):
    stored(provider, tmp_store)
    provider.id_token = sign(provider.claims_now())
    provider.tokens()
    token = run(device_flow(provider, tmp_store).refresh("r-old"))  # as a login does
    assert provider.id_token in Path(tmp_store.path).read_text()
    fresh = oac.TokenStore(tmp_store.path)  # as in a new process
    oac.BaseFlow.reset_instances()
    assert fresh.get(store_key(provider.issuer, CLIENT)) == token
    url = run(device_flow(provider, fresh).logout())
    assert url.endswith(urlencode({"id_token_hint": provider.id_token}))


# ---------------------------------------------------------------------------
# Store keys, flows, authenticate, CLI
# ---------------------------------------------------------------------------

ISSUER = "https://keycloak.example.org/realms/science"


def test_store_keys_name_issuer_client_and_sorted_scopes():
    assert store_key(ISSUER) == ISSUER
    assert store_key(ISSUER, "cli") == f"{ISSUER}#client_id=cli&scope=offline_access+openid"
    key = f"{ISSUER}#client_id=cli&scope=openid+profile"
    for scopes in ("openid profile", ["profile", "openid"], ("openid", "profile openid")):
        assert store_key(ISSUER, "cli", scopes) == key
    assert store_key("HTTPS://Keycloak.Example.org:443/realms/science/", "cli",
                          "profile openid") == key
    assert store_key(ISSUER, "other") != store_key(ISSUER, "cli")
    assert store_key(ISSUER, "cli", []) == f"{ISSUER}#client_id=cli&scope="


def test_store_keys_are_hosts_of_their_own():
    key = f"{ISSUER}#client_id=cli&scope=openid+profile"
    assert store_key(key) == key
    assert store_key(f"{ISSUER}#scope=profile+openid&client_id=cli") == key
    assert store_key(f"{ISSUER}#client_id=cli") == store_key(ISSUER, "cli")
    config = oac.DeviceFlow(key).config
    assert (config.host, config.client_id, config.scopes) == (ISSUER, "cli", ["openid", "profile"])
    assert oac.DeviceFlow(ISSUER).config.client_id is None
    with pytest.raises(oac.AuthError, match="fragment"):
        store_key(ISSUER + "#other")
    with pytest.raises(oac.AuthError, match="without a #client_id"):
        store_key(key, "cli")


def test_one_store_holds_several_clients_of_one_provider(tmp_store, make_token):
    one, two = make_token(), make_token()
    tmp_store.put(store_key(ISSUER, "cli"), one)
    tmp_store.put(store_key(ISSUER, "cli", "openid"), two)
    tmp_store.put(ISSUER, make_token())
    assert len(tmp_store.hosts()) == 3
    assert tmp_store.get(store_key(ISSUER, "cli")) == one
    assert tmp_store.get(store_key(ISSUER, "cli", ["openid"])) == two


def test_flows_are_per_client_and_accept_a_store_key_as_host():
    a = oac.DeviceFlow(ISSUER, client_id="cli")
    assert a is oac.DeviceFlow(ISSUER, client_id="cli", scopes=["openid", "offline_access"])
    assert a is not oac.DeviceFlow(ISSUER, client_id="cli2")
    assert a is not oac.DeviceFlow(ISSUER)
    assert a.host == store_key(ISSUER, "cli")
    config = oac.Config(host=ISSUER, client_id="cli")
    assert oac.DeviceFlow(config=config) is a
    b = oac.CodeFlow(f"{ISSUER}#client_id=cli&scope=openid+profile")
    assert (b.config.host, b.config.client_id, b.config.scopes) == (
        ISSUER, "cli", ["openid", "profile"])
    assert b is oac.CodeFlow(ISSUER, client_id="cli", scopes="profile openid")


def test_the_client_secret_stays_out_of_reprs():
    config = oac.Config(host=ISSUER, client_id="cli", client_secret=SECRET)
    flow = oac.DeviceFlow(ISSUER, client_id="cli", client_secret=SECRET)
    for text in (repr(config), repr(flow), str(flow), repr(flow.config), flow.host):
        assert SECRET not in text


def test_cached_token_needs_no_network(provider, tmp_store):
    token = stored(provider, tmp_store)
    assert oac.authenticate(provider.issuer, client_id=CLIENT, store=tmp_store) == token
    assert provider.fake.requests == []


@pytest.mark.timeout(30)
def test_a_cache_hit_imports_nothing_heavy(tmp_path):
    store = tmp_path / "store.json"
    now = int(time.time())
    token = oac._token(make_jwt(3600, now), "Bearer", now + 3600, "r", now + 7200, "openid")
    oac.TokenStore(store).put(store_key(ISSUER, "cli", "openid profile"), token)
    out = run_child(f"""
        import json, sys
        import py_oidc_auth_client as oac
        token = oac.authenticate({ISSUER!r}, client_id="cli", scopes=["profile", "openid"],
                                 store=oac.TokenStore({str(store)!r}))
        heavy = ("asyncio", "urllib.request", "http.server", "webbrowser", "ssl")
        print(json.dumps([m for m in heavy if m in sys.modules]), bool(token))
    """)
    assert out.split() == ["[]", "True"]


def run_cli(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = oac.main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_cli_lists_keys_quoted_for_the_shell_and_removes_by_client(make_token):
    import shlex

    store = oac._default_store("py-oidc-auth")
    store.put(store_key(ISSUER, "cli", "openid profile"), make_token())
    store.put("https://plain.example.com", make_token())
    code, out, _ = run_cli("--list")
    assert code == 0
    lines = sorted(out.splitlines())
    assert lines[0].startswith(f"'{ISSUER}#client_id=cli&scope=openid+profile'\taccess valid for ")
    assert lines[1].startswith("https://plain.example.com\taccess valid for ")  # unchanged
    assert shlex.split(lines[0].split("\t")[0]) == [store_key(ISSUER, "cli",
                                                                   "openid profile")]
    code, _, err = run_cli("--remove", ISSUER, "--client-id", "cli", "--scope", "profile",
                           "--scope", "openid")
    assert code == 0 and "Removed" in err
    assert store.hosts() == ["https://plain.example.com"]


@pytest.mark.parametrize("args", [["--client-secret", "x", ISSUER], ["--scope", "openid", ISSUER]])
def test_cli_secret_and_scope_need_a_client_id(args):
    code, _, err = run_cli(*args)
    assert code == 2
    assert "need --client-id" in err


def test_cli_reads_the_secret_from_the_environment(provider, monkeypatch):
    monkeypatch.setenv("OIDC_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("BROWSER", "true")  # someone could answer a login
    monkeypatch.setattr(oac, "_can_open_browser", lambda: False)
    provider.fake.reply("POST", "/device", 400, {"error": "invalid_client"})
    code, _, err = run_cli(provider.issuer, "--client-id", CLIENT, "--timeout", "5")
    assert code == 1
    assert provider.fake.hits("/device")[0].headers["Authorization"] == basic(CLIENT, SECRET)
    assert SECRET not in err


def test_cli_names_the_issuer_and_client_after_login(provider, make_token):
    store = oac._default_store("py-oidc-auth")
    store.put(store_key(provider.issuer, CLIENT), make_token())
    code, out, _ = run_cli(provider.issuer, "--client-id", CLIENT)
    assert code == 0
    assert re.match(rf"Logged in to {re.escape(provider.issuer)} \(client {CLIENT}\): ", out)
