"""Peak memory of one training step (forward + backward, demos encoded with gradients) per row,
with vs without gradient checkpointing, side by side in one run. Each measurement runs in its own
process: the model and batch are built, the kernel's peak-RSS mark is reset (/proc/self/clear_refs),
then the step runs; the peak above the resident size before it is the step's memory.

    .venv/bin/python bench/train_memory.py [--preset tiny-64] [--batch 16] [--out docs/results/train-memory.json]
"""
import argparse
import json
import subprocess
import sys


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(preset: str, batch: int, demos: int, checkpointing: bool) -> dict:
    """One step in this process -> {'step_mb', 'loss'}."""
    import time

    import torch

    from ray_suti.model import SuTIModel, get_preset

    torch.set_num_threads(1)
    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = SuTIModel(cfg).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    s, L = cfg.image_size, cfg.max_text_len
    data = dict(target=torch.rand(batch, 3, s, s, generator=g) * 2 - 1,
                prompt_ids=torch.randint(0, 49406, (batch, L), generator=g),
                demo_images=torch.rand(batch, demos, 3, s, s, generator=g) * 2 - 1,
                demo_caption_ids=torch.randint(0, 49406, (batch, demos, L), generator=g),
                demo_valid=torch.ones(batch, demos, dtype=torch.bool))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current size
    before = _kb("VmRSS")
    start = time.perf_counter()
    loss = model.loss(data, model.noise_scheduler(), demo_grad=True, generator=torch.Generator().manual_seed(1))
    loss.backward()
    return {"step_mb": (_kb("VmHWM") - before) / 1024, "seconds": time.perf_counter() - start, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-64")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--demos", type=int, default=3)
    parser.add_argument("--out", default="docs/results/train-memory.json")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.batch, args.demos, args.child == "on")))
        return
    rows = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                              "--demos", str(args.demos), "--child", mode], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"preset": args.preset, "batch": args.batch, "demos": args.demos,
              "step_mb_per_row": {m: r["step_mb"] / args.batch for m, r in rows.items()},
              "seconds": {m: r["seconds"] for m, r in rows.items()}, "loss": {m: r["loss"] for m, r in rows.items()}}
    result["memory_ratio_checkpointed"] = rows["on"]["step_mb"] / rows["off"]["step_mb"]
    result["time_ratio_checkpointed"] = rows["on"]["seconds"] / rows["off"]["seconds"]
    print(f"{args.preset}, batch {args.batch}, {args.demos} demos: step memory per row "
          f"{result['step_mb_per_row']['off']:.1f} MB -> {result['step_mb_per_row']['on']:.1f} MB with checkpointing "
          f"({result['memory_ratio_checkpointed']:.2f}x), step time {result['time_ratio_checkpointed']:.2f}x; "
          f"loss {rows['off']['loss']:.6f} vs {rows['on']['loss']:.6f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
