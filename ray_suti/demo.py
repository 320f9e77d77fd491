"""The main job: every stage on the embedded default, on one local Ray, as a newcomer's first command.

    world -> build_dataset -> pretrain -> apprentice -> train -> evaluate -> serve

Each stage is the same library call its `ray-suti <stage>` command makes, on small sizes: the
committed tiny CLIP filters the crawl (``train-clip`` is skipped: it would cost an hour here), the
base model is a short pretraining run from the committed checkpoint, DreamBooth experts on it write
ICL-V2 targets for a few clusters, the committed SuTI checkpoint is fine-tuned on them with Ray
Train + DeepSpeed (a from-scratch SuTI needs GPU-hours: checkpoints/README.md), the result is
evaluated on held-out synthetic subjects (and, when present, DreamBench photos), and the
Serve app answers one real HTTP request with held-out demos. A stage whose output exists is reused,
so a rerun after a crash starts where it stopped; ``demo.json`` records the settings and timings.

    ray-suti demo                    # default preset: under 20 minutes on 2 cores
    ray-suti demo --preset smoke     # every stage, tiny sizes: under 5 minutes
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

from .utils.console import Console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_MODEL = os.path.join(REPO, "checkpoints", "tiny-32.safetensors")
COMMITTED_CLIP = os.path.join(REPO, "checkpoints", "tiny-clip.safetensors")
DREAMBENCH_SAMPLE = os.path.join(os.path.dirname(REPO), "shared", "data", "dreambench-sample")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    pages: int = 200  # world size
    seed: int = 0
    base_checkpoint: str = COMMITTED_MODEL  # start weights of pretraining and training
    clip: str = COMMITTED_CLIP
    pretrain_steps: int = 20
    apprentice_clusters: int = 6
    dreambooth_steps: int = 150
    # The apprenticeship's CLIP-I filter. Drawings for the demo's crawl clusters score lower than for
    # oracle clusters (median 0.35, top 0.54 vs 27% >= 0.6; docs/NOTES.md): 0.45 keeps about the best
    # fifth. Smoke keeps every 10-step expert's drawing.
    clip_i_threshold: float = 0.45
    train_steps: int = 30
    train_workers: int = 2
    batch_size: int = 16
    eval_subjects: int = 40
    eval_steps: int = 25
    dreambench: str = DREAMBENCH_SAMPLE  # skipped when the folder is absent
    dreambench_prompts: int = 5
    dreambench_images: int = 2  # per prompt (the benchmark draws 4)
    serve_steps: int = 25


PRESETS = {
    "default": DemoConfig(),
    "smoke": DemoConfig(out="runs/demo-smoke", pages=24, pretrain_steps=2, apprentice_clusters=2, dreambooth_steps=10,
                        clip_i_threshold=-1.0,
                        train_steps=2, train_workers=1, batch_size=4, eval_subjects=4, eval_steps=5,
                        dreambench_prompts=0, serve_steps=5),
}


class Stages:
    """Runs named stages once, one console line each: a stage whose ``done`` file exists is reused.
    Each stage's seconds and key figure are kept in ``demo.json``, so a reused stage shows its figure."""

    def __init__(self, cfg: DemoConfig, names: list[str], console: Console):
        self.cfg, self.names, self.console = cfg, names, console
        self.record_path = os.path.join(cfg.out, "demo.json")
        settings = {k: v for k, v in asdict(cfg).items() if k != "out"}
        self.record = {"settings": settings, "seconds": {}, "figures": {}}
        if os.path.exists(self.record_path):
            with open(self.record_path) as f:
                old = json.load(f)
            if old["settings"] != settings:
                raise ValueError(f"{cfg.out} holds a demo run with other settings; pass another --out or delete it")
            self.record = {"figures": {}, **old}
        os.makedirs(cfg.out, exist_ok=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.cfg.out, *parts)

    def run(self, name: str, done: str, fn, figure) -> None:
        """``fn()`` unless ``done`` exists; ``figure(result)`` is the stage's key figure."""
        label = f"[{self.names.index(name) + 1}/{len(self.names)}] {name}"
        with self.console.stage(label) as line:
            if os.path.exists(done):
                line.finish(f"{self.record['figures'].get(name, done)} (reused)", 0)
                return
            from .utils.ray_utils import init_ray

            init_ray()  # at the first stage that runs: a rerun that reuses every stage needs no Ray
            start = time.time()
            result = fn()
            if not os.path.exists(done):
                raise RuntimeError(f"stage {name} finished without writing {done}")
            self.record["seconds"][name] = round(time.time() - start, 1)
            self.record["figures"][name] = figure(result)
            with open(self.record_path, "w") as f:
                json.dump(self.record, f, indent=2)
            line.finish(self.record["figures"][name], self.record["seconds"][name])


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def trained(summary: dict, start: int = 0) -> str:
    """Steps run (a run from a checkpoint counts on from its step) and the last reported loss."""
    metrics = summary["metrics"]
    return f"{metrics['step'] - start} steps, loss {metrics['loss']:.4f}"


