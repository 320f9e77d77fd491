"""SuTI vs DreamBooth on the same base model: time to the first image of a new subject, and quality.

    .venv/bin/python bench/personalize_vs_dreambooth.py [--subjects 6 --dreambooth-steps 150]

For each held-out subject (3 photos in ordinary scenes, one new target context): SuTI encodes the
photos and samples; DreamBooth (LoRA, the apprenticeship stage's expert) fine-tunes on the same
photos and samples; both from `checkpoints/tiny-32.safetensors`, 25 DDIM steps, one thread,
measured alternately in one run. Prints seconds per subject for each, their ratio (goal: SuTI at
least 50x faster), and subject / context PSNR against the world's exact render (text-only too).
"""
import argparse
import json
import time

import numpy as np
import torch

from ray_suti import SuTIPipeline
from ray_suti.apprentice.dreambooth import DreamBoothConfig, dreambooth_subject
from ray_suti.evaluate.synthetic import psnr
from ray_suti.world import Subject, heldout_seeds, render
from ray_suti.world.oracle import draw_case


def to_uint8(image01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image01, 0, 1) * 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--dreambooth-steps", type=int, default=150)
    parser.add_argument("--checkpoint", default="checkpoints/tiny-32.safetensors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = SuTIPipeline.from_pretrained(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    rows = {m: [] for m in ("suti", "dreambooth", "text_only")}
    for i, seed in enumerate(heldout_seeds(args.subjects)):
        word = Subject.from_seed(seed).class_word
        demos, target = draw_case(np.random.default_rng([7, i]), 3)
        photos, captions = [render(seed, c, 32)[0] for c in demos], [c.prompt(word) for c in demos]
        gt, mask = render(seed, target, 32)[:2]
        prompt = target.prompt(word)

        t0 = time.perf_counter()
        feats = pipe.encode_subject(photos, captions)
        suti = pipe(prompt, feats, generator=torch.Generator().manual_seed(i), output_type="np").images[0]
        suti_s = time.perf_counter() - t0
        db, seconds = dreambooth_subject(pipe, photos, captions, word, [prompt],
                                         DreamBoothConfig(steps=args.dreambooth_steps), seed=i)
        text = pipe(prompt, None, generator=torch.Generator().manual_seed(i), output_type="np").images[0]
        for method, image, s in (("suti", suti, suti_s), ("dreambooth", db[0], seconds["total_s"]),
                                 ("text_only", text, None)):
            out = to_uint8(image)
            rows[method].append({"seconds": s, "subject_psnr": psnr(out, gt, mask), "context_psnr": psnr(out, gt, ~mask)})
        print(f"subject {i}: SuTI {suti_s:.2f} s, DreamBooth {seconds['total_s']:.1f} s", flush=True)

    def mean(method, key):
        return round(float(np.mean([r[key] for r in rows[method]])), 3)

    result = {m: {k: mean(m, k) for k in ("seconds", "subject_psnr", "context_psnr") if rows[m][0][k] is not None}
              for m in rows}
    result["dreambooth_over_suti_seconds"] = round(mean("dreambooth", "seconds") / mean("suti", "seconds"), 1)
    result["config"] = vars(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
