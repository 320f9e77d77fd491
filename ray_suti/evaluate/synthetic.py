"""Held-out evaluation on the synthetic world, where every prompt has an exact ground truth.

Each held-out subject is one case: the model sees ``num_demos`` photos of it in ordinary scenes and
is asked for a new context (any skill mix). The renderer gives the true picture and subject mask, so
quality is measured directly: PSNR inside the subject mask (was the subject kept?) and outside it
(was the prompt's context drawn?). Three methods share every case and sampling seed:

- ``suti``: the model with the demos and their captions;
- ``text_only``: the same model with the demos dropped, the baseline SuTI has to beat on the subject;
- ``copy_demo``: the first demo returned unchanged, the copy-paste failure ``copied`` must flag.

    ray job submit -- python jobs/evaluate.py synthetic --checkpoint PATH --out DIR
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..world import SKILLS, Context, Subject, heldout_seeds, render
from ..world.contexts import SCENES
from ..world.oracle import draw_case

COPY_MARGIN_DB = 3.0
# Floor on PSNR(output, demo) for a copy: above what noise or a true render of another context gets
# to a demo, far below a near-copy (calibration: docs/stages/5-evaluation.md).
COPY_MIN_DB = 15.0
METHODS = ("suti", "text_only", "copy_demo")
METRICS = ("subject_psnr", "context_psnr", "background_psnr", "copy_rate")  # per method, overall and per skill
@dataclass(frozen=True)
class SyntheticEvalConfig:
    checkpoint: str = field(default="tiny-32", metadata={"help": "checkpoint folder, or a preset name (untrained)"})
    out: str = field(default="runs/eval", metadata={"help": "folder for results.json, results.md, contact_sheet.png"})
    num_subjects: int = field(default=100, metadata={"help": "held-out subjects (heldout_seeds(n)), one case each"})
    seed: int = field(default=0, metadata={"help": "draws the demo and target contexts (not the subjects)"})
    num_demos: int = field(default=3, metadata={"help": "subject photos shown per case"})
    steps: int = field(default=25, metadata={"help": "sampling steps"})
    guidance_text: float = field(default=1.5, metadata={"help": "text guidance scale"})
    guidance_subject: float = field(default=1.5, metadata={"help": "subject guidance scale"})
    scheduler: str = field(default="ddim", metadata={"help": "sampler: ddim, dpm++, euler-a, ... (model/schedulers.py)"})
    guidance_mode: str = field(default="branches", metadata={"help": "branches (three UNet passes a step), "
                                                                       "interleaved (two) or reimagen (two, Re-Imagen's rule)"})
    chunk_size: int = field(default=25, metadata={"help": "subjects per Ray task (each task loads the model once)"})
    sheet_rows: int = field(default=12, metadata={"help": "cases shown in contact_sheet.png"})

    def __post_init__(self):
        # Demo scenes are drawn from the 9 non-studio scenes; the target needs one left over.
        if not 1 <= self.num_demos < len(SCENES):
            raise ValueError(f"num_demos must be in [1, {len(SCENES) - 1}], got {self.num_demos}")
        if self.num_subjects < 1 or self.chunk_size < 1 or self.steps < 1:
            raise ValueError("num_subjects, chunk_size and steps must be positive")
        from ..model.schedulers import GUIDANCE_MODES

        if self.guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance_mode must be one of {', '.join(GUIDANCE_MODES)}, got {self.guidance_mode!r}")


@dataclass(frozen=True)
class Case:
    index: int  # position in the case list; the first ``sheet_rows`` go on the contact sheet
    subject_seed: int
    seed: int  # sampling seed, the same for every method
    demos: tuple  # Contexts of the demo photos
    target: Context
    prompt: str
    captions: tuple  # one per demo


def make_cases(cfg: SyntheticEvalConfig) -> list[Case]:
    """The evaluation cases: contexts only (cheap); images are rendered in the Ray tasks."""
    cases = []
    for index, subject_seed in enumerate(heldout_seeds(cfg.num_subjects)):
        rng = np.random.default_rng([cfg.seed, subject_seed])
        # Demos are ordinary photos; no demo shows the target's scene or context, so returning a
        # demo can never score as success (the copy metric must tell copying from following).
        demo_list, target = draw_case(rng, cfg.num_demos)
        demos = tuple(demo_list)
        word = Subject.from_seed(subject_seed).class_word
        cases.append(Case(index, subject_seed, int(rng.integers(2**31)), demos, target, target.prompt(word),
                          tuple(d.prompt(word) for d in demos)))
    return cases


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB (peak 255) over the pixels in ``mask`` (all if None), all 3 channels. The MSE is
    floored at 1e-10 and the result capped at 100, so identical images give 100, not infinity."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.size == 0:
        return float("nan")  # an empty region has no error to measure; means skip it
    mse = max(float(np.mean((a - b) ** 2)), 1e-10)
    return float(min(100.0, 10 * np.log10(255.0**2 / mse)))


def background_mask(mask: np.ndarray) -> np.ndarray:
    """The scene away from the subject: outside the box around its mask, grown by 1/16 of the image.
    Context PSNR (outside the mask itself) also scores the subject's silhouette: a model that does
    not know the subject's shape (text-only) draws one that spills over the true outline."""
    out = np.ones_like(mask)
    if mask.any():
        ys, xs = np.nonzero(mask)
        r = max(1, mask.shape[0] // 16)
        out[max(0, ys.min() - r): ys.max() + r + 1, max(0, xs.min() - r): xs.max() + r + 1] = False
    return out


def is_copy(output: np.ndarray, demos: list[np.ndarray], gt: np.ndarray) -> bool:
    """Calibrated copy-paste detection: ``output`` copies demo d when PSNR(output, d) exceeds
    PSNR(output, gt) by more than ``COPY_MARGIN_DB`` and is itself at least ``COPY_MIN_DB``.

    The naive rule "closer to a demo than to the ground truth" fires for a blurry output that is
    about equally far from both, which is noise, not copying; a clear margin separates text-only
    sampling (which never sees the demos) from copy-a-demo. The margin alone still fires on noise
    outputs far from everything, where a bright target (a sketch, snow) and a mid-tone demo differ
    by a few dB; the floor says a copy must also be close to the demo in absolute terms. The
    calibration figures: docs/stages/5-evaluation.md.
    """
    to_gt = psnr(output, gt)
    return any(p >= COPY_MIN_DB and p - to_gt > COPY_MARGIN_DB for p in (psnr(output, d) for d in demos))


# ---- Ray task: one chunk of cases, one model load ----------------------------------------------
def _to_uint8(image01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image01, 0, 1) * 255).astype(np.uint8)


