"""``ray-suti evaluate synthetic|dreambench|controls|retrieval``: each suite's flags come from its config dataclass."""
from __future__ import annotations

from ..config import add_dataclass_args, from_args


def _synthetic(args) -> int:
    from .synthetic import SyntheticEvalConfig, markdown, evaluate_synthetic

    print(markdown(evaluate_synthetic(from_args(SyntheticEvalConfig, args))))  # the text of results.md
    return 0


def _dreambench(args) -> int:
    from .dreambench import DreamBenchConfig, markdown, evaluate_dreambench

    cfg = from_args(DreamBenchConfig, args)
    print(markdown(evaluate_dreambench(cfg)))
    print(f"results, contact sheets and quality_vs_seconds.png: {cfg.out}")
    return 0


def _controls(args) -> int:
    from .controls import ControlsEvalConfig, evaluate_controls, markdown

    cfg = from_args(ControlsEvalConfig, args)
    print(markdown(evaluate_controls(cfg)))
    print(f"results and contact_sheet.png: {cfg.out}")
    return 0


def _retrieval(args) -> int:
    from .retrieval import RetrievalEvalConfig, evaluate_retrieval, markdown

    cfg = from_args(RetrievalEvalConfig, args)
    print(markdown(evaluate_retrieval(cfg)))
    print(f"results and contact_sheet.png: {cfg.out}")
    return 0


def add_cli(subparsers) -> None:
    from .controls import ControlsEvalConfig
    from .dreambench import DreamBenchConfig
    from .retrieval import RetrievalEvalConfig
    from .synthetic import SyntheticEvalConfig

    p = subparsers.add_parser("evaluate", help="stage 5: evaluate a checkpoint (Ray tasks)")
    suites = p.add_subparsers(dest="suite", required=True)
    s = suites.add_parser("synthetic", help="held-out synthetic subjects, scored against exact renders")
    add_dataclass_args(s, SyntheticEvalConfig)
    s.set_defaults(func=_synthetic)
    d = suites.add_parser("dreambench", help="DreamBench subjects and prompts: DINO, CLIP-I, CLIP-T, seconds; "
                                             "SuTI vs text-only, DreamBooth and copy-a-demo")
    add_dataclass_args(d, DreamBenchConfig)
    d.set_defaults(func=_dreambench)
    c = suites.add_parser("controls", help="boxes, keypoints, edges and composed skills on held-out synthetic "
                                           "subjects: box IoU, keypoint error, PSNR with vs without, pair success")
    add_dataclass_args(c, ControlsEvalConfig)
    c.set_defaults(func=_controls)
    r = suites.add_parser("retrieval", help="Re-Imagen: held-out catalogue subjects known by a made-up name, drawn "
                                            "from a knowledge base: recall@k, PSNR vs oracle demos and text-only")
    add_dataclass_args(r, RetrievalEvalConfig)
    r.set_defaults(func=_retrieval)
