"""DreamBench: real subjects, the benchmark's 25 prompts each, DINO / CLIP-I / CLIP-T, and time.

A DreamBench folder holds one sub-folder of photos per subject and ``prompts_and_classes.txt``
(the subject -> class table and the object and live-subject prompt lists, ``{0}`` the unique token
and ``{1}`` the class). It works on ``../shared/data/dreambench-sample`` (4 subjects) and on the
full 30-subject release alike. Four methods share every subject, prompt and seed, on one base model:

- ``suti``: the subject's photos as demonstrations, no fine-tuning;
- ``text_only``: the same model with the demos dropped (what the class word alone gives);
- ``dreambooth``: LoRA fine-tuned per subject on the same photos (the apprenticeship's expert),
  prompts with the identifier ("a sks dog in the snow");
- ``copy_demo``: a photo returned unchanged: the ceiling of subject scores, the floor of CLIP-T.

``seconds_per_subject`` is the time to the first image for a new subject: personalisation (encoding
or fine-tuning) plus sampling one image, on one worker.

    ray job submit -- python jobs/evaluate.py dreambench --checkpoint PATH --data DIR --out DIR
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .scorers import ScorerConfig

METHODS = ("suti", "text_only", "dreambooth", "copy_demo")
SCORES = ("dino", "clip_i", "clip_t", "seconds_per_subject")
LIVE_CLASSES = {"cat", "dog"}  # DreamBench's live subjects get the live-subject prompts (outfits, hats)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class DreamBenchConfig:
    checkpoint: str = field(default="checkpoints/tiny-32.safetensors", metadata={"help": "saved SuTI model"})
    data: str = field(default="../shared/data/dreambench-sample", metadata={"help": "DreamBench folder"})
    out: str = field(default="runs/eval-dreambench", metadata={"help": "results.json, results.md, sheets, plot"})
    subjects: tuple[str, ...] = field(default=(), metadata={"help": "subject names (default: every folder present)"})
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": f"any of {', '.join(METHODS)}"})
    num_prompts: int = field(default=25, metadata={"help": "first N of each subject's prompts (25: the benchmark)"})
    images_per_prompt: int = field(default=4, metadata={"help": "samples per prompt (the benchmark uses 4)"})
    num_demos: int = field(default=3, metadata={"help": "photos shown to SuTI and DreamBooth (1-5)"})
    steps: int = field(default=25, metadata={"help": "sampling steps, every method"})
    guidance_text: float = field(default=1.5, metadata={"help": "text guidance (SuTI, text-only, DreamBooth)"})
    guidance_subject: float = field(default=1.5, metadata={"help": "subject guidance (SuTI)"})
    dreambooth_steps: int = field(default=150, metadata={"help": "LoRA fine-tuning steps per subject"})
    batch_size: int = field(default=20, metadata={"help": "images per sampling call"})
    seed: int = field(default=0, metadata={"help": "sampling seed (the same for every method)"})
    clip_model: str = field(default="tiny", metadata={"help": "open_clip name, or tiny"})
    clip_pretrained: str = field(default="checkpoints/tiny-clip.safetensors", metadata={"help": "tag or path"})
    dino_model: str = field(default="tiny", metadata={"help": "timm ViT name (vit_small_patch16_224.dino), or tiny"})
    dino_pretrained: str = field(default="", metadata={"help": "local DINO weights (tiny without: random init)"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per subject task"})
    sheet_prompts: int = field(default=6, metadata={"help": "prompts per subject on its contact sheet"})

    def __post_init__(self):
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
        if not 1 <= self.num_demos <= 5:
            raise ValueError(f"num_demos must be in [1, 5], got {self.num_demos}")
        if min(self.num_prompts, self.images_per_prompt, self.steps, self.dreambooth_steps, self.batch_size) < 1:
            raise ValueError("num_prompts, images_per_prompt, steps, dreambooth_steps and batch_size must be positive")

    @property
    def scorers(self) -> ScorerConfig:
        return ScorerConfig(self.clip_model, self.clip_pretrained, self.dino_model, self.dino_pretrained)


@dataclass(frozen=True)
class BenchSubject:
    name: str
    class_token: str
    live: bool
    photos: tuple[str, ...]  # paths, sorted


# ---- the dataset folder -------------------------------------------------------------------------
def parse_prompts_and_classes(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``prompts_and_classes.txt`` -> ({subject: class}, {"object": templates, "live": templates})."""
    classes, prompts, section = {}, {"object": [], "live": []}, None
    for line in text.splitlines():
        line = line.strip()
        if line.lower().startswith("object prompts"):
            section = "object"
        elif line.lower().startswith("live subject prompts"):
            section = "live"
        elif section is None and re.fullmatch(r"[\w-]+,[^,]+", line) and line != "subject_name,class":
            name, cls = line.split(",")
            classes[name] = cls.strip()
        elif section and (m := re.match(r"""['"](.*\{0\}.*)['"]\s*\.format""", line)):
            prompts[section].append(m.group(1))
    if not classes or not prompts["object"] or not prompts["live"]:
        raise ValueError("prompts_and_classes.txt has no subject table or misses a prompt list")
    return classes, prompts


