"""Tests for py_oidc_auth_client; the module is imported here, once."""

import py_oidc_auth_client as oac

__all__ = ["oac"]
