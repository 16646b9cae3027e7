"""The public surface promised by the API reference: names, signatures, defaults, behaviour."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import re
import typing

import pytest

from conftest import REPO, run_child
from tests import oac

MODULE = REPO / "py_oidc_auth_client.py"
EMPTY = inspect.Parameter.empty
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
KW = inspect.Parameter.KEYWORD_ONLY
VAR_KW = inspect.Parameter.VAR_KEYWORD
HOST = "https://myapp.example.com"


def params(func, skip_self: bool = True) -> list[tuple[str, object, object]]:
    """``(name, kind, default)`` of each parameter."""
    found = list(inspect.signature(func).parameters.values())
    if skip_self and found and found[0].name in ("self", "cls"):
        found = found[1:]
    return [(p.name, p.kind, p.default) for p in found]


# -- __all__ -------------------------------------------------------------------------------


def top_level_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names the module binds at top level: (defined here, imported)."""
    defined: set[str] = set()
    imported: set[str] = set()

    def targets(node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                defined.add(sub.id)

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    targets(target)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For)):
                targets(node.target)
                if isinstance(node, ast.For):
                    visit(node.body)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    imported.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    return defined, imported


def test_all_equals_the_public_names_in_the_source():
    defined, imported = top_level_names(ast.parse(MODULE.read_text(encoding="utf-8")))
    public = {name for name in defined - imported if not name.startswith("_")}
    assert public == set(oac.__all__)


def test_all_equals_the_public_names_at_runtime():
    public = {
        name for name, obj in vars(oac).items()
        if not name.startswith("_") and not inspect.ismodule(obj)
        and getattr(obj, "__module__", None) == oac.__name__
    }
    assert public == set(oac.__all__)


def test_all_has_no_duplicates_and_every_name_exists():
    assert len(oac.__all__) == len(set(oac.__all__))
    for name in oac.__all__:
        assert hasattr(oac, name), name


