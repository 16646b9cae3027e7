"""Tests for py_oidc_auth_client; the module is imported here, once."""

import importlib
import os
from types import ModuleType

import py_oidc_auth_client as oac

__all__ = ["extra", "oac"]


def extra(name: str) -> ModuleType:
    """Import a test-only package (requests, httpx, trustme), or skip the module without it.

    The unit-test runs on other Pythons install only pytest and skip; the main run
    of scripts/test sets OIDC_REQUIRE_EXTRAS=1, where a missing package is an error.
    """
    if os.environ.get("OIDC_REQUIRE_EXTRAS") == "1":
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"{name} is needed by the tests (OIDC_REQUIRE_EXTRAS=1): "
                              "pip install -e '.[test]'") from exc
    import pytest

    return pytest.importorskip(name)
