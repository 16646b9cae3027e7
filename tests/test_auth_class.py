"""BearerAuth with real requests and httpx (sync and async) against a real local server.

``fake_server`` plays both parts: the py-oidc-auth token route that refreshes tokens,
and the protected API that accepts only the tokens it issued, until they expire.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from conftest import TOKEN, make_jwt, run_child
from tests import extra, oac

requests = extra("requests")
httpx = extra("httpx")

pytestmark = pytest.mark.timeout(30)
API = "/api/data"


class Issuer:
    """The token route and the protected API of ``fake_server``."""

    def __init__(self, fake: Any, lifetime: int = 3600) -> None:
        self.fake, self.lifetime = fake, lifetime
        self.access: dict[str, int] = {}  # access token -> expiry
        self.refresh: set[str] = set()
        self.numbers: dict[str, int] = {}
        self.refuse_all = False
        self.seen: list[tuple[int, int, dict[str, str]]] = []  # (token number, status, form)
        self.before_api: Callable[[str], None] | None = None
        fake.reply("POST", TOKEN, 200, self._token_route)
        for method in ("GET", "POST"):
            fake.reply(method, API, 200, self._api)

    def answer(self, refresh: bool = True) -> dict[str, Any]:
        now = int(time.time())
        access = make_jwt(self.lifetime, now, jti=uuid.uuid4().hex)
        self.access[access] = now + self.lifetime
        self.numbers[access] = len(self.numbers) + 1
        answer = {"access_token": access, "token_type": "Bearer", "expires": now + self.lifetime,
                  "refresh_token": None, "refresh_expires": now + 86400, "scope": "openid"}
        if refresh:
            answer["refresh_token"] = f"refresh-{uuid.uuid4().hex}"
            self.refresh.add(answer["refresh_token"])
        return answer

    def token(self, refresh: bool = True) -> oac.Token:
        """A new login's answer as the store keeps it (a `Token`)."""
        answer = self.answer(refresh)
        return {**answer, "refresh_token": answer["refresh_token"] or "",
                "refresh_expires": answer["refresh_expires"] if refresh else 0,
                "headers": {"Authorization": f"Bearer {answer['access_token']}"}}

    def seed(self, store: oac.TokenStore, refresh: bool = True) -> oac.Token:
        token = self.token(refresh)
        store.put(self.fake.url, token)
        return token

    def revoke(self, token: oac.Token) -> None:
        self.access.pop(token["access_token"], None)

    def number(self, token: oac.Token) -> int:
        return self.numbers[token["access_token"]]

    @property
    def refreshes(self) -> int:
        return len(self.fake.hits(TOKEN))

    def _token_route(self, req: Any) -> tuple[int, dict[str, str], Any]:
        if req.form.get("grant_type") != "refresh-token" or (
                req.form.get("refresh-token") not in self.refresh):
            return 400, {}, {"detail": 'Upstream OIDC error: {"error":"invalid_grant"}'}
        return 200, {}, self.answer()

    def _api(self, req: Any) -> tuple[int, dict[str, str], Any]:
        header = next((v for k, v in req.headers.items() if k.lower() == "authorization"), "")
        access = header.partition(" ")[2]
        if self.before_api is not None:
            self.before_api(access)
        number = self.numbers.get(access, 0)
        if self.refuse_all or self.access.get(access, 0) <= time.time():
            self.seen.append((number, 401, req.form))
            return 401, {"WWW-Authenticate": "Bearer"}, {"detail": "Not authenticated"}
        self.seen.append((number, 200, req.form))
        return 200, {}, {"token": number}


@pytest.fixture
def issuer(fake_server):
    return Issuer(fake_server)


@dataclass
class Result:
    status: int
    body: Any
    history: list[int]


# Three clients, one shape: send(auth, method, url, data) -> Result, or many in one session.


def with_requests(auth, calls):
    with requests.Session() as session:
        session.auth = auth
        out = []
        for method, url, data, pause in calls:
            time.sleep(pause)
            r = session.request(method, url, data=data, timeout=10)
            out.append(Result(r.status_code, r.json(), [h.status_code for h in r.history]))
        return out


def with_httpx(auth, calls):
    with httpx.Client(auth=auth, timeout=10) as client:
        out = []
        for method, url, data, pause in calls:
            time.sleep(pause)
            r = client.request(method, url, data=data)
            out.append(Result(r.status_code, r.json(), [h.status_code for h in r.history]))
        return out


