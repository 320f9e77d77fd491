"""Credentials: where keys come from, what happens without them, tenants from keys."""
import json

import pytest
import yaml

from ray_suti.serving.auth import TOKEN_ENV, Credentials, CredentialsError

from ..conftest import REPO

KEY_A, KEY_B = "a" * 16 + "-acme-key", "b" * 16 + "-globex-key"


def test_without_credentials_the_app_refuses_to_build_saying_where_they_come_from(monkeypatch):
    from ray_suti.serving.app import build_app

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(CredentialsError) as e:
        build_app("tiny-32")
    assert TOKEN_ENV in str(e.value) and "api_keys_file" in str(e.value) and "allow_anonymous" in str(e.value)
    build_app("tiny-32", allow_anonymous=True)  # local use says so


@pytest.mark.parametrize("config", ["serve/config.production.yaml", "k8s/rayservice.yaml"])
def test_production_configs_refuse_to_start_without_their_keys_file(monkeypatch, config):
    import importlib
    import sys

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    doc = yaml.safe_load((REPO / config).read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"]) if "spec" in doc else doc
    args = dict(serve_cfg["applications"][0]["args"], checkpoint="tiny-32", store="/tmp/unused-store")
    assert "allow_anonymous" not in args and "token" not in args
    sys.path.insert(0, str(REPO))
    try:
        build = importlib.import_module("serve.app").build
        with pytest.raises(CredentialsError, match=f"cannot read credentials from {args['api_keys_file']}"):
            build(args)
        with pytest.raises(CredentialsError, match="in clear"):
            build({**args, "token": KEY_A})  # a key written into a config is refused
    finally:
        sys.path.remove(str(REPO))


def test_keys_map_to_tenants_and_wrong_keys_to_nobody(tmp_path, monkeypatch):
    keys = tmp_path / "api-keys.json"
    keys.write_text(json.dumps({KEY_A: "acme", KEY_A + "2": "acme", KEY_B: "globex"}))
    creds = Credentials.load(api_keys_file=str(keys))
    assert creds.tenant(f"Bearer {KEY_A}") == creds.tenant(f"bearer {KEY_A}2") == "acme"
    assert creds.tenant(f"Bearer {KEY_B}") == "globex"
    for bad in (None, "", KEY_A, f"Basic {KEY_A}", f"Bearer {KEY_A[:-1]}", "Bearer ", f"Bearer {KEY_A}x"):
        assert creds.tenant(bad) is None, bad
    token = tmp_path / "token"
    token.write_text(KEY_B + "\n")  # a secret mount ends in a newline
    assert Credentials.load(token_file=str(token)).tenant(f"Bearer {KEY_B}") == "default"
    monkeypatch.setenv(TOKEN_ENV, KEY_A)
    assert Credentials.load().tenant(f"Bearer {KEY_A}") == "default"
    assert Credentials.load(allow_anonymous=True).tenant(None) is None  # the environment's key still counts
    monkeypatch.delenv(TOKEN_ENV)
    assert Credentials.load(allow_anonymous=True).tenant(None) == "default"


@pytest.mark.parametrize("content,reason", [("{not json", "not JSON"), ("[]", "map each key"), ('{"k": ""}', "map each key"),
                                            ('{"short": "acme"}', "16 characters")])
def test_a_bad_keys_file_is_refused_with_the_reason(tmp_path, content, reason):
    keys = tmp_path / "api-keys.json"
    keys.write_text(content)
    with pytest.raises(CredentialsError, match=reason):
        Credentials.load(api_keys_file=str(keys))
