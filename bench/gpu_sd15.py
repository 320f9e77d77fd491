"""GPU figures for docs/scaling.md: the `sd15` preset with random weights (nothing to download), one
process, no Ray, DeepSpeed or open_clip. Sections, each written to the JSON as soon as it is done (an
error or OOM is recorded as {"error": ...} and the rest still run; peak memory is reset per section):

  train[_checkpointing]          examples/s and torch.cuda.max_memory_allocated of full training steps
                                 (SuTIModel.loss: VAE + text encoder + UNet every step), as the
                                 one-process runner (ray_suti.train.local) trains: fp32 weights,
                                 AdamW, bf16 autocast, grad clipping, fp32 EMA; text encoder and VAE
                                 frozen; 2 noise levels per example, demo features detached
  train_cached_inputs[_...]      the same step on precomputed VAE latents and text states (the
                                 batch keys `ray-suti train --latents` feeds SuTIModel.loss)
  demo_encoding                  one subject's K demos -> DemoFeatures (VAE + text encoder + UNet down path)
  sampling                       one 512 px image, 25 DDIM steps, latents out: plain SD (SuTI layers
                                 detached), SuTI on cached demo features (equal scales), interleaved
                                 and three-branch guidance; ratios to plain SD (goal <= 1.10x)
  sampling_batch8                8 images per call, VAE decode included: images/s

They replace docs/scaling.md's [assumption] rows: §2 utilisation (train model_tflop_per_s against the
card's peak), §4 per-GPU examples/s and memory (B = 8), §6 serve seconds per subject and per image.

Prompts enter as text-encoder states (no tokenizer); sampling times exclude prompt encoding for
every row alike. GPU figures are absolute times on the card named in the JSON (compare only runs on
the same card); the CPU run is a smoke test, its numbers mean nothing. On the lent GPU, one call of
under 8 minutes (the machine has torch only: diffusers, transformers and their small dependencies
travel as wheels in .whl/, as for checkpoints/lent_gpu.sh):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_sd15.py     # -> $OUT/gpu_sd15.json

CPU smoke test (tests/bench/test_gpu_sd15.py):
    .venv/bin/python bench/gpu_sd15.py --preset tiny-latent --steps 2 --sample-steps 2 --device cpu --out /tmp/x.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ray_suti.model.layers import SuTILayers  # noqa: E402
from ray_suti.model.pipeline import SuTIPipeline  # noqa: E402
from ray_suti.model.presets import get_preset  # noqa: E402
from ray_suti.model.schedulers import make_scheduler  # noqa: E402
from ray_suti.model.suti import SuTIModel  # noqa: E402

GOAL_RATIO = 1.10
# docs/scaling.md §4, counted on the meta device: TFLOP per sd15 example (3 demos, 2 noise levels,
# demo features detached), full inputs vs cached latents; recomputation under checkpointing not counted
COUNTED_TFLOP = {False: 10.6, True: 6.2}
CACHED_NOTE = "cached inputs (SuTIModel.loss on stored latents and text states: VAE and text encoder not run)"


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="bf16 on cuda, fp32 on cpu by default")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--demos", type=int, default=3)
    p.add_argument("--noise-repeats", type=int, default=2, help="as TrainConfig's default")
    p.add_argument("--demo-grad", action="store_true", help="backpropagate through the demo encoding")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps / calls before each measurement")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3, help="timed sampling calls per row (median)")
    p.add_argument("--time-budget-s", type=float, default=420.0, help="start no section after this")
    default_out = os.path.join(os.environ["OUT"], "gpu_sd15.json") if os.environ.get("OUT") else "runs/gpu_sd15.json"
    p.add_argument("--out", default=default_out)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


class Bench:
    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        self.result = {"script": "bench/gpu_sd15.py", "command": " ".join(sys.argv), "preset": args.preset,
                       "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
                       "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": args.dtype,
                       "batch_size": args.batch_size, "demos": args.demos, "noise_repeats": args.noise_repeats,
                       "demo_grad": args.demo_grad, "sample_steps": args.sample_steps, "sections": {}}

    # ---- plumbing ------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", file=sys.stderr, flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_gib(self):
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def timed(self, fn, repeats: int) -> list[float]:
        for _ in range(self.args.warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return times

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.result["imported"] = {m: m in sys.modules for m in ("ray", "deepspeed", "open_clip")}
        self.result["sections"] = self.result.pop("sections")  # last in the file
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps(self.result, indent=2))

    def section(self, name: str, fn, summary) -> None:
        if time.perf_counter() - self.start > self.args.time_budget_s:
            self.result["sections"][name] = {"skipped": f"time budget {self.args.time_budget_s:.0f} s spent"}
            self.log(f"{name}: skipped (time budget)")
        else:
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                out = fn()
                out["peak_memory_gib"] = self.peak_gib()
                self.result["sections"][name] = out
                peak = "" if out["peak_memory_gib"] is None else f", peak {out['peak_memory_gib']:.2f} GiB"
                self.log(f"{name}: {summary(out)}{peak}")
            except Exception as e:  # OOM or anything else: record it, go on with the next section
                self.result["sections"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                self.log(f"{name}: ERROR {type(e).__name__}: {str(e)[:300]}")
        self.save()

    # ---- the model and its inputs ----------------------------------------------------------------
    def build(self) -> None:
        t = time.perf_counter()
        self.cfg = get_preset(self.args.preset)
        torch.manual_seed(0)
        with torch.device(self.device):  # random weights made on the device: no 1.1B-parameter CPU init
            self.model = SuTIModel(self.cfg)
        self.model.text_encoder.requires_grad_(False)  # as trainable_groups does for latent presets
        m = self.model
        count = lambda mod: sum(p.numel() for p in mod.parameters()) if mod is not None else 0  # noqa: E731
        self.result["parameters"] = {"unet": count(m.unet), "suti_layers": count(m.suti),
                                     "text_encoder": count(m.text_encoder), "vae": count(m.vae),
                                     "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad)}
        self.result["build_s"] = round(time.perf_counter() - t, 1)
        self.log(f"built {self.args.preset} on {self.result['device']} in {self.result['build_s']} s: "
                 f"{self.result['parameters']}")
        self.save()

    def batch(self, b: int) -> dict:
        g = torch.Generator().manual_seed(0)
        s, L, k = self.cfg.image_size, self.cfg.max_text_len, self.args.demos
        data = dict(target=torch.rand(b, 3, s, s, generator=g) * 2 - 1,
                    prompt_ids=torch.randint(0, 49406, (b, L), generator=g),
                    demo_images=torch.rand(b, k, 3, s, s, generator=g) * 2 - 1,
                    demo_caption_ids=torch.randint(0, 49406, (b, k, L), generator=g),
                    demo_valid=torch.ones(b, k, dtype=torch.bool))
        return {key: v.to(self.device) for key, v in data.items()}

    @property
    def autocast_on(self) -> bool:
        return self.dtype == torch.bfloat16

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_on)

    # ---- training ------------------------------------------------------------------------------
    def train(self, checkpointing: bool, cached: bool) -> dict:
        m, args = self.model.train(), self.args
        if checkpointing:
            m.enable_gradient_checkpointing()
        else:
            m.unet.disable_gradient_checkpointing()
            te = m.text_encoder  # transformers 5 renamed it; the text encoder is frozen either way
            getattr(te, "activation_checkpointing_disable", te.gradient_checkpointing_disable)()
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not n.startswith("suti.")], "lr": 1e-5},
                  {"params": [p for n, p in named if n.startswith("suti.")], "lr": 1e-4}]
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        ema = {n: p.detach().float().clone() for n, p in named}  # the runner's fp32 EMA, on the device
        scheduler, batch = m.noise_scheduler(), self.batch(args.batch_size)
        if cached:  # what `ray-suti encode` stores, computed once outside the timed region
            b, k = batch["demo_images"].shape[:2]
            with torch.no_grad(), self.autocast():
                batch = dict(target_latents=m.to_model_space(batch["target"]),
                             prompt_states=m.encode_text(batch["prompt_ids"]),
                             demo_latents=m.to_model_space(batch["demo_images"].flatten(0, 1)).unflatten(0, (b, k)),
                             demo_caption_states=m.encode_text(batch["demo_caption_ids"].flatten(0, 1)).unflatten(0, (b, k)),
                             demo_valid=batch["demo_valid"])
        losses = []

        def step():
            with self.autocast():
                loss = m.loss(batch, scheduler, demo_grad=args.demo_grad, noise_repeats=args.noise_repeats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step()
            with torch.no_grad():
                for n, p in named:
                    ema[n].mul_(0.999).add_(p.detach().float(), alpha=0.001)
            losses.append(loss.detach())

        try:
            for _ in range(args.warmup):
                step()
            self.sync()
            if self.cuda:  # steady state: weights, grads and Adam states resident, one-off transients gone
                torch.cuda.reset_peak_memory_stats(self.device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            self.sync()
            seconds = time.perf_counter() - t
        finally:
            opt.zero_grad(set_to_none=True)
            del opt, ema
        out = {"examples_per_s": args.batch_size * args.steps / seconds, "step_s": seconds / args.steps,
               "loss": float(torch.stack(losses).float().mean()), "gradient_checkpointing": checkpointing,
               "inputs": CACHED_NOTE if cached else "full (VAE + text encoder run in every step)",
               "precision": "fp32 weights + AdamW + fp32 EMA, " + ("bf16 autocast" if self.autocast_on else "fp32"),
               "peak_memory": "max_memory_allocated over the timed steps: weights, grads, AdamW, EMA, activations"}
        if (args.preset, args.demos, args.noise_repeats, args.demo_grad) == ("sd15", 3, 2, False):
            out["model_tflop_per_s"] = out["examples_per_s"] * COUNTED_TFLOP[cached]  # scaling.md §2 utilisation
        return out

    # ---- sampling ------------------------------------------------------------------------------
    def pipeline(self) -> None:
        """The trained-in-place model, cast to the sampling dtype, as a pipeline (no tokenizer)."""
        m = self.model.eval().to(self.dtype)
        m.unet.disable_gradient_checkpointing()
        self.pipe = SuTIPipeline(unet=m.unet, text_encoder=m.text_encoder, tokenizer=None, suti=m.suti, vae=m.vae,
                                 scheduler=make_scheduler("ddim", self.cfg))
        self.pipe.set_progress_bar_config(disable=True)
        one = self.batch(1)
        with torch.no_grad():
            self.text = m.encode_text(one["prompt_ids"]).to(self.dtype)
            self.null = m.encode_text(m.null_prompt_ids(1, self.device)).to(self.dtype)
        self.demo_args = (one["demo_images"].to(self.dtype), one["demo_caption_ids"], one["demo_valid"])

    def demo_encoding(self) -> dict:
        self.pipeline()
        if self.cuda:  # not the fp32 -> bf16 cast's transient
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        times = self.timed(lambda: self.pipe.encode_demos(*self.demo_args), self.args.repeats)
        self.feats = self.pipe.encode_demos(*self.demo_args)
        return {"seconds_per_subject": statistics.median(times), "demos_per_subject": self.args.demos,
                "includes": "VAE encode + text encoder (captions) + UNet down path; tokenisation excluded"}

    def sample(self, rows: dict, b: int, output_type: str, repeats: int) -> dict:
        """rows: name -> pipeline kwargs (None subject = plain SD with the SuTI layers detached)."""
        seconds = {}
        for name, kw in rows.items():
            plain = kw.get("subject_images") is None
            if plain:
                SuTILayers.detach(self.pipe.unet)
            try:
                call = lambda: self.pipe(prompt_embeds=self.text.repeat(b, 1, 1),  # noqa: E731
                                         negative_prompt_embeds=self.null.repeat(b, 1, 1),
                                         num_inference_steps=self.args.sample_steps, output_type=output_type, **kw)
                seconds[name] = statistics.median(self.timed(call, repeats))
            finally:
                if plain:
                    self.pipe.suti.attach(self.pipe.unet)
        return seconds

    def sampling(self) -> dict:
        f, s = self.feats, dict(guidance_scale_text=3.0, guidance_scale_subject=2.0)
        sec = self.sample({"plain_sd": dict(subject_images=None, guidance_scale_text=3.0),
                           "suti_cached": dict(subject_images=f, guidance_scale_text=3.0, guidance_scale_subject=3.0),
                           "suti_interleaved": dict(subject_images=f, guidance_mode="interleaved", **s),
                           "suti_branches": dict(subject_images=f, guidance_mode="branches", **s)},
                          1, "latent", self.args.repeats)
        ratio = {k: v / sec["plain_sd"] for k, v in sec.items() if k != "plain_sd"}
        return {"seconds_per_image": sec, "ratio_to_plain_sd": ratio, "goal_ratio": GOAL_RATIO,
                "suti_cached_meets_goal": ratio["suti_cached"] <= GOAL_RATIO,
                "note": "batch 1, latents out (no VAE decode); suti_* reuse one subject's cached DemoFeatures; "
                        "plain_sd = same UNet with SuTI layers detached; scales text 3.0 (suti_cached: subject 3.0, "
                        "2 UNet passes a step), interleaved/branches: subject 2.0 (2 / 3 passes)"}

    def sampling_batch8(self) -> dict:
        f = self.feats
        sec = self.sample({"plain_sd": dict(subject_images=None, guidance_scale_text=3.0),
                           "suti_cached": dict(subject_images=f, guidance_scale_text=3.0, guidance_scale_subject=3.0),
                           "suti_interleaved": dict(subject_images=f, guidance_mode="interleaved",
                                                    guidance_scale_text=3.0, guidance_scale_subject=2.0)},
                          8, "pt", max(1, self.args.repeats - 1))
        return {"images_per_s": {k: 8 / v for k, v in sec.items()}, "seconds_per_call": sec,
                "note": "8 images per call, VAE decode included, cached demo features of one subject"}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    bench = Bench(args)
    bench.build()
    train_line = lambda o: f"{o['examples_per_s']:.2f} examples/s, {o['step_s']:.3f} s/step"  # noqa: E731
    for ckpt in (False, True):
        for cached in (False, True):
            name = "train" + ("_cached_inputs" if cached else "") + ("_checkpointing" if ckpt else "")
            bench.section(name, lambda: bench.train(ckpt, cached), train_line)
    bench.section("demo_encoding", bench.demo_encoding,
                  lambda o: f"{o['seconds_per_subject'] * 1000:.1f} ms per subject ({args.demos} demos)")
    bench.section("sampling", bench.sampling, lambda o: "s/image " + ", ".join(
        f"{k} {v:.3f}" for k, v in o["seconds_per_image"].items()) + "; ratio " + ", ".join(
        f"{k} {v:.3f}x" for k, v in o["ratio_to_plain_sd"].items()))
    bench.section("sampling_batch8", bench.sampling_batch8, lambda o: "images/s " + ", ".join(
        f"{k} {v:.2f}" for k, v in o["images_per_s"].items()))
    bench.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
