"""Interleaved guidance (and Re-Imagen's literal rule) vs three branches on held-out synthetic
subjects: subject and context PSNR of the same checkpoint, cases and seeds, at separate text and
subject scales (goal: interleaved within 0.3 dB of three-branch). Each run is ``ray-suti evaluate
synthetic``.

    .venv/bin/python bench/guidance_modes.py [--checkpoint checkpoints/tiny-32.safetensors] [--num-subjects 100]
"""
import argparse
import json
import os

from ray_suti.evaluate.synthetic import SyntheticEvalConfig, evaluate_synthetic
from ray_suti.utils.ray_utils import init_ray

GOAL_DB = 0.3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="checkpoints/tiny-32.safetensors")
    parser.add_argument("--num-subjects", type=int, default=100)
    parser.add_argument("--scales", type=float, nargs=2, action="append", metavar=("TEXT", "SUBJECT"),
                        help="text and subject guidance scales (repeatable; default 1.5 3.0 and 3.0 1.5)")
    parser.add_argument("--out", default="docs/results/guidance-modes.json")
    args = parser.parse_args()
    init_ray(num_cpus=2)
    rows = []
    for text, subject in args.scales or [(1.5, 3.0), (3.0, 1.5)]:
        row = {"guidance_text": text, "guidance_subject": subject}
        for mode in ("branches", "interleaved", "reimagen"):
            cfg = SyntheticEvalConfig(checkpoint=args.checkpoint, num_subjects=args.num_subjects, guidance_text=text,
                                      guidance_subject=subject, guidance_mode=mode, sheet_rows=0,
                                      out=os.path.join("runs", f"guidance-{mode}-{text}-{subject}"))
            suti = evaluate_synthetic(cfg)["methods"]["suti"]
            row[mode] = {k: suti[k] for k in ("subject_psnr", "context_psnr", "background_psnr", "copy_rate")}
        for mode in ("interleaved", "reimagen"):
            d = {k: row[mode][f"{k}_psnr"] - row["branches"][f"{k}_psnr"] for k in ("subject", "context")}
            row[f"{mode}_minus_branches_db"] = d
            row[f"{mode}_within_goal"] = all(abs(v) <= GOAL_DB for v in d.values())
            print(f"text {text} subject {subject}, {mode}: subject {row['branches']['subject_psnr']:.2f} -> "
                  f"{row[mode]['subject_psnr']:.2f} dB ({d['subject']:+.2f}), context "
                  f"{row['branches']['context_psnr']:.2f} -> {row[mode]['context_psnr']:.2f} dB ({d['context']:+.2f})")
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"checkpoint": args.checkpoint, "num_subjects": args.num_subjects, "goal_db": GOAL_DB, "rows": rows},
                  f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