def _evaluate_case(pipe, cfg: SyntheticEvalConfig, case: Case) -> dict:
    import torch

    size = pipe.image_size  # demos and ground truth at the model's own resolution
    demos = [render(case.subject_seed, c, size)[0] for c in case.demos]
    gt, mask = render(case.subject_seed, case.target, size)
    sampling = dict(num_inference_steps=cfg.steps, guidance_scale_text=cfg.guidance_text,
                    guidance_scale_subject=cfg.guidance_subject)
    suti_sampling = dict(sampling, guidance_mode=cfg.guidance_mode)
    suti = pipe(case.prompt, demos, list(case.captions), generator=torch.Generator().manual_seed(case.seed),
                output_type="np", **suti_sampling).images[0]
    # Same model, same seed, no demos: what the prompt alone gives.
    text_only = pipe(case.prompt, None, generator=torch.Generator().manual_seed(case.seed), output_type="np",
                     **sampling).images[0]
    outputs = {"suti": _to_uint8(suti), "text_only": _to_uint8(text_only), "copy_demo": demos[0]}
    record = {
        "index": case.index, "subject_seed": case.subject_seed, "prompt": case.prompt, "skills": case.target.skills,
        "metrics": {m: {"subject_psnr": psnr(img, gt, mask), "context_psnr": psnr(img, gt, ~mask),
                        "background_psnr": psnr(img, gt, background_mask(mask)),
                        "copied": is_copy(img, demos, gt)} for m, img in outputs.items()},
    }
    if case.index < cfg.sheet_rows:
        record["images"] = {"demos": demos, "gt": gt, "suti": outputs["suti"], "text_only": outputs["text_only"]}
    return record


