"""Ray Serve entry point: ``serve run serve/config.yaml``, or ``serve run serve.app:build
checkpoint=PATH store=DIR`` (an application builder: the config file's ``args``, or key=value pairs).

The application lives in ``ray_suti/serving/app.py``. Nothing is built at import time, so the module
imports from any working directory; relative paths in ``args`` are relative to where Serve runs.
A key never goes in a config: ``token`` is refused here (use ``api_keys_file``, ``token_file`` or
``SUTI_API_TOKEN``).
"""
from ray_suti.serving.app import build_app
from ray_suti.serving.auth import CredentialsError


def build(args: dict):
    if "token" in args:
        raise CredentialsError("a key in a Serve config is a key in clear: point api_keys_file or token_file at a "
                               "mounted secret, or set SUTI_API_TOKEN in the replicas' environment")
    return build_app(**args)
