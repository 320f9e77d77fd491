"""Size of the SuTI adapter file (the SuTI layers alone: neighbour attention + control encoders) vs
the whole model, per preset or checkpoint file. Small models are written to disk and measured;
``sd15`` is counted on the meta device (no weights allocated), in fp16 bytes.

    .venv/bin/python bench/adapter_size.py [--presets tiny-32 checkpoints/tiny-32.safetensors sd15]
"""
import argparse
import json
import os
import tempfile

import torch

MB = 1024 * 1024


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def adapter_sizes(presets: list[str]) -> dict:
    from ray_suti.model.loading import model_from_preset
    from ray_suti.model.pipeline import SuTIPipeline
    from ray_suti.model.presets import get_preset
    from ray_suti.model.suti import SuTIModel

    out = {}
    for name in presets:
        if name == "sd15":  # 1 B parameters: count them without allocating any
            with torch.device("meta"):
                model = SuTIModel(get_preset(name))
            row = {"measured": "counted on the meta device"}
        else:
            model = SuTIPipeline.from_pretrained(name).model if name.endswith(".safetensors") else model_from_preset(name)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "suti.safetensors")
                SuTIPipeline.from_model(model).save_suti_adapter(path)
                row = {"measured": "file on disk", "adapter_file_mb": os.path.getsize(path) / MB}
        suti, total = _count(model.suti), _count(model)
        row.update(adapter_params=suti, neighbour_params=_count(model.suti.neighbours),
                   control_params=_count(model.suti.control_encoders), full_params=total,
                   adapter_mb_fp16=suti * 2 / MB, full_mb_fp16=total * 2 / MB, adapter_share=suti / total)
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny-32", "checkpoints/tiny-32.safetensors", "sd15"])
    parser.add_argument("--out", default="docs/results/adapter-size.json")
    args = parser.parse_args()
    sizes = adapter_sizes(args.presets)
    for name, r in sizes.items():
        print(f"{name:32} adapter {r['adapter_params'] / 1e6:7.2f} M params = {r['adapter_mb_fp16']:8.1f} MB fp16 "
              f"({100 * r['adapter_share']:.1f}% of {r['full_mb_fp16']:.0f} MB)"
              + (f", file {r['adapter_file_mb']:.2f} MB" if "adapter_file_mb" in r else ""))
    with open(args.out, "w") as f:
        json.dump(sizes, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
