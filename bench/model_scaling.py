"""The ceiling for serving's 2-vs-1-replica goal: the bare pipeline in one process vs two at once.

    .venv/bin/python bench/model_scaling.py [--seconds 25 --batch 8 --steps 25]

Each process draws batches of ``--batch`` images (one subject's features, ``--steps`` DDIM steps) on
one torch thread for ``--seconds``; prints images/s of one process alone, of two side by side, and
their ratio (what two Serve replicas could reach on this machine with nothing else running).
"""
import argparse
import json
import subprocess
import sys
import time


def draw(checkpoint: str, seconds: float, batch: int, steps: int) -> float:
    import torch
    from PIL import Image

    from ray_suti.model.layers import DemoFeatures
    from ray_suti.model.pipeline import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    demos = DemoFeatures.cat([pipe.encode_subject([Image.new("RGB", (32, 32), "gray")] * 3)] * batch)
    pipe(["warm-up"] * batch, demos, num_inference_steps=2, output_type="np")
    t0, n = time.time(), 0
    while time.time() - t0 < seconds:
        pipe(["a photo on the beach"] * batch, demos, num_inference_steps=steps, output_type="np")
        n += batch
    return n / (time.time() - t0)


def run(n_processes: int, args) -> float:
    cmd = [sys.executable, __file__, "--worker", "--checkpoint", args.checkpoint, "--seconds", str(args.seconds),
           "--batch", str(args.batch), "--steps", str(args.steps)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n_processes)]
    return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="checkpoints/tiny-32.safetensors")
    parser.add_argument("--seconds", type=float, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(draw(args.checkpoint, args.seconds, args.batch, args.steps))
        return
    one, two = run(1, args), run(2, args)
    print(json.dumps({"config": vars(args) | {"worker": None}, "one_process_images_s": round(one, 3),
                      "two_processes_images_s": round(two, 3), "two_vs_one": round(two / one, 3)}, indent=1))


if __name__ == "__main__":
    main()