def _evaluate_chunk(cfg: SyntheticEvalConfig, cases: list[Case]) -> list[dict]:
    import torch

    from ..model.pipeline import load_pipeline

    torch.set_num_threads(1)  # one core per task; 2 threads stall on these 2-core machines (README)
    pipe = load_pipeline(cfg.checkpoint).set_scheduler(cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return [_evaluate_case(pipe, cfg, case) for case in cases]


# ---- aggregation and reports --------------------------------------------------------------------
def _summary(rows: list[dict]) -> dict:
    if not rows:
        return {**dict.fromkeys(METRICS), "n": 0}
    return {**{k: float(np.nanmean([r[k] for r in rows])) for k in METRICS[:3]},  # nan: empty region
            "copy_rate": float(np.mean([r["copied"] for r in rows])), "n": len(rows)}


def aggregate(records: list[dict]) -> dict:
    """Per method: means over all cases, and per skill of the target ("composition" = 2+ skills)."""
    groups = {skill: [r for r in records if skill in r["skills"]] for skill in SKILLS}
    groups["composition"] = [r for r in records if len(r["skills"]) >= 2]
    return {m: {**_summary([r["metrics"][m] for r in records]),
                "per_skill": {k: _summary([r["metrics"][m] for r in g]) for k, g in groups.items()}}
            for m in METHODS}


def _cells(*summaries: dict) -> str:
    return " | ".join("-" if s[k] is None else f"{s[k]:.2f}" for s in summaries for k in METRICS)


def markdown(results: dict) -> str:
    cfg, methods, diff = results["config"], results["methods"], results["suti_minus_text_only_db"]
    lines = [f"# Synthetic held-out evaluation: `{cfg['checkpoint']}`", "",
             f"{cfg['num_subjects']} held-out subjects, {cfg['num_demos']} demos each, context seed {cfg['seed']}, "
             f"{cfg['steps']} {cfg['scheduler']} steps ({cfg.get('guidance_mode', 'branches')} guidance), guidance text {cfg['guidance_text']} / subject "
             f"{cfg['guidance_subject']}. PSNR in dB against the exact render, inside (subject) and outside "
             f"(context) its mask, and outside the box around the mask grown by 1/16 of the image (background); copy rate: outputs > {COPY_MARGIN_DB} dB closer to a demo than to the truth "
             f"(and >= {COPY_MIN_DB} dB from it).", "",
             "| method | subject PSNR | context PSNR | background PSNR | copy rate | n |", "|---|" + "---:|" * 5]
    lines += [f"| {name} | {_cells(s)} | {s['n']} |" for name, s in methods.items()]
    suti, text = methods["suti"]["per_skill"], methods["text_only"]["per_skill"]
    lines += ["", f"SuTI minus text-only: subject {diff['subject']:+.2f} dB, context {diff['context']:+.2f} dB, "
              f"background {diff['background']:+.2f} dB.", "",
              "## Per skill of the target context (SuTI, then text-only)", "",
              "| skill | n | subject | context | background | copy | subject | context | background | copy |",
              "|---|" + "---:|" * 9]
    lines += [f"| {skill} | {suti[skill]['n']} | {_cells(suti[skill], text[skill])} |" for skill in suti]
    return "\n".join(lines) + "\n"


def _contact_sheet(records: list[dict], num_demos: int):
    from ..utils.images import contact_sheet

    shown = [r for r in records if "images" in r]
    rows = [[*r["images"]["demos"], r["images"]["gt"], r["images"]["suti"], r["images"]["text_only"]] for r in shown]
    header = [f"demo {i + 1}" for i in range(num_demos)] + ["ground truth", "SuTI", "text-only"]
    labels = [r["prompt"] if len(r["prompt"]) <= 24 else r["prompt"][:21] + "..." for r in shown]
    cell = min(max(64, rows[0][0].shape[0]), 128)  # small renders upscaled, large ones kept legible
    return contact_sheet(rows, labels=labels, cell=cell, header=header)


def evaluate_synthetic(cfg: SyntheticEvalConfig) -> dict:
    """Runs every case as Ray tasks of ``chunk_size`` subjects; writes and returns the results."""
    from ..model.loading import resolve_checkpoint
    from ..model.schedulers import check_scheduler
    from ..utils.storage import staged
    from ..utils.ray_utils import run_sharded

    # Fail here, not inside every task.
    check_scheduler(cfg.scheduler)
    cfg = replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint))
    cases = make_cases(cfg)
    chunks = [cases[i:i + cfg.chunk_size] for i in range(0, len(cases), cfg.chunk_size)]
    finished = run_sharded(_evaluate_chunk, [(cfg, chunk) for chunk in chunks], max_in_flight=len(chunks),
                           desc="evaluate synthetic")
    records = [r for part in finished for r in part]

    methods = aggregate(records)
    suti, text = methods["suti"], methods["text_only"]
    results = {"config": asdict(cfg), "methods": methods,
               "suti_minus_text_only_db": {"subject": suti["subject_psnr"] - text["subject_psnr"],
                                           "context": suti["context_psnr"] - text["context_psnr"],
                                           "background": suti["background_psnr"] - text["background_psnr"]}}
    with staged(cfg.out) as out:  # a local folder or a URI (uploaded once written)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(markdown(results))
        if any("images" in r for r in records):
            _contact_sheet(records, cfg.num_demos).save(os.path.join(out, "contact_sheet.png"))
    return results