def test_star_import_gives_exactly_all():
    namespace: dict[str, object] = {}
    exec("from py_oidc_auth_client import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(oac.__all__)


def test_the_promised_names_are_public():
    promised = {"AuthError", "BaseFlow", "CodeFlow", "Config", "DeviceCode", "DeviceFlow",
                "Token", "TokenStore", "authenticate", "authenticate_async"}
    assert promised <= set(oac.__all__)


# -- signatures -----------------------------------------------------------------------------

ENTRY_POINT = [
    ("host", POS, EMPTY),
    ("login_route", KW, "/auth/v2/login"),
    ("token_route", KW, "/auth/v2/token"),
    ("device_route", KW, "/auth/v2/device"),
    ("redirect_ports", KW, None),
    ("store", KW, None),
    ("app_name", KW, "py-oidc-auth"),
    ("force", KW, False),
    ("timeout", KW, 30),
]
# Standard providers directly: keyword-only additions, after the documented ones.
PROVIDER_KEYWORDS = [
    ("client_id", KW, None),
    ("client_secret", KW, None),
    ("scopes", KW, None),
]


def extends(found: list[tuple[str, object, object]], documented: list) -> bool:
    """The documented parameters come first, in order; any addition is optional keyword-only."""
    return found[:len(documented)] == documented and all(
        kind == KW and default is not EMPTY for _, kind, default in found[len(documented):])


def test_authenticate_signature():
    assert extends(params(oac.authenticate), ENTRY_POINT)
    assert all(p in params(oac.authenticate) for p in PROVIDER_KEYWORDS)
    assert not inspect.iscoroutinefunction(oac.authenticate)


def test_authenticate_async_signature():
    assert extends(params(oac.authenticate_async), ENTRY_POINT)
    assert params(oac.authenticate_async) == params(oac.authenticate)
    assert inspect.iscoroutinefunction(oac.authenticate_async)


def test_config_fields_and_defaults():
    # Config is written out (no dataclasses import, for start-up time): same contract.
    fields = list(inspect.signature(oac.Config).parameters.values())
    documented = ["host", "redirect_ports", "token_env_var", "app_name", "login_route",
                  "token_route", "device_route"]
    assert [f.name for f in fields][:len(documented)] == documented
    assert fields[0].default is EMPTY
    assert all(f.default is not EMPTY for f in fields[1:])
    assert list(vars(oac.Config(host=HOST))) == [f.name for f in fields]
    config = oac.Config(host=HOST)
    assert config.redirect_ports == [53100, 53101, 53102, 53103, 53104, 53105]
    assert config.token_env_var == "OIDC_TOKEN_FILE"
    assert config.app_name == "py-oidc-auth"
    assert config.login_route == "/auth/v2/login"
    assert config.token_route == "/auth/v2/token"
    assert config.device_route == "/auth/v2/device"
    assert (config.client_id, config.client_secret, config.scopes) == (None, None, None)
    with pytest.raises(TypeError):
        oac.Config()  # type: ignore[call-arg]


def test_config_default_ports_are_not_shared():
    one, two = oac.Config(host=HOST), oac.Config(host=HOST)
    one.redirect_ports.append(1)
    assert two.redirect_ports == [53100, 53101, 53102, 53103, 53104, 53105]
    assert oac.Config(host=HOST).redirect_ports == two.redirect_ports


def test_config_equality_and_repr_hide_the_secret():
    one = oac.Config(HOST, client_id="cli", client_secret="s3cret-value")
    assert one == oac.Config(HOST, client_id="cli", client_secret="s3cret-value")
    assert one != oac.Config(HOST, client_id="cli", client_secret="other")
    assert one != oac.Config(HOST)
    assert "s3cret-value" not in repr(one)
    assert repr(oac.Config(HOST)).startswith(f"Config(host={HOST!r}, redirect_ports=[53100,")
    assert one._replace(host="https://other.example.org").client_secret == "s3cret-value"
    with pytest.raises(TypeError):
        hash(one)


def test_config_positional_order():
    config = oac.Config(HOST, [1, 2], "MY_TOKEN", "app", "/l", "/t", "/d")
    assert (config.redirect_ports, config.token_env_var, config.app_name, config.login_route,
            config.token_route, config.device_route) == ([1, 2], "MY_TOKEN", "app", "/l",
                                                         "/t", "/d")


def test_token_store_signature():
    assert params(oac.TokenStore.__init__) == [("path", POS, None),
                                               ("app_name", POS, "py-oidc-auth")]
    assert params(oac.TokenStore.get) == [("host", POS, EMPTY)]
    assert params(oac.TokenStore.put) == [("host", POS, EMPTY), ("token", POS, EMPTY)]
    assert params(oac.TokenStore.remove) == [("host", POS, EMPTY)]
    assert params(oac.TokenStore.hosts) == []
    assert params(oac.TokenStore.clear) == []


@pytest.mark.parametrize("cls", ["BaseFlow", "DeviceFlow", "CodeFlow"])
def test_flow_constructor_signature(cls):
    flow_class = getattr(oac, cls)
    expected = [("host", POS, ""), ("config", POS, None), ("kwargs", VAR_KW, EMPTY)]
    assert params(flow_class.__init__) == expected
    assert params(flow_class) == expected


def test_flow_class_hierarchy():
    assert issubclass(oac.DeviceFlow, oac.BaseFlow)
    assert issubclass(oac.CodeFlow, oac.BaseFlow)
    assert issubclass(oac.AuthError, Exception)


def test_flow_method_signatures():
    assert params(oac.DeviceFlow.poll) == [("device_code", POS, EMPTY), ("interval", POS, 5)]
    assert params(oac.DeviceFlow.authenticate) == [("force", KW, False), ("auto_open", KW, True)]
    assert params(oac.CodeFlow.authenticate) == [("force", KW, False)]
    assert params(oac.DeviceFlow.get_device_code) == []
    assert params(oac.BaseFlow.refresh) == [("refresh_token", POS, EMPTY)]
    for method in (oac.DeviceFlow.poll, oac.DeviceFlow.authenticate, oac.CodeFlow.authenticate,
                   oac.DeviceFlow.get_device_code, oac.BaseFlow.refresh):
        assert inspect.iscoroutinefunction(method), method


def test_flow_properties_and_classmethod():
    for name in ("session", "token"):
        assert isinstance(inspect.getattr_static(oac.BaseFlow, name), property)
    assert isinstance(inspect.getattr_static(oac.BaseFlow, "reset_instances"), classmethod)
    assert params(oac.BaseFlow.reset_instances) == []


def test_auth_error_signature_and_attributes():
    assert params(oac.AuthError.__init__) == [("message", POS, EMPTY), ("detail", POS, None),
                                              ("status_code", POS, 500)]
    exc = oac.AuthError("went wrong")
    assert (exc.message, exc.detail, exc.status_code) == ("went wrong", {}, 500)
    assert str(exc) == "went wrong"
    detail = {"error": "access_denied", "error_description": "no"}
    exc = oac.AuthError("denied", detail, 403)
    assert (exc.message, exc.detail, exc.status_code) == ("denied", detail, 403)
    exc = oac.AuthError("kw", detail=detail, status_code=401)
    assert exc.status_code == 401
    assert exc.detail == detail


def test_main_signature():
    assert params(oac.main) == [("argv", POS, None)]


# -- typed dicts ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls, keys", [
    ("Token", {"access_token", "token_type", "expires", "refresh_token", "refresh_expires",
               "scope", "headers"}),
    ("DeviceCode", {"uri", "user_code", "device_code", "interval"}),
])
def test_typed_dicts(cls, keys):
    typed = getattr(oac, cls)
    assert issubclass(typed, dict)
    assert type(typed).__name__ == "_TypedDictMeta"
    is_typeddict = getattr(typing, "is_typeddict", None)  # Python 3.10+
    if is_typeddict is not None:
        assert is_typeddict(typed)
    assert set(typed.__annotations__) == keys
    assert typed.__total__ is True
    assert set(typed.__required_keys__) == keys


