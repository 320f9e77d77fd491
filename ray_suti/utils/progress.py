"""Progress of the driver's long loops: a tqdm bar on stderr, or whatever a console listens with.

Library code asks ``progress.bar(total, desc, unit)`` instead of building tqdm itself, so a
command that owns the terminal (``ray-suti demo``, utils.console) can draw its own one-line stages
from the same counts while every other output goes to a log file.
"""
from __future__ import annotations

_listeners: list = []  # the innermost console stage hears bars; empty: tqdm on stderr


def bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False):
    """An object with ``update(n)``, ``close()`` and a settable ``total`` (a context manager too)."""
    if _listeners:
        return _listeners[-1](total, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable)


def listen(factory) -> None:
    """Route bars to ``factory(total, desc, unit)`` until ``unlisten``."""
    _listeners.append(factory)


def unlisten(factory) -> None:
    _listeners.remove(factory)
