"""Who is calling: bearer keys mapped to tenants.

Credentials never sit in a Serve config. They come from, in this order:

- ``api_keys_file``: JSON ``{"<key>": "<tenant>", ...}`` (several keys may share a tenant), e.g. a
  Kubernetes secret mounted as a file;
- ``token_file``: one key in a file, tenant ``default``;
- the ``SUTI_API_TOKEN`` environment variable: one key, tenant ``default``.

With none of them the app refuses to build, unless ``allow_anonymous`` is set (local use on
127.0.0.1: every caller is tenant ``default``). A key is found by comparing the SHA-256 of the given
one with every known key's in constant time, so the time taken says nothing about how close a guess
was.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os

TOKEN_ENV = "SUTI_API_TOKEN"
DEFAULT_TENANT = "default"


class CredentialsError(ValueError):
    """The app cannot start: no credentials, or a keys file it cannot use."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Credentials:
    def __init__(self, keys: dict[str, str]):
        self.anonymous = not keys
        self._digests = [(_digest(k), tenant) for k, tenant in keys.items()]

    @classmethod
    def load(cls, api_keys_file: str | None = None, token_file: str | None = None,
             allow_anonymous: bool = False, token: str | None = None) -> "Credentials":
        """``token`` is for Python callers (tests, ``ray-suti serve``), never a config file."""
        if api_keys_file:
            keys = _read_keys(api_keys_file)
        elif token_file:
            keys = {_read(token_file).strip(): DEFAULT_TENANT}
        elif token or os.environ.get(TOKEN_ENV):
            keys = {token or os.environ[TOKEN_ENV]: DEFAULT_TENANT}
        elif allow_anonymous:
            keys = {}
        else:
            raise CredentialsError(
                f"the API needs credentials: set {TOKEN_ENV} in the replicas' environment, or point api_keys_file "
                "(JSON {\"key\": \"tenant\"}) or token_file at a mounted secret; for local use on 127.0.0.1 only, "
                "allow_anonymous: true")
        if any(not k or len(k) < 16 for k in keys):
            raise CredentialsError("every API key must be at least 16 characters")
        return cls(keys)

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of an ``Authorization: Bearer <key>`` header, or None when it is missing or wrong."""
        if self.anonymous:
            return DEFAULT_TENANT
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        digest, found = _digest(given.strip()), None
        for known, tenant in self._digests:  # every key compared: no early exit
            if hmac.compare_digest(digest, known):
                found = tenant
        return found


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise CredentialsError(f"cannot read credentials from {path}: {e.strerror}") from None


def _read_keys(path: str) -> dict[str, str]:
    try:
        keys = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise CredentialsError(f"{path} is not JSON ({e.msg}): it maps keys to tenants, {{\"key\": \"tenant\"}}") from None
    if not isinstance(keys, dict) or not keys or not all(isinstance(k, str) and isinstance(t, str) and t
                                                           for k, t in keys.items()):
        raise CredentialsError(f"{path} must map each key to a tenant name: {{\"key\": \"tenant\"}}")
    return keys