def test_typed_dict_annotations():
    assert typing.get_type_hints(oac.Token) == {
        "access_token": str, "token_type": str, "expires": int, "refresh_token": str,
        "refresh_expires": int, "scope": str, "headers": dict[str, str]}
    assert typing.get_type_hints(oac.DeviceCode) == {
        "uri": str, "user_code": str, "device_code": str, "interval": int}


# -- import paths --------------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("statement, names", [
    ("from py_oidc_auth_client.flows import DeviceFlow, CodeFlow, BaseFlow",
     ["DeviceFlow", "CodeFlow", "BaseFlow"]),
    ("from py_oidc_auth_client.exceptions import AuthError", ["AuthError"]),
    ("from py_oidc_auth_client.utils import Config", ["Config"]),
    ("from py_oidc_auth_client.token_store import TokenStore", ["TokenStore"]),
    ("from py_oidc_auth_client.schema import Token, DeviceCode", ["Token", "DeviceCode"]),
    ("from py_oidc_auth_client import authenticate, authenticate_async",
     ["authenticate", "authenticate_async"]),
])
def test_documented_import_paths_in_a_fresh_process(statement, names):
    checks = "\n".join(f"assert {n} is py_oidc_auth_client.{n}, {n!r}" for n in names)
    out = run_child(f"{statement}\nimport py_oidc_auth_client\n{checks}\nprint('ok')")
    assert out.strip() == "ok"


@pytest.mark.timeout(20)
def test_submodule_aliases_as_modules():
    out = run_child("""
        import importlib
        import py_oidc_auth_client.flows
        from py_oidc_auth_client import token_store, schema
        main = importlib.import_module("py_oidc_auth_client")
        for name in ("exceptions", "flows", "utils", "token_store", "schema"):
            assert importlib.import_module("py_oidc_auth_client." + name).TokenStore \\
                is main.TokenStore, name
        assert token_store.TokenStore is main.TokenStore
        assert schema.Token is main.Token
        try:
            main.nonexistent
        except AttributeError:
            print("ok")
    """)
    assert out.strip() == "ok"


