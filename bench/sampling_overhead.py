"""Per-image sampling time with 3 demos vs plain text-to-image sampling of the same UNet.

Both use 25 DDIM steps and two guidance branches (SuTI with equal text and subject scales; plain
sampling with text guidance). SuTI's time includes encoding the demos once. A three-branch SuTI
row (separate scales) is printed too. Runs alternate and the median of each is reported.

    .venv/bin/python bench/sampling_overhead.py [--presets tiny-32 tiny-64] [--repeats 5]
"""
import argparse
import statistics
import time

import torch

from ray_suti import SuTIPipeline
from ray_suti.world import Context, render


def time_per_image(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny-32", "tiny-64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'preset':8} {'plain s/img':>11} {'SuTI 2-branch':>13} {'ratio':>6} {'SuTI 3-branch':>13} {'ratio':>6}")
    for name in args.presets:
        pipe = SuTIPipeline.from_preset(name)
        pipe.set_progress_bar_config(disable=True)
        demos = [render(7, Context(scene=s), 64)[0] for s in ("beach", "snow", "grass")]
        prompt = "a toy on the beach"

        def plain():
            text = pipe.encode_prompt([prompt])
            pipe.denoise(text, None, num_inference_steps=args.steps, guidance_scale_text=3.0,
                         guidance_scale_subject=3.0, generator=torch.Generator().manual_seed(0))

        def suti(subject_scale):
            return lambda: pipe(prompt, demos, num_inference_steps=args.steps, guidance_scale_text=3.0,
                                guidance_scale_subject=subject_scale, generator=torch.Generator().manual_seed(0))

        t_plain = time_per_image(plain, args.repeats)
        t_two = time_per_image(suti(3.0), args.repeats)
        t_three = time_per_image(suti(2.0), args.repeats)
        print(f"{name:8} {t_plain:11.3f} {t_two:13.3f} {t_two / t_plain:6.2f} {t_three:13.3f} {t_three / t_plain:6.2f}")


if __name__ == "__main__":
    main()