def read_dreambench(root: str, names: tuple[str, ...] = ()) -> tuple[list[BenchSubject], dict[str, list[str]]]:
    """The subjects present under ``root`` (or exactly ``names``) and the prompt templates; ``root``
    is a local folder or a URI, read by every task through utils.storage."""
    from ..utils import storage

    root = root if storage.is_uri(root) else os.path.abspath(root)  # tasks need not share the working directory
    table = storage.join(root, "prompts_and_classes.txt")
    if not storage.is_file(table):
        raise FileNotFoundError(f"{table} not found: --data must be a DreamBench folder")
    classes, prompts = parse_prompts_and_classes(storage.read_bytes(table).decode())
    if unknown := [n for n in names if n not in classes]:
        raise ValueError(f"subjects not in {table}: {unknown}")
    subjects = []
    for name in names or sorted(classes):
        folder = storage.join(root, name)
        if not storage.is_dir(folder):
            if names:
                raise FileNotFoundError(f"no photo folder {folder}")
            continue  # a sample of the benchmark holds only some of its subjects
        photos = tuple(storage.join(folder, p) for p in storage.listdir(folder) if p.lower().endswith(IMAGE_SUFFIXES))
        if not photos:
            raise FileNotFoundError(f"{folder} holds no photos ({', '.join(IMAGE_SUFFIXES)})")
        subjects.append(BenchSubject(name, classes[name], classes[name] in LIVE_CLASSES, photos))
    if not subjects:
        raise FileNotFoundError(f"{root} holds none of the subjects its table lists")
    return subjects, prompts


def subject_prompts(subject: BenchSubject, templates: dict[str, list[str]], n: int) -> list[str]:
    """Prompts without the unique token ("a dog in the snow"); DreamBooth adds its own."""
    chosen = templates["live" if subject.live else "object"][:n]
    return [" ".join(t.format("", subject.class_token).split()) for t in chosen]