# -- per host singletons ------------------------------------------------------------------


def test_same_host_same_instance():
    assert oac.DeviceFlow(HOST) is oac.DeviceFlow(HOST)
    assert oac.CodeFlow(HOST) is oac.CodeFlow(HOST)
    assert oac.DeviceFlow("HTTPS://MyApp.Example.com:443/") is oac.DeviceFlow(HOST)
    assert oac.DeviceFlow(config=oac.Config(host=HOST)) is oac.DeviceFlow(HOST)


def test_flow_kinds_and_hosts_differ():
    assert oac.DeviceFlow(HOST) is not oac.CodeFlow(HOST)
    assert oac.DeviceFlow(HOST) is not oac.DeviceFlow("https://other.example.com")
    assert oac.DeviceFlow(HOST) is not oac.DeviceFlow(HOST + "/app")
    assert oac.DeviceFlow(HOST).host == HOST


def test_reset_instances_clears():
    device, code = oac.DeviceFlow(HOST), oac.CodeFlow(HOST)
    oac.DeviceFlow.reset_instances()
    assert oac.DeviceFlow(HOST) is not device
    assert oac.CodeFlow(HOST) is not code
    again = oac.DeviceFlow(HOST)
    oac.BaseFlow.reset_instances()
    assert oac.DeviceFlow(HOST) is not again


def test_later_construction_with_another_store_is_honoured(tmp_path):
    one, two = oac.TokenStore(tmp_path / "1.json"), oac.TokenStore(tmp_path / "2.json")
    flow = oac.DeviceFlow(HOST, store=one)
    assert flow.store is one
    assert oac.DeviceFlow(HOST, store=two) is flow
    assert flow.store is two


def test_later_construction_with_another_timeout_is_honoured():
    flow = oac.DeviceFlow(HOST, timeout=5)
    assert flow.timeout == 5
    assert flow.session.timeout == 5
    assert oac.DeviceFlow(HOST, timeout=7) is flow
    assert flow.timeout == 7
    assert flow.session.timeout == 7
    oac.DeviceFlow(HOST, timeout=None)
    assert flow.timeout is None
    assert flow.session.timeout == oac._HTTP_TIMEOUT


def test_default_timeout_is_30():
    assert oac.DeviceFlow(HOST).timeout == 30
    assert oac.CodeFlow(HOST).timeout == 30


def test_keyword_arguments_set_the_config():
    flow = oac.DeviceFlow(HOST, login_route="/l", token_route="/t", device_route="/d",
                          redirect_ports=(5000, 5001), app_name="proj",
                          token_env_var="MY_TOKEN")
    assert (flow.config.login_route, flow.config.token_route, flow.config.device_route) == (
        "/l", "/t", "/d")
    assert flow.config.redirect_ports == [5000, 5001]
    assert flow.config.app_name == "proj"
    assert flow.config.token_env_var == "MY_TOKEN"


def test_config_object_wins_over_host_and_routes():
    config = oac.Config(host="https://other.example.com", token_route="/cfg")
    flow = oac.DeviceFlow(HOST, config=config, token_route="/ignored")
    assert flow.host == "https://other.example.com"
    assert flow.config.token_route == "/cfg"


def test_flows_of_a_host_share_the_token(make_token):
    token = make_token()
    oac.DeviceFlow(HOST).store.put(HOST, token)
    assert oac.CodeFlow(HOST).token == token
    assert oac.DeviceFlow("https://other.example.com").token is None


def test_interactive_option_is_kept():
    assert oac.DeviceFlow(HOST).interactive is None
    assert oac.DeviceFlow(HOST, interactive=False).interactive is False