def with_httpx_async(auth, calls):
    async def go():
        async with httpx.AsyncClient(auth=auth, timeout=10) as client:
            out = []
            for method, url, data, pause in calls:
                await asyncio.sleep(pause)
                r = await client.request(method, url, data=data)
                out.append(Result(r.status_code, r.json(), [h.status_code for h in r.history]))
            return out

    return asyncio.run(go())


CLIENTS = {"requests": with_requests, "httpx": with_httpx, "httpx-async": with_httpx_async}


@pytest.fixture(params=list(CLIENTS))
def send(request):
    """``send(auth, url, method="GET", data=None)`` -> Result, through each client in turn."""
    many = CLIENTS[request.param]

    def one(auth, url, method="GET", data=None):
        return many(auth, [(method, url, data, 0)])[0]

    one.many = many
    return one


# -- the header ----------------------------------------------------------------------------------


def test_the_header_comes_from_the_cache(fake_server, issuer, tmp_store, send):
    token = issuer.seed(tmp_store)
    result = send(oac.BearerAuth(fake_server.url, store=tmp_store), fake_server.url + API)
    assert result == Result(200, {"token": issuer.number(token)}, [])
    assert issuer.refreshes == 0


def test_an_instance_is_an_httpx_auth_once_httpx_is_loaded(fake_server):
    auth = oac.BearerAuth(fake_server.url)
    assert isinstance(auth, httpx.Auth)
    assert isinstance(auth, oac.BearerAuth)
    assert type(auth).__name__ == "BearerAuth"


# -- refresh before expiry -----------------------------------------------------------------------


def test_a_token_that_expires_during_the_run_is_refreshed_in_time(
    fake_server, tmp_store, send
):
    issuer = Issuer(fake_server, lifetime=4)
    first = issuer.seed(tmp_store)
    auth = oac.BearerAuth(fake_server.url, store=tmp_store)
    calls = [("GET", fake_server.url + API, None, 0.25)] * 22  # 5.5 s: past the 4-s lifetime
    results = send.many(auth, calls)
    assert [r.status for r in results] == [200] * len(calls)
    assert all(status == 200 for _, status, _ in issuer.seen)  # the API never said 401
    assert time.time() > first["expires"]  # the first token did expire during the run
    used = [r.body["token"] for r in results]
    assert used == sorted(used) and used[0] == issuer.number(first)
    assert len(set(used)) >= 3  # refreshed at least twice
    assert issuer.refreshes == len(set(used)) - 1  # one refresh per new token, no more
    # Without the refresh the run would have failed: the server refuses the first token now.
    stale = requests.get(fake_server.url + API, headers=first["headers"], timeout=5)
    assert stale.status_code == 401


# -- after a 401 --------------------------------------------------------------------------------


def test_a_401_gets_one_refresh_and_one_retry(fake_server, issuer, tmp_store, send):
    token = issuer.seed(tmp_store)
    issuer.revoke(token)  # the server no longer accepts it, though it has not expired
    result = send(oac.BearerAuth(fake_server.url, store=tmp_store), fake_server.url + API)
    assert result.status == 200
    assert result.history == [401]
    fresh = tmp_store.get(fake_server.url)
    assert result.body == {"token": issuer.number(fresh)}
    assert [(n, status) for n, status, _ in issuer.seen] == [
        (issuer.number(token), 401), (issuer.number(fresh), 200)]
    assert issuer.refreshes == 1


def test_a_second_401_is_returned_without_a_loop(fake_server, issuer, tmp_store, send):
    issuer.seed(tmp_store)
    issuer.refuse_all = True
    result = send(oac.BearerAuth(fake_server.url, store=tmp_store), fake_server.url + API)
    assert result.status == 401
    assert result.body == {"detail": "Not authenticated"}
    assert len(issuer.seen) == 2
    assert issuer.refreshes == 1


def test_the_retry_sends_the_body_again(fake_server, issuer, tmp_store, send):
    issuer.revoke(issuer.seed(tmp_store))
    result = send(oac.BearerAuth(fake_server.url, store=tmp_store), fake_server.url + API,
                  method="POST", data={"answer": "42"})
    assert result.status == 200
    assert [form for _, _, form in issuer.seen] == [{"answer": "42"}] * 2