def _train_config(cfg: DemoConfig, stages: Stages, **kw):
    from .train.config import TrainConfig

    # Half a CPU per worker: 2 workers on a 2-CPU machine would otherwise hold every CPU and starve
    # the Ray Data read tasks that feed them (the run then waits forever). Threads stay 1 per worker.
    return TrainConfig(num_workers=cfg.train_workers, cpus_per_worker=0.5, batch_size=cfg.batch_size, warmup_steps=1,
                       checkpoint_every=10**9, report_every=5,  # one checkpoint: the last step
                       probe_every=0, storage_path=os.path.abspath(stages.path("train")), seed=cfg.seed, **kw)


def serve_once(checkpoint: str, out_dir: str, steps: int, subject_seed: int) -> dict:
    """Starts the Serve app on a free local port, registers a held-out subject's photos over HTTP,
    saves the generated PNG next to the demos, shuts the app down; -> what was sent and received."""
    import socket

    import numpy as np
    from PIL import Image
    from ray import serve

    from .client import SuTIClient
    from .serving.app import build_app
    from .utils.images import contact_sheet, encode_png
    from .world import Subject, render
    from .world.oracle import draw_case

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demos, target = draw_case(np.random.default_rng(subject_seed), 3)
    word = Subject.from_seed(subject_seed).class_word
    photos = [render(subject_seed, c, 32)[0] for c in demos]
    prompt = target.prompt(word)
    os.makedirs(out_dir, exist_ok=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(checkpoint, os.path.join(out_dir, "subjects"), max_replicas=1, num_cpus=0.5, allow_anonymous=True),
                  name="demo", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        client = SuTIClient(url)
        subject = client.register([encode_png(p) for p in photos], [c.prompt(word) for c in demos])
        t0 = time.time()
        image = client.generate(prompt, subject_id=subject, steps=steps, seed=0).images[0]
        seconds = time.time() - t0
    finally:
        serve.shutdown()
    image.save(os.path.join(out_dir, "generated.png"))
    for i, p in enumerate(photos):
        Image.fromarray(p).save(os.path.join(out_dir, f"demo_{i}.png"))
    info = {"url": url, "prompt": prompt, "subject_seed": subject_seed, "request_seconds": round(seconds, 2),
            "png_bytes": os.path.getsize(os.path.join(out_dir, "generated.png"))}
    with open(os.path.join(out_dir, "request.json"), "w") as f:
        json.dump(info, f, indent=2)
    sheet = contact_sheet([[*photos, np.asarray(image)]], labels=[prompt], label_width=170, cell=128,
                          header=[*(f"photo {i + 1}" for i in range(len(photos))), "SuTI drew"])
    sheet.save(os.path.join(out_dir, "contact.png"))  # last: the stage's done file
    return info


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """Every stage, one line each on ``console`` (default: plain lines on stdout, nothing redirected)."""
    from .apprentice.job import ApprenticeConfig, run_apprentice
    from .model import SuTIPipeline
    from .data.builder import BuildConfig, build_dataset
    from .evaluate.dreambench import DreamBenchConfig, evaluate_dreambench
    from .evaluate.synthetic import SyntheticEvalConfig, evaluate_synthetic
    from .train.trainer import run_training
    from .world import heldout_seeds
    from .world.crawl import WorldConfig, generate_world

    for path in (cfg.base_checkpoint, cfg.clip):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found (committed in checkpoints/; a clone without it is incomplete)")
    use_dreambench = cfg.dreambench_prompts > 0 and os.path.isdir(cfg.dreambench)
    names = ["world", "build_dataset", "pretrain", "apprentice", "train", "evaluate synthetic",
             *(["evaluate dreambench"] if use_dreambench else []), "serve"]
    stages = Stages(cfg, names, console or Console(None))
    p = stages.path
    stages.run("world", p("world", "world.json"), lambda: generate_world(
        WorldConfig(out=p("world"), pages=cfg.pages, seed=cfg.seed, image_size=32, preview_pages=6)),
        lambda stats: f"{stats['pages']} web pages, {stats['records']} image-text pairs "
                      f"({sum(stats['broken'].values())} broken on purpose)")
    stages.run("build_dataset", p("clusters", "stats.json"), lambda: build_dataset(
        BuildConfig(input=p("world", "web"), output=p("clusters"), clip_pretrained=cfg.clip)),
        lambda _: "{clusters_kept} clusters, {images_kept} of {records_in} images kept".format(
            **read_json(p("clusters", "stats.json"))))
    base = p("models", "base.safetensors")
    stages.run("pretrain", base, lambda: run_training(_train_config(
        cfg, stages, mode="pretrain", data=p("world", "web"), init_from=cfg.base_checkpoint, name="pretrain",
        steps=cfg.pretrain_steps, export_file=os.path.abspath(base)), command="ray-suti demo: pretrain"), trained)
    stages.run("apprentice", p("apprentice", "stats.json"), lambda: run_apprentice(ApprenticeConfig(
        clusters=p("clusters", "clusters"), output=p("apprentice"), checkpoint=base, clip_pretrained=cfg.clip,
        max_clusters=cfg.apprentice_clusters, dreambooth_steps=cfg.dreambooth_steps,
        clip_i_threshold=cfg.clip_i_threshold, seed=cfg.seed)),
        lambda stats: f"{stats['kept']} of {stats['candidates']} expert drawings kept "
                      f"(CLIP-I >= {cfg.clip_i_threshold:g}, {stats['clusters_done']} clusters)")
    if read_json(p("apprentice", "stats.json"))["kept"] == 0:
        raise RuntimeError(f"the apprenticeship kept no example from {cfg.apprentice_clusters} clusters at CLIP-I "
                           f">= {cfg.clip_i_threshold}: nothing to train on (more clusters or a lower threshold)")
    model = p("models", "suti.safetensors")
    start = SuTIPipeline.single_file_metadata(cfg.base_checkpoint).get("step", 0)  # steps count on from it
    stages.run("train", model, lambda: run_training(_train_config(
        cfg, stages, mode="suti", data=p("apprentice", "examples"), init_from=cfg.base_checkpoint, name="suti",
        steps=int(start) + cfg.train_steps, export_file=os.path.abspath(model)), command="ray-suti demo: train"),
        lambda summary: trained(summary, int(start)))
    stages.run("evaluate synthetic", p("eval", "results.md"), lambda: evaluate_synthetic(SyntheticEvalConfig(
        checkpoint=model, out=p("eval"), num_subjects=cfg.eval_subjects, steps=cfg.eval_steps, seed=cfg.seed,
        chunk_size=max(1, cfg.eval_subjects // 2))), synthetic_figure)
    if use_dreambench:
        stages.run("evaluate dreambench", p("eval-dreambench", "results.md"), lambda: evaluate_dreambench(
            DreamBenchConfig(checkpoint=model, data=cfg.dreambench, out=p("eval-dreambench"),
                             num_prompts=cfg.dreambench_prompts, images_per_prompt=cfg.dreambench_images,
                             steps=cfg.eval_steps, clip_pretrained=cfg.clip,
                             dreambooth_steps=cfg.dreambooth_steps, seed=cfg.seed)), dreambench_figure)
    stages.run("serve", p("serve", "contact.png"), lambda: serve_once(
        model, p("serve"), cfg.serve_steps, heldout_seeds(cfg.eval_subjects + 1)[-1]),
        lambda info: f"one HTTP request drawn in {info['request_seconds']} s: {p('serve', 'contact.png')}")
    return {"out": cfg.out, "dreambench": use_dreambench, "seconds": stages.record["seconds"], "model": model}


def synthetic_figure(results: dict) -> str:
    suti, text_only = (results["methods"][m]["subject_psnr"] for m in ("suti", "text_only"))
    return (f"subject PSNR {suti:.2f} dB vs {text_only:.2f} text-only "
            f"({results['suti_minus_text_only_db']['subject']:+.2f} dB), {results['methods']['suti']['n']} subjects")


def dreambench_figure(results: dict) -> str:
    m = results["methods"]
    return f"CLIP-I {m['suti']['clip_i']:.3f} vs {m['text_only']['clip_i']:.3f} text-only, {len(results['subjects'])} subjects"


def report(cfg: DemoConfig, summary: dict) -> str:
    """The results tables and where every artefact is."""
    p = lambda *parts: os.path.join(cfg.out, *parts)  # noqa: E731
    parts = [open(p("eval", "results.md")).read().split("## Per skill")[0].strip()]
    if summary["dreambench"]:
        parts.append(open(p("eval-dreambench", "results.md")).read().split("## Per subject")[0].strip())
    with open(p("serve", "request.json")) as f:
        served = json.load(f)
    parts.append(f"Served one request over HTTP: \"{served['prompt']}\" in {served['request_seconds']} s; "
                 f"its subject's photos and what SuTI drew: {p('serve', 'contact.png')}")
    parts.append("\n".join([f"Artefacts under {cfg.out}/:",
                            "  world/web, world/preview.png      synthetic crawl (web-pairs Parquet)",
                            "  clusters/clusters, clusters.png   ICL clusters after the CLIP filter, stats.json",
                            "  models/base.safetensors           pretrained text-to-image base",
                            "  apprentice/examples               ICL-V2 examples written by DreamBooth experts",
                            "  models/suti.safetensors           committed SuTI fine-tuned on them (Ray Train + DeepSpeed)",
                            "  eval/, eval-dreambench/           results.json, results.md, contact sheets, plot",
                            "  serve/contact.png                 the served subject and the HTTP answer",
                            "  logs/demo.log                     everything Ray and the libraries printed",
                            "  demo.json                         settings, seconds and key figure per stage"]))
    return "\n\n".join(parts)


def demo_config(preset: str, out: str | None = None) -> DemoConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    return replace(cfg, out=out) if out else cfg