def test_construction_touches_no_file_and_no_network(isolated_env, fake_server):
    flow = oac.DeviceFlow(fake_server.url)
    assert flow.token is None
    oac.CodeFlow(fake_server.url)
    assert list(isolated_env.rglob("*")) == []
    assert fake_server.requests == []


def test_session_is_the_modules_own_stdlib_session():
    doc = inspect.getdoc(inspect.getattr_static(oac.BaseFlow, "session")) or ""
    assert "own" in doc
    assert "urllib" in doc or "standard library" in doc or "stdlib" in doc
    assert "not httpx" in doc
    flow = oac.DeviceFlow(HOST)
    assert type(flow.session).__module__ == oac.__name__
    assert flow.session is flow.session


@pytest.mark.timeout(20)
def test_session_needs_no_third_party_package():
    out = run_child("""
        import sys
        import py_oidc_auth_client as oac
        flow = oac.DeviceFlow("https://myapp.example.com")
        flow.session
        print(sorted(m for m in ("httpx", "requests", "aiohttp", "platformdirs")
                     if m in sys.modules))
    """)
    assert out.strip() == "[]"


# -- argument checking ----------------------------------------------------------------------


@pytest.mark.parametrize("host, words", [
    ("", "No host given"),
    ("   ", "No host given"),
    ("ftp://x", "http(s)"),
    ("not a url", "http(s)"),
    ("https://", "http(s)"),
    ("myapp.example.com", "http(s)"),
    ("https://user:s3cr3t-pw@h.example.com", "credentials"),
    ("https://token-xyz@h.example.com", "credentials"),
    ("https://h.example.com/?q=1", "query"),
    ("https://h.example.com/#f", "fragment"),
    ("https://h.example.com?", "query"),
    ("https://h.example.com:99999", "not a valid URL"),
    ("https://h.example.com:port", "not a valid URL"),
])
@pytest.mark.parametrize("make", [
    oac.DeviceFlow,
    oac.CodeFlow,
    lambda host: oac.DeviceFlow(config=oac.Config(host=host)),
    oac.authenticate,
    lambda host: asyncio.run(oac.authenticate_async(host)),
])
def test_invalid_hosts_raise_a_clear_auth_error(host, words, make):
    with pytest.raises(oac.AuthError) as info:
        make(host)
    message = info.value.message
    assert words in message
    assert info.value.status_code == 400
    for secret in ("s3cr3t-pw", "token-xyz"):
        assert secret not in message
        assert secret not in repr(info.value)


