"""Per-image sampling time of SuTI (3 demos) vs plain text-to-image sampling of the same UNet.

Rows, all 25 DDIM steps through ``SuTIPipeline.__call__``:
  plain         no demos, text guidance (two UNet passes a step: what Stable Diffusion costs)
  equal         SuTI, equal text and subject scales (two passes)
  branches      SuTI, separate scales (3.0 / 2.0), three passes a step
  interleaved   SuTI, separate scales, interleaved guidance (two passes a step, three the first)
  reimagen      SuTI, separate scales, Re-Imagen's literal rule (two passes a step)
  cached        interleaved with the subject's demo features computed beforehand (how Serve draws a
                registered subject: its features are cached per replica)
SuTI's times but the last row's include encoding the demos once. The rows run in turn, repeatedly, and the median of
each is reported with its ratio to plain (goal: interleaved <= 1.15x).

    .venv/bin/python bench/sampling_overhead.py [--presets tiny-32 tiny-64] [--repeats 5] [--out docs/results/sampling-overhead.json]
"""
import argparse
import json
import statistics
import time

import torch

from ray_suti import SuTIPipeline
from ray_suti.world import Context, render

GOAL_INTERLEAVED = 1.15


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny-32", "tiny-64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default="docs/results/sampling-overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"steps": args.steps, "repeats": args.repeats, "goal_interleaved_vs_plain": GOAL_INTERLEAVED, "presets": {}}
    print(f"{'preset':8} {'plain s/img':>11} " + " ".join(f"{m:>18}" for m in ("equal", "branches", "interleaved", "reimagen", "cached")))
    for name in args.presets:
        pipe = SuTIPipeline.from_preset(name)
        pipe.set_progress_bar_config(disable=True)
        demos = [render(7, Context(scene=s), 64)[0] for s in ("beach", "snow", "grass")]
        prompt, common = "a toy on the beach", dict(num_inference_steps=args.steps, output_type="latent")
        features = pipe.encode_subject(demos)
        runs = {
            "plain": lambda: pipe(prompt, None, guidance_scale_text=3.0, **common),
            "equal": lambda: pipe(prompt, demos, guidance_scale_text=3.0, guidance_scale_subject=3.0, **common),
            "branches": lambda: pipe(prompt, demos, guidance_scale_text=3.0, guidance_scale_subject=2.0, **common),
            "interleaved": lambda: pipe(prompt, demos, guidance_scale_text=3.0, guidance_scale_subject=2.0,
                                        guidance_mode="interleaved", **common),
            "reimagen": lambda: pipe(prompt, demos, guidance_scale_text=3.0, guidance_scale_subject=2.0,
                                     guidance_mode="reimagen", **common),
            "cached": lambda: pipe(prompt, features, guidance_scale_text=3.0, guidance_scale_subject=2.0,
                                   guidance_mode="interleaved", **common),
        }
        times = {k: [] for k in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for k, fn in runs.items():  # in turn, so drift hits every row alike
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
        median = {k: statistics.median(v) for k, v in times.items()}
        ratios = {k: median[k] / median["plain"] for k in runs if k != "plain"}
        results["presets"][name] = {"seconds_per_image": median, "ratio_to_plain": ratios,
                                    "interleaved_meets_goal": ratios["interleaved"] <= GOAL_INTERLEAVED}
        print(f"{name:8} {median['plain']:11.3f} " + " ".join(f"{median[k]:10.3f} ({ratios[k]:4.2f}x)" for k in ratios))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
