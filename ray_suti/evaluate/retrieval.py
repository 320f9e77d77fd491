"""Re-Imagen on the synthetic world: draw a catalogue subject known only by its made-up name.

The knowledge base holds a distractor crawl (thousands of subjects under the same four class words)
and a catalogue of held-out subjects, each on its own page under a name no training caption
contains (``world/catalogue.py``). Each case asks for "a Zorvik mug <new context>"; three methods
share the prompt and the sampling seed:

- ``retrieval``: the model with the knowledge base: the prompt's ``num_neighbours`` neighbours are
  the demos (``SuTIPipeline(knowledge_base=)``, the path users call);
- ``oracle``: the catalogue's first ``num_neighbours`` photos of the subject given as demos, what a
  user who uploads them gets (the bound retrieval aims at);
- ``text_only``: no demos: the model has never seen the name.

Retrieval is scored by recall@k (a neighbour shows the subject), recall@1 and precision@k
(the share of neighbours that show it), for the whole prompt and for the name alone; generation by PSNR against the exact render, inside the
subject's mask and outside it, as in ``synthetic.py``.

    ray job submit -- python jobs/evaluate.py retrieval --checkpoint PATH --out DIR
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..world.catalogue import CatalogueConfig, named, write_catalogue
from ..world.contexts import Context
from ..world.render import render
from .synthetic import _to_uint8, background_mask, psnr

METHODS = ("retrieval", "oracle", "text_only")
RECALL_GOAL = 0.9
ORACLE_GAP_GOAL_DB = 0.5


@dataclass(frozen=True)
class RetrievalEvalConfig:
    checkpoint: str = field(default="checkpoints/tiny-32.safetensors", metadata={"help": "saved SuTI model"})
    out: str = field(default="runs/eval-retrieval", metadata={"help": "results.json, results.md, contact_sheet.png, "
                                                                       "and the catalogue and KB they were made with"})
    num_subjects: int = field(default=50, metadata={"help": "held-out catalogue subjects, one case each"})
    photos_per_page: int = field(default=4, metadata={"help": "catalogue photos per subject"})
    num_neighbours: int = field(default=3, metadata={"help": "k: neighbours retrieved (and oracle photos) per case"})
    distractors: str = field(default="", metadata={"help": "web pairs indexed beside the catalogue (e.g. "
                                                           "runs/world/web); empty: a fresh crawl of distractor_pages"})
    distractor_pages: int = field(default=400, metadata={"help": "pages of the fresh distractor crawl"})
    seed: int = field(default=0, metadata={"help": "names, catalogue photos, target contexts and sampling seeds"})
    steps: int = field(default=25, metadata={"help": "sampling steps"})
    guidance_text: float = field(default=1.5, metadata={"help": "text guidance scale"})
    guidance_subject: float = field(default=1.5, metadata={"help": "subject guidance scale"})
    scheduler: str = field(default="ddim", metadata={"help": "sampler (model/schedulers.py)"})
    chunk_size: int = field(default=25, metadata={"help": "cases per Ray task (each loads the model and KB once)"})
    sheet_rows: int = field(default=10, metadata={"help": "cases shown in contact_sheet.png"})

    def __post_init__(self):
        if not 1 <= self.num_neighbours <= self.photos_per_page:
            raise ValueError(f"num_neighbours must be in [1, photos_per_page={self.photos_per_page}]")
        if self.num_subjects < 1 or self.chunk_size < 1 or self.steps < 1:
            raise ValueError("num_subjects, chunk_size and steps must be positive")


def build_knowledge_base(cfg: RetrievalEvalConfig) -> tuple[str, list[dict]]:
    """Writes the catalogue, a distractor crawl when none is given, and a fresh KB of both."""
    from ..knowledge import IndexConfig, run_index
    from ..world.crawl import WorldConfig, generate_world

    catalogue = write_catalogue(CatalogueConfig(out=os.path.join(cfg.out, "catalogue"), num_subjects=cfg.num_subjects,
                                                photos_per_page=cfg.photos_per_page, seed=cfg.seed))
    distractors = cfg.distractors
    if not distractors:
        world, world_cfg = os.path.join(cfg.out, "distractors"), WorldConfig(
            out=os.path.join(cfg.out, "distractors"), pages=cfg.distractor_pages, seed=cfg.seed + 1, preview_pages=0)
        made = os.path.join(world, "world.json")
        if not (os.path.exists(made) and json.load(open(made))["config"] == asdict(world_cfg)):
            shutil.rmtree(world, ignore_errors=True)
            generate_world(world_cfg)
        distractors = os.path.join(world, "web")
    kb = os.path.join(cfg.out, "kb")
    shutil.rmtree(kb, ignore_errors=True)  # the catalogue may have changed under the same file name
    for source in (distractors, os.path.join(cfg.out, "catalogue", "web")):
        run_index(IndexConfig(input=source, output=kb))
    return kb, catalogue


def _evaluate_case(pipe, kb, cfg: RetrievalEvalConfig, index: int, entry: dict) -> dict:
    import torch

    size, k = pipe.image_size, cfg.num_neighbours
    target = Context.from_json(entry["target"])
    prompt = target.prompt(named(entry))
    gt, mask = render(entry["subject_seed"], target, size)
    photos = [Context.from_json(c) for c in entry["contexts"][:k]]
    oracle_demos = [render(entry["subject_seed"], c, 64)[0] for c in photos]  # the catalogue's own photos
    sampling = dict(num_inference_steps=cfg.steps, guidance_scale_text=cfg.guidance_text,
                    guidance_scale_subject=cfg.guidance_subject, output_type="np")

    def seeded():
        return torch.Generator().manual_seed(entry["case_seed"])

    retrieved = pipe(prompt, knowledge_base=kb, num_neighbours=k, generator=seeded(), **sampling)
    neighbours = retrieved.neighbours[0]
    outputs = {"retrieval": retrieved.images[0],
               "oracle": pipe(prompt, oracle_demos, [c.prompt(named(entry)) for c in photos], generator=seeded(),
                              **sampling).images[0],
               "text_only": pipe(prompt, None, generator=seeded(), **sampling).images[0]}
    outputs = {m: _to_uint8(image) for m, image in outputs.items()}
    shows_subject = [n.id in entry["keys"] for n in neighbours]
    by_name = [n.id in entry["keys"] for n in kb.search(named(entry), k)]  # the name alone: "Zorvik mug"
    record = {"index": index, "subject_seed": entry["subject_seed"], "name": entry["name"], "prompt": prompt,
              "neighbours": [n.describe() for n in neighbours],
              "retrieval": {"recall_at_k": any(shows_subject), "recall_at_1": shows_subject[0],
                            "precision_at_k": float(np.mean(shows_subject)), "name_recall_at_k": any(by_name)},
              "metrics": {m: {"subject_psnr": psnr(img, gt, mask), "context_psnr": psnr(img, gt, ~mask),
                              "background_psnr": psnr(img, gt, background_mask(mask))} for m, img in outputs.items()}}
    if index < cfg.sheet_rows:
        record["images"] = {"neighbours": [np.asarray(n.image) for n in neighbours], "gt": gt, **outputs}
    return record


def _evaluate_chunk(cfg: RetrievalEvalConfig, kb_path: str, cases: list[tuple[int, dict]]) -> list[dict]:
    import torch

    from ..knowledge import KnowledgeBase
    from ..model.pipeline import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline(cfg.checkpoint).set_scheduler(cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    kb = KnowledgeBase(kb_path)
    return [_evaluate_case(pipe, kb, cfg, index, entry) for index, entry in cases]


ABLATIONS = {"clip_only": (0.5, 0.5, 0.0, 0.0), "without_name_term": (0.5, 0.5, 1.0, 0.0)}


def ablations(cfg: RetrievalEvalConfig, kb_path: str, catalogue: list[dict]) -> dict:
    """recall@k of the same prompts with parts of the score switched off (KnowledgeBase weights)."""
    from ..knowledge import KnowledgeBase

    recall = {}
    for name, weights in ABLATIONS.items():
        kb = KnowledgeBase(kb_path, weights=weights)
        recall[name] = float(np.mean([
            any(n.id in e["keys"] for n in kb.search(Context.from_json(e["target"]).prompt(named(e)), cfg.num_neighbours))
            for e in catalogue]))
    return recall


def aggregate(records: list[dict]) -> dict:
    retrieval = {key: float(np.mean([r["retrieval"][key] for r in records]))
                 for key in ("recall_at_k", "recall_at_1", "precision_at_k", "name_recall_at_k")}
    methods = {m: {metric: float(np.nanmean([r["metrics"][m][metric] for r in records]))
                   for metric in ("subject_psnr", "context_psnr", "background_psnr")} for m in METHODS}
    gap = methods["oracle"]["subject_psnr"] - methods["retrieval"]["subject_psnr"]
    return {"retrieval": retrieval, "methods": methods, "n": len(records),
            "oracle_minus_retrieval_subject_db": gap,
            "retrieval_minus_text_only_subject_db": methods["retrieval"]["subject_psnr"] - methods["text_only"]["subject_psnr"],
            "goals": {f"recall@k >= {RECALL_GOAL}": retrieval["recall_at_k"] >= RECALL_GOAL,
                      f"subject PSNR within {ORACLE_GAP_GOAL_DB} dB of the oracle": gap <= ORACLE_GAP_GOAL_DB}}


def markdown(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    r, k = summary["retrieval"], cfg["num_neighbours"]
    lines = [f"# Retrieval-augmented generation (Re-Imagen) on the synthetic catalogue: `{cfg['checkpoint']}`", "",
             f"{summary['n']} held-out subjects known only by a made-up name, {cfg['photos_per_page']} catalogue photos "
             f"each, among {results['kb_rows']} knowledge-base entries; k = {k}; {cfg['steps']} {cfg['scheduler']} steps.",
             "", f"Retrieval by the whole prompt: recall@{k} {r['recall_at_k']:.3f}, recall@1 {r['recall_at_1']:.3f}, "
             f"precision@{k} {r['precision_at_k']:.3f}; by the name alone (\"Zorvik mug\"): recall@{k} "
             f"{r['name_recall_at_k']:.3f}.", "",
             "| method | subject PSNR | context PSNR | background PSNR |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {s['subject_psnr']:.2f} | {s['context_psnr']:.2f} | {s['background_psnr']:.2f} |"
              for m, s in summary["methods"].items()]
    lines += ["", "Retrieval recall@k with parts of the score off: " + ", ".join(
        f"{name.replace('_', ' ')} {value:.3f}" for name, value in results["ablation_recall_at_k"].items()) + "."]
    lines += ["", f"Oracle minus retrieval (subject): {summary['oracle_minus_retrieval_subject_db']:+.2f} dB; "
              f"retrieval minus text-only: {summary['retrieval_minus_text_only_subject_db']:+.2f} dB.", "",
              "Goals: " + "; ".join(f"{goal}: {'met' if met else 'NOT met'}" for goal, met in summary["goals"].items())]
    return "\n".join(lines) + "\n"


def _contact_sheet(records: list[dict], k: int):
    from ..utils.images import contact_sheet

    shown = [r for r in records if "images" in r]
    rows = [[*r["images"]["neighbours"], *[None] * (k - len(r["images"]["neighbours"])), r["images"]["gt"],
             *(r["images"][m] for m in METHODS)] for r in shown]
    header = [f"neighbour {i + 1}" for i in range(k)] + ["ground truth", "retrieval", "oracle", "text-only"]
    labels = [f"{'ok' if r['retrieval']['recall_at_k'] else 'MISS'} {r['prompt']}" for r in shown]
    return contact_sheet(rows, labels=labels, cell=64, header=header, label_width=170)


def evaluate_retrieval(cfg: RetrievalEvalConfig) -> dict:
    """Builds the catalogue and KB, runs every case as Ray tasks, writes and returns the results."""
    from ..knowledge import KnowledgeBase
    from ..model.loading import resolve_checkpoint
    from ..model.schedulers import check_scheduler
    from ..utils.ray_utils import run_sharded

    check_scheduler(cfg.scheduler)  # fail here, not inside every task
    cfg = replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint), out=os.path.abspath(cfg.out))
    kb_path, catalogue = build_knowledge_base(cfg)
    cases = list(enumerate(catalogue))
    chunks = [cases[i:i + cfg.chunk_size] for i in range(0, len(cases), cfg.chunk_size)]
    records = [r for part in run_sharded(_evaluate_chunk, [(cfg, kb_path, c) for c in chunks], len(chunks),
                                         "evaluate retrieval") for r in part]
    results = {"config": asdict(cfg), "kb_rows": len(KnowledgeBase(kb_path)), "summary": aggregate(records),
               "ablation_recall_at_k": ablations(cfg, kb_path, catalogue),
               "cases": [{key: v for key, v in r.items() if key != "images"} for r in records]}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(markdown(results))
    _contact_sheet(records, cfg.num_neighbours).save(os.path.join(cfg.out, "contact_sheet.png"))
    return results