def test_a_token_another_process_stored_is_used_without_a_refresh(
    fake_server, issuer, tmp_store, send
):
    token = issuer.seed(tmp_store)
    newer: list[oac.Token] = []

    def meanwhile(access: str) -> None:  # another process refreshes while we send
        if access == token["access_token"] and not newer:
            issuer.revoke(token)
            newer.append(issuer.token())
            oac.TokenStore(tmp_store.path).put(fake_server.url, newer[0])

    issuer.before_api = meanwhile
    result = send(oac.BearerAuth(fake_server.url, store=tmp_store), fake_server.url + API)
    assert result == Result(200, {"token": issuer.number(newer[0])}, [401])
    assert issuer.refreshes == 0


def test_a_token_without_refresh_token_gets_its_401_back(fake_server, issuer, tmp_store, send):
    issuer.revoke(issuer.seed(tmp_store, refresh=False))
    result = send(oac.BearerAuth(fake_server.url, store=tmp_store), fake_server.url + API)
    assert result.status == 401
    assert len(issuer.seen) == 1
    assert issuer.refreshes == 0
    assert fake_server.hits("/auth/v2/device") == []  # no login started


def test_a_refused_refresh_token_in_a_batch_job_raises_the_login_error(
    fake_server, issuer, tmp_store, send, monkeypatch
):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    token = issuer.seed(tmp_store)
    issuer.revoke(token)
    issuer.refresh.clear()  # the refresh token is dead too: the session is over
    with pytest.raises(oac.AuthError) as info:
        send(oac.BearerAuth(fake_server.url, store=tmp_store), fake_server.url + API)
    assert "Slurm batch job" in info.value.message
    assert "OIDC_TOKEN_FILE" in info.value.message
    assert issuer.refreshes == 1
    assert fake_server.hits("/auth/v2/device") == []


def test_no_retry_after_a_redirect_to_another_host(fake_server, issuer, tmp_store, send):
    issuer.seed(tmp_store)
    other = fake_server.url.replace("127.0.0.1", "localhost") + "/elsewhere"
    fake_server.reply("GET", "/moved", 302, "", headers={"Location": other})
    fake_server.reply("GET", "/elsewhere", 401, {"detail": "who are you?"})
    auth = oac.BearerAuth(fake_server.url, store=tmp_store)
    if send.many is with_requests:
        result = send(auth, fake_server.url + "/moved")
    else:  # httpx follows redirects only when asked
        async def go():
            async with httpx.AsyncClient(auth=auth, follow_redirects=True) as client:
                return (await client.get(fake_server.url + "/moved")).status_code

        if send.many is with_httpx:
            with httpx.Client(auth=auth, follow_redirects=True) as client:
                status = client.get(fake_server.url + "/moved").status_code
        else:
            status = asyncio.run(go())
        result = Result(status, None, [])
    assert result.status == 401
    (hit,) = fake_server.hits("/elsewhere")
    assert "authorization" not in {k.lower() for k in hit.headers}  # the client dropped it
    assert issuer.refreshes == 0  # and a 401 there says nothing about our token


# -- concurrency ----------------------------------------------------------------------------


def test_parallel_401s_refresh_once_with_requests(fake_server, issuer, tmp_store):
    issuer.revoke(issuer.seed(tmp_store))
    auth = oac.BearerAuth(fake_server.url, store=tmp_store)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(
            lambda _: requests.get(fake_server.url + API, auth=auth, timeout=10).status_code,
            range(8)))
    assert statuses == [200] * 8
    assert issuer.refreshes == 1


def test_parallel_401s_refresh_once_with_httpx_async(fake_server, issuer, tmp_store):
    issuer.revoke(issuer.seed(tmp_store))
    auth = oac.BearerAuth(fake_server.url, store=tmp_store)

    async def go():
        async with httpx.AsyncClient(auth=auth, timeout=10) as client:
            return await asyncio.gather(*(client.get(fake_server.url + API) for _ in range(8)))

    assert [r.status_code for r in asyncio.run(go())] == [200] * 8
    assert issuer.refreshes == 1


@pytest.mark.timeout(20)
def test_many_coroutines_waiting_for_one_refresh_hold_no_thread(fake_server, issuer, tmp_store,
                                                                 make_token):
    # Waiters used to sit in executor threads: with the pool full of them, the refresh
    # they were waiting for could not get a thread until the lock timed out (60 s).
    tmp_store.put(fake_server.url, make_token(lifetime=-10, refresh="refresh-shared"))
    issuer.refresh.add("refresh-shared")

    async def go():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
        return await asyncio.gather(*(oac.authenticate_async(fake_server.url, store=tmp_store)
                                      for _ in range(8)))

    start = time.monotonic()
    tokens = asyncio.run(go())
    assert time.monotonic() - start < 5
    assert len({t["access_token"] for t in tokens}) == 1
    assert issuer.refreshes == 1


