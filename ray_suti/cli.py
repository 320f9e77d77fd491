"""``ray-suti``: one command whose subcommands mirror the jobs in ``jobs/``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import add_dataclass_args, from_args


def _world(args: argparse.Namespace) -> int:
    from .world.crawl import WorldConfig, generate_world

    cfg = from_args(WorldConfig, args)
    stats = generate_world(cfg)
    print(json.dumps(stats, indent=2, sort_keys=True))
    print(f"web pairs: {cfg.out}/web   ground truth: {cfg.out}/truth   preview: {cfg.out}/preview.png")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .world.crawl import WorldConfig, generate_world

    out = os.path.join(args.out, "world")
    if os.path.exists(os.path.join(out, "world.json")):
        print(f"[demo] world: reusing {out}")
    else:
        generate_world(WorldConfig(out=out, pages=args.pages, seed=args.seed))
    with open(os.path.join(out, "world.json")) as f:
        stats = json.load(f)["stats"]
    print(f"[demo] world: {stats['pages']} pages, {stats['records']} records, "
          f"{stats['page_kinds']} pages by kind, {sum(stats['broken'].values())} broken records")
    print(f"[demo] artefacts under {args.out}: world/web (web pairs), world/truth, world/preview.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .world.crawl import WorldConfig

    parser = argparse.ArgumentParser(prog="ray-suti", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("world", help="stage 0: generate the synthetic web crawl (Ray tasks)")
    add_dataclass_args(p, WorldConfig)
    p.set_defaults(func=_world)

    p = sub.add_parser("demo", help="run the pipeline on the embedded default and print the results")
    p.add_argument("--out", default="runs/demo", help="artefact folder (default: runs/demo)")
    p.add_argument("--pages", type=int, default=200, help="world size in pages")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
