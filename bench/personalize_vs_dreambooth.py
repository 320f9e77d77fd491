"""SuTI vs DreamBooth on the same base model: time to the first image of a new subject, and quality.

    .venv/bin/python bench/personalize_vs_dreambooth.py [--subjects 6 --dreambooth-steps 25 50 100 150]

For each held-out subject (3 photos in ordinary scenes, one new target context): SuTI encodes the
photos and samples; DreamBooth (LoRA, the apprenticeship stage's expert) fine-tunes on the same
photos for each budget in ``--dreambooth-steps`` and samples; all from
`checkpoints/tiny-32.safetensors`, one thread, measured alternately in one run, with each sampler
setting in ``--samplers`` (the same for both methods). Prints seconds per subject, subject /
context PSNR against the world's exact render (text-only too), and the time ratio at the smallest
DreamBooth budget whose subject PSNR reaches SuTI's and at the largest budget. Writes the JSON
and a plot with ``--out``.

The goal (SuTI at least 50x faster) is judged as users meet the two methods: DreamBooth at the
budget the apprenticeship stage runs it with (``ApprenticeConfig.dreambooth_steps``), both methods
on the same sampler, on the fastest sampler that costs SuTI no more than 0.5 dB of subject or
context PSNR against the first (reference) sampler. The ratio at equal subject fidelity is reported
beside it.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

from ray_suti import SuTIPipeline
from ray_suti.apprentice.dreambooth import DreamBoothConfig, dreambooth_subject
from ray_suti.apprentice.job import ApprenticeConfig
from ray_suti.evaluate.synthetic import psnr
from ray_suti.world import Subject, heldout_seeds, render
from ray_suti.world.oracle import draw_case


def to_uint8(image01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image01, 0, 1) * 255).astype(np.uint8)


def fidelity(image01, gt, mask) -> dict:
    out = to_uint8(image01)
    return {"subject_psnr": psnr(out, gt, mask), "context_psnr": psnr(out, gt, ~mask)}


def run_sampler(pipe, cases, scheduler: str, steps: int, budgets: list[int]) -> dict:
    pipe.set_scheduler(scheduler)
    rows: dict = {"suti": [], "text_only": [], **{f"dreambooth_{b}": [] for b in budgets}}
    for i, (photos, captions, word, prompt, gt, mask) in enumerate(cases):
        t0 = time.perf_counter()
        feats = pipe.encode_subject(photos, captions)
        suti = pipe(prompt, feats, num_inference_steps=steps, generator=torch.Generator().manual_seed(i),
                    output_type="np").images[0]
        rows["suti"].append({"seconds": time.perf_counter() - t0, **fidelity(suti, gt, mask)})
        t0 = time.perf_counter()
        text = pipe(prompt, None, num_inference_steps=steps, generator=torch.Generator().manual_seed(i),
                    output_type="np").images[0]
        rows["text_only"].append({"seconds": time.perf_counter() - t0, **fidelity(text, gt, mask)})
        for b in budgets:
            db, seconds = dreambooth_subject(pipe, photos, captions, word, [prompt],
                                             DreamBoothConfig(steps=b, sample_steps=steps), seed=i)
            rows[f"dreambooth_{b}"].append({"seconds": seconds["total_s"], **fidelity(db[0], gt, mask)})
        print(f"[{scheduler} {steps}] subject {i}: SuTI {rows['suti'][-1]['seconds']:.2f} s, DreamBooth "
              + ", ".join(f"{b} steps {rows[f'dreambooth_{b}'][-1]['seconds']:.1f} s" for b in budgets), flush=True)
    summary = {m: {k: round(float(np.mean([r[k] for r in rs])), 3) for k in rs[0]} for m, rs in rows.items()}
    suti = summary["suti"]
    matching = [b for b in budgets if summary[f"dreambooth_{b}"]["subject_psnr"] >= suti["subject_psnr"]]
    summary["ratio_at_largest_budget"] = round(summary[f"dreambooth_{budgets[-1]}"]["seconds"] / suti["seconds"], 1)
    summary["dreambooth_steps_to_match_suti"] = matching[0] if matching else None
    summary["ratio_at_matching_budget"] = (round(summary[f"dreambooth_{matching[0]}"]["seconds"] / suti["seconds"], 1)
                                           if matching else None)
    return summary


def judge(results: dict, reference: str, default_budget: int, tolerance_db: float = 0.5) -> dict:
    """The fastest sampler within ``tolerance_db`` of the reference sampler's SuTI fidelity, and
    DreamBooth's time at its default budget over SuTI's on that sampler."""
    ref = results[reference]["suti"]
    eligible = [s for s, r in results.items()
                if all(ref[k] - r["suti"][k] <= tolerance_db for k in ("subject_psnr", "context_psnr"))]
    best = min(eligible, key=lambda s: results[s]["suti"]["seconds"])
    ratio = round(results[best][f"dreambooth_{default_budget}"]["seconds"] / results[best]["suti"]["seconds"], 1)
    return {"sampler": best, "dreambooth_steps": default_budget, "ratio": ratio, "met": ratio >= 50,
            "suti_psnr_cost_vs_reference_db": {k: round(ref[k] - results[best]["suti"][k], 3)
                                               for k in ("subject_psnr", "context_psnr")},
            "rule": f"fastest sampler within {tolerance_db} dB of {reference} for SuTI; DreamBooth at the "
                    f"apprenticeship default of {default_budget} steps on the same sampler"}


def plot(results: dict, budgets: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in results.items():
        xs = [s[f"dreambooth_{b}"]["seconds"] for b in budgets]
        ys = [s[f"dreambooth_{b}"]["subject_psnr"] for b in budgets]
        ax.plot(xs, ys, "o-", label=f"DreamBooth LoRA ({name})")
        for b, x, y in zip(budgets, xs, ys):
            ax.annotate(f"{b}", (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
        ax.plot([s["suti"]["seconds"]], [s["suti"]["subject_psnr"]], "*", markersize=12, label=f"SuTI ({name})")
        ax.axhline(s["text_only"]["subject_psnr"], linestyle=":", color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("seconds to the first image of a new subject (1 CPU thread)")
    ax.set_ylabel("subject PSNR, dB (dotted: text-only)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--dreambooth-steps", type=int, nargs="+", default=[25, 50, 100, 150])
    parser.add_argument("--samplers", nargs="+", default=["ddim:25", "dpm++:10"], help="scheduler:steps, both methods")
    parser.add_argument("--checkpoint", default="checkpoints/tiny-32.safetensors")
    parser.add_argument("--out", default="", help="folder for personalize-vs-dreambooth.json and .png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = SuTIPipeline.from_pretrained(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    pipe("warm-up", None, num_inference_steps=1)
    cases = []
    for i, seed in enumerate(heldout_seeds(args.subjects)):
        word = Subject.from_seed(seed).class_word
        demos, target = draw_case(np.random.default_rng([7, i]), 3)
        gt, mask = render(seed, target, 32)[:2]
        cases.append(([render(seed, c, 32)[0] for c in demos], [c.prompt(word) for c in demos], word,
                      target.prompt(word), gt, mask))
    default_budget = ApprenticeConfig().dreambooth_steps
    budgets = sorted(set(args.dreambooth_steps) | {default_budget})
    results = {}
    for sampler in args.samplers:
        scheduler, steps = sampler.split(":")
        results[sampler] = run_sampler(pipe, cases, scheduler, int(steps), budgets)
    report = {"samplers": results, "goal": judge(results, args.samplers[0], default_budget), "config": vars(args)}
    print(json.dumps(report, indent=2))
    goal, matching = report["goal"], results[report["goal"]["sampler"]]["ratio_at_matching_budget"]
    print(f"SuTI vs DreamBooth ({default_budget} steps), same sampler {goal['sampler']}: {goal['ratio']}x faster "
          f"(goal 50x: {'met' if goal['met'] else 'not met'}); at equal subject fidelity: "
          + (f"{matching}x" if matching else f"DreamBooth never reached SuTI's subject PSNR (up to {max(budgets)} steps)"))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "personalize-vs-dreambooth.json"), "w") as f:
            json.dump(report, f, indent=2)
        plot(results, budgets, os.path.join(args.out, "personalize-vs-dreambooth.png"))


if __name__ == "__main__":
    main()