def test_the_async_flow_never_calls_the_blocking_authenticate(
    fake_server, issuer, tmp_store, monkeypatch
):
    issuer.revoke(issuer.seed(tmp_store))
    auth = oac.BearerAuth(fake_server.url, store=tmp_store)

    def blocking(*args, **kwargs):
        raise AssertionError("the sync authenticate() was called inside the event loop")

    monkeypatch.setattr(oac, "authenticate", blocking)
    (result,) = with_httpx_async(auth, [("GET", fake_server.url + API, None, 0)])
    assert result.status == 200
    assert issuer.refreshes == 1


# -- the object -------------------------------------------------------------------------------


def test_repr_and_pickle_hold_no_token(fake_server, issuer):
    token = issuer.seed(oac.TokenStore(app_name="my-project"))
    auth = oac.BearerAuth(fake_server.url + "/", app_name="my-project", timeout=60)
    assert requests.get(fake_server.url + API, auth=auth, timeout=10).status_code == 200
    assert repr(auth) == f"BearerAuth({fake_server.url!r})"
    data = pickle.dumps(auth)
    assert token["access_token"].encode() not in data
    assert token["refresh_token"].encode() not in data
    copy = pickle.loads(data)
    assert type(copy) is type(auth)
    assert repr(copy) == repr(auth)
    assert requests.get(fake_server.url + API, auth=copy, timeout=10).status_code == 200


@pytest.mark.parametrize("kwargs, words", [
    ({"force": True}, "force"),
    ({"tiemout": 3}, "tiemout"),
])
def test_options_are_those_of_authenticate(kwargs, words):
    with pytest.raises(TypeError, match=words):
        oac.BearerAuth("https://myapp.example.com", **kwargs)


def test_every_option_of_authenticate_is_accepted():
    options = {name: value for name, value in oac.authenticate.__kwdefaults__.items()
               if name != "force"}
    oac.BearerAuth("https://myapp.example.com", **options)


def test_a_bad_host_fails_at_construction():
    with pytest.raises(oac.AuthError, match="http"):
        oac.BearerAuth("myapp.example.com")


def test_the_cached_path_loads_no_heavy_module(fake_server, issuer, tmp_store):
    token = issuer.seed(tmp_store)
    found = json.loads(run_child("""
        import json, sys
        import py_oidc_auth_client as oac

        class Request:  # shaped like requests' PreparedRequest and httpx's Request
            def __init__(self):
                self.headers, self.hooks = {}, []
            def register_hook(self, event, hook):
                self.hooks.append(hook)
            def read(self):
                pass

        auth = oac.BearerAuth(sys.argv[1], store=oac.TokenStore(sys.argv[2]))
        called, flowed = auth(Request()), next(auth.sync_auth_flow(Request()))
        heavy = ("asyncio", "urllib.request", "http.server", "webbrowser", "ssl")
        print(json.dumps({"loaded": [m for m in heavy if m in sys.modules],
                          "headers": [called.headers, flowed.headers],
                          "hooks": len(called.hooks)}))
    """, fake_server.url, tmp_store.path))
    assert found == {"loaded": [], "headers": [token["headers"]] * 2, "hooks": 1}
    assert fake_server.requests == []


def test_made_before_httpx_was_imported_it_still_adds_the_header(fake_server, issuer, tmp_store):
    token = issuer.seed(tmp_store)
    issuer.refuse_all = True
    found = json.loads(run_child("""
        import json, sys
        import py_oidc_auth_client as oac

        auth = oac.BearerAuth(sys.argv[1], store=oac.TokenStore(sys.argv[2]))
        import httpx  # too late to become an httpx.Auth: httpx wraps it as a function

        with httpx.Client(auth=auth) as client:
            status = client.get(sys.argv[1] + "/api/data").status_code
        print(json.dumps({"status": status}))
    """, fake_server.url, tmp_store.path))
    assert found == {"status": 401}
    assert [number for number, _, _ in issuer.seen] == [issuer.number(token)]
    assert issuer.refreshes == 0
