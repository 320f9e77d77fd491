"""Ray Serve entry point: ``serve run serve/config.yaml``, or ``serve run serve.app:build
checkpoint=PATH store=DIR`` (an application builder: the config file's ``args``, or key=value pairs).

The application lives in ``ray_suti/serving/app.py``. Nothing is built at import time, so the module
imports from any working directory; relative paths in ``args`` are relative to where Serve runs.
"""
from ray_suti.serving.app import build_app


def build(args: dict):
    return build_app(**args)