# ---- one Ray task per subject -------------------------------------------------------------------
def _draw(sample, prompts: list[str], per_prompt: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """sample(prompts, seed, n) -> images; in chunks of whole prompts, seeded per chunk, so every
    method meets the same noise for the same prompt."""
    step = max(1, batch_size // per_prompt)
    out = []
    for i in range(0, len(prompts), step):
        out.extend(sample(prompts[i:i + step], seed + i, per_prompt))
    return out


def _timed_first(personalize, sample, prompt: str, seed: int):
    """-> (what personalize returned, personalisation seconds, seconds to the first image)."""
    t0 = time.perf_counter()
    state = personalize()
    t1 = time.perf_counter()
    sample(state, [prompt], seed, 1)
    return state, t1 - t0, time.perf_counter() - t0


def _evaluate_subject(cfg: DreamBenchConfig, subject: BenchSubject, templates: dict) -> dict:
    import torch

    from ..apprentice.dreambooth import DreamBoothConfig, dreambooth_expert
    from ..model.inputs import load_image, square
    from ..utils.storage import read_bytes
    from ..model.pipeline import load_pipeline
    from .scorers import Scorers

    torch.set_num_threads(1)
    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(cfg.checkpoint).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe("warm-up", None, num_inference_steps=1)  # first-call set-up is not any method's time
    photos = []
    for path in subject.photos:
        try:
            photos.append(load_image(read_bytes(path)))
        except Exception as e:
            raise ValueError(f"{path}: {e}") from None
    demos, size = photos[:cfg.num_demos], pipe.image_size
    prompts = subject_prompts(subject, templates, cfg.num_prompts)
    sampling = dict(num_inference_steps=cfg.steps, guidance_scale_text=cfg.guidance_text, output_type="np")

    def sample_suti(feats, texts, seed, n):
        return list(pipe(texts, feats, generator=torch.Generator(device).manual_seed(seed), num_images_per_prompt=n,
                         guidance_scale_subject=cfg.guidance_subject, **sampling).images)

    def sample_text(_, texts, seed, n):
        return list(pipe(texts, None, generator=torch.Generator(device).manual_seed(seed), num_images_per_prompt=n,
                         **sampling).images)

    outputs, timing = {}, {}
    if "suti" in cfg.methods:
        feats, p, t = _timed_first(lambda: pipe.encode_subject(demos), sample_suti, prompts[0], cfg.seed)
        outputs["suti"] = _draw(lambda *a: sample_suti(feats, *a), prompts, cfg.images_per_prompt, cfg.batch_size,
                                cfg.seed)
        timing["suti"] = (p, t)
    if "text_only" in cfg.methods:
        _, p, t = _timed_first(lambda: None, sample_text, prompts[0], cfg.seed)
        outputs["text_only"] = _draw(lambda *a: sample_text(None, *a), prompts, cfg.images_per_prompt,
                                     cfg.batch_size, cfg.seed)
        timing["text_only"] = (p, t)
    if "dreambooth" in cfg.methods:
        db = DreamBoothConfig(steps=cfg.dreambooth_steps, sample_steps=cfg.steps, guidance=cfg.guidance_text,
                              seed=cfg.seed)
        t0 = time.perf_counter()
        with dreambooth_expert(pipe, demos, None, subject.class_token, db) as expert:
            t1 = time.perf_counter()
            expert.sample([prompts[0]], cfg.seed)
            timing["dreambooth"] = (t1 - t0, time.perf_counter() - t0)
            outputs["dreambooth"] = _draw(lambda texts, seed, n: list(expert.sample(texts, seed, n)), prompts,
                                          cfg.images_per_prompt, cfg.batch_size, cfg.seed)
    copied_from = []
    if "copy_demo" in cfg.methods:  # the demo photos at the model's resolution, cycled
        copied_from = [i % len(demos) for i in range(len(prompts) * cfg.images_per_prompt)]
        outputs["copy_demo"] = [np.asarray(square(demos[j], size)) for j in copied_from]
        timing["copy_demo"] = (0.0, 0.0)

    from PIL import Image

    scorers = Scorers(cfg.scorers, device)
    refs = scorers.references(photos)
    per_image_prompts = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    methods = {}
    for name, images in outputs.items():
        pil = [Image.fromarray(_to_uint8(img)) for img in images]
        scores = scorers.score(pil, per_image_prompts, refs, copied_from if name == "copy_demo" else None)
        methods[name] = {**scores, "seconds_per_subject": timing[name][1], "personalize_s": timing[name][0],
                         "images": len(images)}
    shown = range(0, min(cfg.sheet_prompts, len(prompts)) * cfg.images_per_prompt, cfg.images_per_prompt)
    sheet = {"demos": [np.asarray(square(d, size)) for d in demos], "prompts": prompts[:cfg.sheet_prompts],
             "methods": {name: [_to_uint8(images[i]) for i in shown] for name, images in outputs.items()}}
    return {"subject": subject.name, "class": subject.class_token, "live": subject.live, "methods": methods,
            "sheet": sheet}


def _to_uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


# ---- reports ------------------------------------------------------------------------------------
def aggregate(records: list[dict], methods: tuple[str, ...]) -> dict:
    """Per method: the mean over subjects (every subject has the same number of images)."""
    return {m: {k: float(np.mean([r["methods"][m][k] for r in records])) for k in SCORES} for m in methods}


def markdown(results: dict) -> str:
    cfg, methods = results["config"], results["methods"]
    dino_note = (" DINO here is a **random-init** tiny ViT (no DINO weights given): compare methods with it, "
                 "not with published DINO numbers." if results["dino_is_random"] else "")
    lines = [f"# DreamBench: `{cfg['checkpoint']}`", "",
             f"{len(results['subjects'])} subjects ({', '.join(results['subjects'])}) from `{cfg['data']}`, "
             f"{cfg['num_prompts']} prompts x {cfg['images_per_prompt']} images, {cfg['num_demos']} demo photos, "
             f"{cfg['steps']} sampling steps, DreamBooth LoRA {cfg['dreambooth_steps']} steps. Scores: mean cosine "
             f"to the subject's real photos (DINO `{cfg['dino_model']}`, CLIP-I `{cfg['clip_model']}`) and to the "
             f"prompt (CLIP-T). Seconds: time to the first image of a new subject, one worker.{dino_note}", "",
             "| method | DINO | CLIP-I | CLIP-T | seconds / subject |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {m} | {s['dino']:.3f} | {s['clip_i']:.3f} | {s['clip_t']:.3f} | {s['seconds_per_subject']:.2f} |"
              for m, s in methods.items()]
    lines += ["", "## Per subject (DINO / CLIP-I / CLIP-T)", "",
              "| subject | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for name, per in results["per_subject"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{per[m]['dino']:.3f} / {per[m]['clip_i']:.3f} / {per[m]['clip_t']:.3f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def _contact_sheet(record: dict):
    from ..utils.images import contact_sheet

    sheet = record["sheet"]
    names = list(sheet["methods"])
    rows = [[*sheet["demos"], *(sheet["methods"][m][i] for m in names)] for i in range(len(sheet["prompts"]))]
    header = [f"demo {i + 1}" for i in range(len(sheet["demos"]))] + names
    return contact_sheet(rows, labels=sheet["prompts"], cell=64, header=header, label_width=170)


def _plot(methods: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("dino", "clip_i", "clip_t"), ("DINO", "CLIP-I", "CLIP-T")):
        for m, s in methods.items():
            x = max(s["seconds_per_subject"], 1e-2)  # copy-a-demo takes no time: drawn at the axis floor
            ax.scatter([x], [s[key]])
            ax.annotate(m, (x, s[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("seconds to the first image of a new subject")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_dreambench(cfg: DreamBenchConfig) -> dict:
    """One Ray task per subject; writes results.json, results.md, contact_sheets/, quality_vs_seconds.png."""
    from ..model.loading import resolve_checkpoint
    from ..utils.ray_utils import run_sharded
    from ..utils.storage import exists, staged

    subjects, templates = read_dreambench(cfg.data, cfg.subjects)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    for path in (cfg.clip_pretrained if cfg.clip_model == "tiny" else "", cfg.dino_pretrained):
        if path and not exists(path):
            raise FileNotFoundError(f"scorer weights {path} not found")
    absolute = {k: os.path.abspath(getattr(cfg, k)) for k in ("clip_pretrained", "dino_pretrained")
                if os.path.exists(getattr(cfg, k))}  # tasks need not share the driver's working directory
    task_cfg = replace(cfg, checkpoint=checkpoint, **absolute)
    records = run_sharded(_evaluate_subject, [(task_cfg, s, templates) for s in subjects],
                          max_in_flight=len(subjects), desc="evaluate dreambench", num_gpus=cfg.num_gpus)
    methods = [m for m in METHODS if m in cfg.methods]
    results = {"config": asdict(cfg), "subjects": [r["subject"] for r in records],
               "dino_is_random": cfg.scorers.dino_is_random, "methods": aggregate(records, tuple(methods)),
               "per_subject": {r["subject"]: r["methods"] for r in records}}
    with staged(cfg.out) as out:  # a local folder or a URI (uploaded once written)
        os.makedirs(os.path.join(out, "contact_sheets"), exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(markdown(results))
        for r in records:
            _contact_sheet(r).save(os.path.join(out, "contact_sheets", f"{r['subject']}.png"))
        _plot(results["methods"], os.path.join(out, "quality_vs_seconds.png"))
    return results
