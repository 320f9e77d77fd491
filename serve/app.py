"""Ray Serve entry point: ``serve run serve/config.yaml`` or ``serve run serve.app:app``.

The application lives in ``ray_suti/serving/app.py``; ``build`` takes the config file's ``args``.
"""
from ray_suti.serving.app import build_app


def build(args: dict):
    return build_app(**args)


app = build_app()