@pytest.mark.parametrize("timeout", ["10", 0, -1, -0.5, True, False, [5]])
def test_bad_timeout_raises_value_error(timeout):
    with pytest.raises(ValueError, match="timeout"):
        oac.DeviceFlow(HOST, timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        oac.CodeFlow(HOST, timeout=timeout)


def test_bad_timeout_in_authenticate_raises_before_any_request(fake_server):
    with pytest.raises(ValueError, match="timeout"):
        oac.authenticate(fake_server.url, timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        asyncio.run(oac.authenticate_async(fake_server.url, timeout=-3))
    assert fake_server.requests == []


@pytest.mark.parametrize("ports", [[], (), [70000], [-1], ["53100"], [True], [53100.0]])
def test_bad_redirect_ports_raise_value_error(ports, fake_server):
    with pytest.raises(ValueError, match="redirect_ports"):
        oac.CodeFlow(HOST, redirect_ports=ports)
    with pytest.raises(ValueError, match="redirect_ports"):
        oac.DeviceFlow(config=oac.Config(host=HOST, redirect_ports=list(ports)))
    with pytest.raises(ValueError, match="redirect_ports"):
        oac.authenticate(fake_server.url, redirect_ports=list(ports))
    assert fake_server.requests == []


def test_good_timeouts_and_ports_are_accepted():
    assert oac.DeviceFlow(HOST, timeout=0.5).timeout == 0.5
    assert oac.DeviceFlow(HOST, timeout=None).timeout is None
    assert oac.CodeFlow(HOST, redirect_ports=[0]).config.redirect_ports == [0]


def test_unknown_keyword_raises_type_error():
    with pytest.raises(TypeError, match="tiemout"):
        oac.DeviceFlow(HOST, tiemout=5)
    with pytest.raises(TypeError, match="tiemout"):
        oac.CodeFlow(HOST, tiemout=5)
    with pytest.raises(TypeError):
        oac.authenticate(HOST, tiemout=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        oac.Config(host=HOST, tiemout=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        oac.TokenStore(path=None, app="x")  # type: ignore[call-arg]


@pytest.mark.parametrize("bad", [{"redirect_ports": []}, {"timeout": 0}])
def test_failed_construction_leaves_the_instance_alone(bad):
    flow = oac.CodeFlow(HOST, login_route="/good", timeout=10)
    with pytest.raises(ValueError):
        oac.CodeFlow(HOST, login_route="/bad", **bad)
    assert flow.config.login_route == "/good"
    assert flow.config.redirect_ports == [53100, 53101, 53102, 53103, 53104, 53105]
    assert flow.timeout == 10


# -- no secrets in reprs ---------------------------------------------------------------------


def test_reprs_hold_no_secret(tmp_store, make_token):
    token = make_token(refresh="refresh-SECRET-77")
    flow = oac.DeviceFlow(HOST, store=tmp_store)
    flow.store.put(HOST, token)
    assert flow.token == token
    code = oac.CodeFlow(HOST, store=tmp_store)
    for text in (repr(flow), str(flow), repr(code), repr(tmp_store), repr(flow.config)):
        assert token["access_token"] not in text
        assert "refresh-SECRET-77" not in text
    assert repr(flow) == f"DeviceFlow({HOST!r})"
    assert repr(code) == f"CodeFlow({HOST!r})"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("status, body", [
    (400, {"error": "invalid_grant", "error_description": "Token is not active"}),
    (401, {"detail": "Not authenticated"}),
    (500, "<html>oops</html>"),
    (200, {"no_access_token": True}),
])
def test_refresh_errors_hold_no_secret(tmp_store, fake_server, status, body):
    fake_server.reply("POST", "/auth/v2/token", status, body)
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store, timeout=2)
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(flow.refresh("refresh-SECRET-99"))
    assert fake_server.hits("/auth/v2/token")[0].form["refresh-token"] == "refresh-SECRET-99"
    exc = info.value
    for text in (str(exc), repr(exc), exc.message, json.dumps(exc.detail)):
        assert "refresh-SECRET-99" not in text


# -- version ------------------------------------------------------------------------------


def test_version_is_a_pep440_string():
    assert isinstance(oac.__version__, str)
    assert re.fullmatch(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", oac.__version__)


def test_version_is_written_once_and_read_by_flit():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    dynamic = re.search(r"^dynamic\s*=\s*\[(.*?)\]", project, re.M)
    assert dynamic is not None
    assert '"version"' in dynamic.group(1)
    assert not re.search(r"^version\s*=", project, re.M)
    assert re.search(r'^\[tool\.flit\.module\]\s*\nname\s*=\s*"py_oidc_auth_client"', pyproject,
                     re.M)
    # flit_core reads a literal top-level __version__ assignment without importing.
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    versions = [node.value.value for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)]
    assert versions == [oac.__version__]
    assert ast.get_docstring(tree), "flit takes the description from the module docstring"


def test_version_matches_flit_core_when_available():
    common = pytest.importorskip("flit_core.common")
    info = common.get_info_from_module(common.Module("py_oidc_auth_client", REPO),
                                       ["version", "description"])
    assert info["version"] == oac.__version__


def test_version_matches_the_installed_metadata():
    from importlib import metadata

    try:
        dist = metadata.distribution("oidc-auth-onefile")
    except metadata.PackageNotFoundError:
        pytest.skip("not installed")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if not direct.get("url", "").rstrip("/").endswith(str(REPO)):
        pytest.skip("installed from elsewhere")
    assert dist.version == oac.__version__
