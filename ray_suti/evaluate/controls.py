"""Held-out evaluation of spatial controls and composed skills, against the world's exact renders.

Each held-out subject is one case: demos in ordinary scenes, a target placed off the grid (so the
prompt alone cannot say exactly where), and the target's controls from its ground truth
(``world.controls``). The same model, demos, prompt and noise are sampled once per control subset
(none, box, keypoints, edges, all), and each output is scored:

- subject / context PSNR against the render (controls must not cost fidelity: within 1 dB);
- box IoU: the output's foreground (pixels unlike the empty scene) against the requested box; the
  ground truth's own IoU is the ceiling (subjects are not rectangles; accessories stick out);
- keypoint error: the view (4 rotations x mirror) whose render best matches the output, and the
  mean distance of its landmarks from the requested keypoints, as a fraction of the image side;
- composition success, per pair of skills of the target: the output is closer to the full
  target than to the target with either skill undone (it did both).

    ray job submit -- python jobs/evaluate.py controls --checkpoint PATH --out DIR
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..world import Subject, heldout_seeds, render
from ..world.controls import box_iou, controls_of, foreground, keypoint_error, without_skill
from ..world.oracle import draw_case
from .synthetic import _to_uint8, psnr

SUBSETS = {"none": (), "box": ("box",), "keypoints": ("keypoints",), "edges": ("edges",),
           "all": ("box", "keypoints", "edges")}


@dataclass(frozen=True)
class ControlsEvalConfig:
    checkpoint: str = field(default="checkpoints/tiny-32.safetensors", metadata={"help": "a checkpoint trained with controls"})
    out: str = field(default="runs/eval-controls", metadata={"help": "folder or URI for results.json, results.md, contact_sheet.png"})
    num_subjects: int = field(default=60, metadata={"help": "held-out subjects, one case each"})
    seed: int = field(default=0, metadata={"help": "draws the contexts (not the subjects)"})
    num_demos: int = field(default=3, metadata={"help": "subject photos shown per case"})
    target_jitter: float = field(default=0.08, metadata={"help": "off-grid placement of targets"})
    skill_prob: float = field(default=0.5, metadata={"help": "probability of each skill in a target (compositions)"})
    steps: int = field(default=25, metadata={"help": "sampling steps"})
    subsets: tuple[str, ...] = field(default=tuple(SUBSETS), metadata={"help": "control subsets to run"})
    chunk_size: int = field(default=20, metadata={"help": "subjects per Ray task"})
    sheet_rows: int = field(default=8, metadata={"help": "cases on contact_sheet.png"})

    def __post_init__(self):
        if unknown := set(self.subsets) - set(SUBSETS):
            raise ValueError(f"unknown control subsets {sorted(unknown)}; choose from {list(SUBSETS)}")
        if self.num_subjects < 1 or self.chunk_size < 1 or self.steps < 1:
            raise ValueError("num_subjects, chunk_size and steps must be positive")


def make_cases(cfg: ControlsEvalConfig) -> list[dict]:
    from ..world.contexts import SKILLS, sample_context

    cases = []
    for index, seed in enumerate(heldout_seeds(cfg.num_subjects)):
        rng = np.random.default_rng([cfg.seed, 0xC7, seed])
        demos, _ = draw_case(rng, cfg.num_demos)
        scenes = {d.scene for d in demos}
        target = None
        while target is None or target.scene in scenes:  # as draw_case: the target's scene is new
            target = sample_context(rng, {s: cfg.skill_prob for s in SKILLS} | {"recontext": 1.0},
                                    jitter=cfg.target_jitter)
        word = Subject.from_seed(seed).class_word
        cases.append({"index": index, "subject_seed": seed, "seed": int(rng.integers(2**31)), "demos": demos,
                      "target": target, "prompt": target.prompt(word), "captions": [d.prompt(word) for d in demos]})
    return cases


def score(image: np.ndarray, case: dict, gt: np.ndarray, mask: np.ndarray, controls: dict) -> dict:
    seed, target = case["subject_seed"], case["target"]
    out = {"subject_psnr": psnr(image, gt, mask), "context_psnr": psnr(image, gt, ~mask),
           "box_iou": box_iou(foreground(image, target), controls["box"]),
           "keypoint_error": keypoint_error(image, seed, target, controls["keypoints"]), "pairs": {}}
    for a, b in itertools.combinations(target.skills, 2):
        full = psnr(image, gt)
        undone = [psnr(image, render(seed, without_skill(target, s), image.shape[0])[0]) for s in (a, b)]
        out["pairs"][f"{a}+{b}"] = bool(full > max(undone))
    return out


def _evaluate_chunk(cfg: ControlsEvalConfig, cases: list[dict]) -> list[dict]:
    import torch

    from ..model.pipeline import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline(cfg.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    size, records = pipe.image_size, []
    for case in cases:
        demos = [render(case["subject_seed"], c, size)[0] for c in case["demos"]]
        gt, mask = render(case["subject_seed"], case["target"], size)
        controls = controls_of(case["subject_seed"], case["target"], size, mask)
        ceiling = score(gt, case, gt, mask, controls)
        record = {"index": case["index"], "prompt": case["prompt"], "skills": case["target"].skills,
                  "ground_truth": {k: ceiling[k] for k in ("box_iou", "keypoint_error")}, "runs": {}}
        images = {}
        for name in cfg.subsets:
            given = {c: controls[c] for c in SUBSETS[name]}
            out = pipe(case["prompt"], demos, case["captions"], num_inference_steps=cfg.steps, output_type="np",
                       generator=torch.Generator().manual_seed(case["seed"]), **given).images[0]
            images[name] = _to_uint8(out)
            record["runs"][name] = score(images[name], case, gt, mask, controls)
        if case["index"] < cfg.sheet_rows:
            record["images"] = {"demos": demos, "gt": gt, "requested": controls, **images}
        records.append(record)
    return records


def aggregate(records: list[dict], subsets: tuple) -> dict:
    out = {}
    for name in subsets:
        runs = [r["runs"][name] for r in records]
        pairs: dict = {}
        for run in runs:
            for pair, ok in run["pairs"].items():
                pairs.setdefault(pair, []).append(ok)
        out[name] = {**{k: float(np.nanmean([r[k] for r in runs]))
                        for k in ("subject_psnr", "context_psnr", "box_iou", "keypoint_error")},
                     "composition_success": {p: {"rate": float(np.mean(v)), "n": len(v)} for p, v in sorted(pairs.items())},
                     "n": len(runs)}
    out["ground_truth"] = {k: float(np.mean([r["ground_truth"][k] for r in records])) for k in ("box_iou", "keypoint_error")}
    return out


def markdown(results: dict) -> str:
    m, subsets = results["metrics"], [s for s in SUBSETS if s in results["metrics"]]
    lines = [f"# Controls and compositions: `{results['config']['checkpoint']}`", "",
             f"{results['config']['num_subjects']} held-out subjects; targets off the grid (jitter "
             f"{results['config']['target_jitter']}). Box IoU of a perfect image: {m['ground_truth']['box_iou']:.3f}.", "",
             "| controls | subject PSNR | context PSNR | box IoU | keypoint error |", "|---|---|---|---|---|"]
    for s in subsets:
        r = m[s]
        lines.append(f"| {s} | {r['subject_psnr']:.2f} | {r['context_psnr']:.2f} | {r['box_iou']:.3f} | "
                     f"{r['keypoint_error']:.3f} |")
    pairs = sorted({p for s in subsets for p in m[s]["composition_success"]})
    lines += ["", "Composition success (output closer to the full target than to either skill undone):", "",
              "| pair | n | " + " | ".join(subsets) + " |", "|---|---|" + "---|" * len(subsets)]
    for p in pairs:
        n = m[subsets[0]]["composition_success"].get(p, {}).get("n", 0)
        cells = [f"{m[s]['composition_success'][p]['rate']:.2f}" if p in m[s]["composition_success"] else "-"
                 for s in subsets]
        lines.append(f"| {p} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _contact_sheet(records: list[dict], subsets: tuple):
    from PIL import Image, ImageDraw

    rows = [r for r in records if "images" in r]
    tile, pad = 64, 2
    cols = ["gt", "requested", *subsets]
    sheet = Image.new("RGB", ((tile + pad) * len(cols), 14 + (tile + pad) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, c in enumerate(cols):
        draw.text((j * (tile + pad) + 2, 1), c, fill="black")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            req = r["images"]["requested"]
            img = r["images"][c] if c != "requested" else np.repeat((req["edges"] * 255).astype(np.uint8)[..., None], 3, -1)
            tile_img = Image.fromarray(img).resize((tile, tile), Image.NEAREST)
            d = ImageDraw.Draw(tile_img)
            if c != "gt":  # the requested box and keypoints (top green, side blue) over the outputs
                x0, y0, x1, y1 = (float(v) * tile for v in req["box"])
                d.rectangle((x0, y0, x1, y1), outline=(255, 0, 0))
                for (x, y), colour in zip(req["keypoints"], ((0, 255, 0), (0, 128, 255))):
                    d.ellipse((x * tile - 2, y * tile - 2, x * tile + 2, y * tile + 2), fill=colour)
            sheet.paste(tile_img, (j * (tile + pad), 14 + i * (tile + pad)))
    return sheet


def evaluate_controls(cfg: ControlsEvalConfig) -> dict:
    """Runs the cases as Ray tasks of ``chunk_size`` subjects; writes and returns the results."""
    from ..model.loading import controls_of, resolve_checkpoint
    from ..utils.ray_utils import run_sharded
    from ..utils.storage import staged

    cfg = replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint))
    missing = {c for s in cfg.subsets for c in SUBSETS[s]} - set(controls_of(cfg.checkpoint))
    if missing:  # fail here, not in every task
        raise ValueError(f"{cfg.checkpoint} was not trained with controls {sorted(missing)} "
                         "(train with --controls, or pass --subsets none)")
    cases = make_cases(cfg)
    chunks = [cases[i:i + cfg.chunk_size] for i in range(0, len(cases), cfg.chunk_size)]
    records = [r for part in run_sharded(_evaluate_chunk, [(cfg, c) for c in chunks], max_in_flight=len(chunks),
                                         desc="evaluate controls") for r in part]
    results = {"config": asdict(cfg), "metrics": aggregate(records, cfg.subsets),
               "per_case": [{k: v for k, v in r.items() if k != "images"} for r in records]}
    if "none" in cfg.subsets:
        results["psnr_cost_of_controls_db"] = {s: results["metrics"]["none"]["subject_psnr"] - results["metrics"][s]["subject_psnr"]
                                               for s in cfg.subsets if s != "none"}
    with staged(cfg.out) as out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(markdown(results))
        if any("images" in r for r in records):
            _contact_sheet(records, cfg.subsets).save(os.path.join(out, "contact_sheet.png"))
    return results
