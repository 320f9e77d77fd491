"""``ray-suti``: one command whose subcommands mirror the jobs in ``jobs/``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import add_dataclass_args, from_args


def _world(args: argparse.Namespace) -> int:
    from .world.crawl import WorldConfig, generate_world

    cfg = from_args(WorldConfig, args)
    stats = generate_world(cfg)
    print(json.dumps(stats, indent=2, sort_keys=True))
    print(f"web pairs: {cfg.out}/web   ground truth: {cfg.out}/truth   preview: {cfg.out}/preview.png")
    return 0


def _run_stage(run, cfg, where: str, hide: tuple = ()) -> int:
    """Runs a stage; bad input ends it with a one-line error instead of a traceback."""
    try:
        stats = run(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps({k: v for k, v in stats.items() if k not in hide}, indent=2, sort_keys=True))
    print(where)
    return 0


def _index(args: argparse.Namespace) -> int:
    from .knowledge import IndexConfig, run_index

    cfg = from_args(IndexConfig, args)
    return _run_stage(run_index, cfg, f"knowledge base: {cfg.output}  (use: ray-suti generate --kb {cfg.output})",
                      hide=("files",))


def _build_dataset(args: argparse.Namespace) -> int:
    from .data.builder import BuildConfig, build_dataset

    cfg = from_args(BuildConfig, args)
    return _run_stage(build_dataset, cfg, f"clusters: {cfg.output}/clusters   stats: {cfg.output}/stats.json",
                      hide=("mean_sim_histogram",))


def _train_clip(args: argparse.Namespace) -> int:
    from .data.train_clip import ClipTrainConfig, train_clip

    try:
        cfg = from_args(ClipTrainConfig, args)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return _run_stage(train_clip, cfg, f"CLIP weights: {cfg.output}  "
                                       f"(use: ray-suti build-dataset --clip-pretrained {cfg.output})")


def _apprentice(args: argparse.Namespace) -> int:
    from .apprentice.job import ApprenticeConfig, run_apprentice

    cfg = from_args(ApprenticeConfig, args)
    return _run_stage(run_apprentice, cfg, f"ICL-V2 examples: {cfg.output}/examples   stats: {cfg.output}/stats.json")


def _encode(args: argparse.Namespace) -> int:
    from .encode.job import EncodeConfig, run_encode

    cfg = from_args(EncodeConfig, args)
    return _run_stage(run_encode, cfg, f"cached inputs: {cfg.output}   (use: ray-suti train --latents {cfg.output})")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _serve(args: argparse.Namespace, ready=None) -> int:
    """Until Ctrl-C; ``ready(url)`` is called once the app answers (default: a line on stderr)."""
    from .serving.app import build_app, serve_until_stopped
    from .serving.auth import CredentialsError
    from .utils.ray_utils import init_ray

    # Open only on the loopback interface; any other host needs keys (a file, or SUTI_API_TOKEN).
    try:
        app = build_app(checkpoint=args.checkpoint, store=args.store, max_replicas=args.max_replicas,
                        num_gpus=args.num_gpus, scheduler=args.scheduler, api_keys_file=args.api_keys_file,
                        token_file=args.token_file, allow_anonymous=args.host in LOOPBACK,
                        knowledge_base=args.knowledge_base)
    except CredentialsError as e:
        raise SystemExit(f"error: --host {args.host}: {e}") from None
    init_ray()
    serve_until_stopped(app, args.host, args.port, ready or (lambda url: print(
        f"serving {args.checkpoint} at {url}  (API docs: /docs; Ctrl-C stops)", file=sys.stderr, flush=True)))
    return 0


def _client(args: argparse.Namespace) -> int:
    """The HTTP API through ray_suti.client; JSON on stdout."""
    from .client import SuTIAPIError, SuTIClient

    token = open(args.token_file).read().strip() if args.token_file else os.environ.get("SUTI_API_TOKEN")
    client = SuTIClient(args.url, token=token)
    try:
        if args.action == "register":
            out = {"subject_id": client.register(_subject_photos(args.photos, 5), args.caption)}
        elif args.action == "generate":
            result = client.generate(args.prompt, subject_id=args.subject_id,
                                     photos=_subject_photos(args.photos, 5) if args.photos else None, seed=args.seed,
                                     steps=args.steps, num_images=args.num_images, guidance_text=args.guidance_text,
                                     guidance_subject=args.guidance_subject)
            stem, ext = os.path.splitext(args.out)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            paths = [args.out if i == 0 else f"{stem}-{i}{ext}" for i in range(len(result.images))]
            for image, path in zip(result.images, paths):
                image.save(path)
            out = {"images": paths, "seed": result.seed, "timings": result.timings}
        elif args.action == "list":
            out = {"subjects": list(client.list())}
        else:
            out = {"deleted": client.delete(args.subject_id)}
    except SuTIAPIError as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps(out, indent=2))
    return 0


def _oracle(args: argparse.Namespace) -> int:
    from .world.oracle import OracleConfig, write_oracle

    cfg = from_args(OracleConfig, args)
    print(f"{write_oracle(cfg)} oracle ICL-V2 examples in {cfg.out}")
    return 0


def _train(args: argparse.Namespace, mode: str) -> int:
    from .train.config import TrainConfig
    from .train.trainer import run_training

    cfg = from_args(TrainConfig, args, mode=mode)
    summary = run_training(cfg, command="ray-suti " + " ".join(sys.argv[1:]))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo_config, report, run_demo
    from .utils.console import Console

    cfg = demo_config(args.preset, args.out)
    log = None if args.verbose else os.path.join(cfg.out, "logs", "demo.log")
    with Console(log) as console:
        console.say(f"ray-suti demo, preset {args.preset}: every stage on one local Ray, artefacts in {cfg.out}/"
                    + (f" (Ray's and the libraries' logs: {log})" if log else ""))
        summary = run_demo(cfg, console)
        console.say("\n" + report(cfg, summary))
        if args.keep_serving:  # `ray-suti serve` on the trained model and the demo's subject store
            _serve(build_parser().parse_args(["serve", "--checkpoint", summary["model"], "--port", str(args.port),
                                              "--store", os.path.join(cfg.out, "serve", "subjects"),
                                              "--max-replicas", "1"]),
                   ready=lambda url: console.say(f"Serving the trained model: open {url}/ (the demo's subject is "
                                                 "listed there). Ctrl-C stops it."))
            console.say("stopped")
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def load_pipeline(checkpoint: str, torch_dtype=None):
    from .model import load_pipeline as load

    try:
        return load(checkpoint, torch_dtype=torch_dtype)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")


def _subject_photos(paths: list[str], limit: int) -> list[str]:
    """Files as given; from a folder, its images in name order, at most ``limit`` (said aloud)."""
    photos = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
            if len(found) > limit:
                print(f"note: using the first {limit} of {len(found)} photos in {path}", file=sys.stderr)
            photos += found[:limit]
        else:
            photos.append(path)
    return photos


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .model import SuTIInputError

    torch.set_num_threads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA GPU here")
    from .model.loading import torch_dtype

    dtype = torch_dtype(args.dtype)
    pipe = load_pipeline(args.checkpoint).set_scheduler(args.scheduler).to(args.device, dtype)
    if (args.subject is None) == (args.kb is None):
        raise SystemExit("error: give --subject photos or a --kb knowledge base")
    photos = _subject_photos(args.subject, pipe.max_demos) if args.subject else None
    try:
        kb = None
        if args.kb:
            from .knowledge import KnowledgeBase

            kb = KnowledgeBase(args.kb, device=args.device)
        out = pipe(args.prompt, photos, subject_captions=args.caption, num_inference_steps=args.steps,
                   knowledge_base=kb, num_neighbours=args.neighbours,
                   guidance_scale_text=args.guidance_text, guidance_scale_subject=args.guidance_subject,
                   guidance_mode=args.guidance_mode, negative_prompt=args.negative_prompt,
                   num_images_per_prompt=args.num_images,
                   generator=torch.Generator(args.device).manual_seed(args.seed), box=args.box, edges=args.edges,
                   keypoints=None if args.keypoints is None else [args.keypoints[:2], args.keypoints[2:]])
    except (SuTIInputError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    stem, ext = os.path.splitext(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    paths = [args.out if i == 0 else f"{stem}-{i}{ext}" for i in range(len(out.images))]
    for image, path in zip(out.images, paths):
        image.save(path)
    result = {"images": paths, "seed": args.seed, "prompt": args.prompt}
    if out.neighbours:  # --kb: which knowledge-base entries were the demos
        result["neighbours"] = [[n.describe() for n in found] for found in out.neighbours]
    print(json.dumps(result) if args.json else "\n".join(
        paths + [f"demo: {n['caption']} ({n['id']}, {n['score']})" for n in result.get("neighbours", [[]])[0]]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .model.loading import DTYPES
    from .model.schedulers import GUIDANCE_MODES, SCHEDULER_NAMES
    from .world.crawl import WorldConfig

    from . import __version__

    parser = argparse.ArgumentParser(prog="ray-suti", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ray-suti {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("world", help="stage 0: generate the synthetic web crawl (Ray tasks)")
    add_dataclass_args(p, WorldConfig)
    p.set_defaults(func=_world)

    from .data.builder import BuildConfig
    from .knowledge.index import IndexConfig
    from .train.config import TrainConfig
    from .world.oracle import OracleConfig

    from .data.train_clip import ClipTrainConfig

    p = sub.add_parser("train-clip", help="train the embedded default's small CLIP on crawled web pairs or pages "
                                          "rendered on the fly (--recipe; Ray Train, or --local: one process)")
    add_dataclass_args(p, ClipTrainConfig)
    p.set_defaults(func=_train_clip)

    p = sub.add_parser("build-dataset", help="stage 1: web pairs -> ICL clusters (Ray Data, CLIP-filtered)")
    add_dataclass_args(p, BuildConfig)
    p.set_defaults(func=_build_dataset)

    p = sub.add_parser("index", help="stage 1b: image-text pairs -> a Re-Imagen knowledge base (Ray Data, LanceDB)")
    add_dataclass_args(p, IndexConfig)
    p.set_defaults(func=_index)

    p = sub.add_parser("pretrain", help="stage 2: train the base text-to-image model on web pairs (Ray Train)")
    add_dataclass_args(p, TrainConfig, skip=("mode",))
    p.set_defaults(func=lambda a: _train(a, "pretrain"))

    p = sub.add_parser("oracle", help="write oracle ICL-V2 examples (the renderer as a perfect expert)")
    add_dataclass_args(p, OracleConfig)
    p.set_defaults(func=_oracle)

    from .apprentice.job import ApprenticeConfig

    p = sub.add_parser("apprentice", help="stage 3: DreamBooth experts draw ICL-V2 targets for each cluster (Ray actors)")
    add_dataclass_args(p, ApprenticeConfig)
    p.set_defaults(func=_apprentice)

    from .encode.job import EncodeConfig

    p = sub.add_parser("encode", help="stage 3b: cache VAE latents and text states of ICL-V2 examples (Ray Data actors)")
    add_dataclass_args(p, EncodeConfig)
    p.set_defaults(func=_encode)

    p = sub.add_parser("train", help="stage 4: train SuTI on ICL-V2 examples (Ray Train + DeepSpeed ZeRO)")
    add_dataclass_args(p, TrainConfig, skip=("mode",))
    p.set_defaults(func=lambda a: _train(a, "suti"))

    from .evaluate.cli import add_cli as add_evaluate

    add_evaluate(sub)

    p = sub.add_parser("generate", help="draw a subject from its photos in a new context")
    p.add_argument("--checkpoint", required=True, help="saved checkpoint folder, or a preset name (tiny-32, ...)")
    p.add_argument("--subject", nargs="+", help="1-5 photos, or folders of photos")
    p.add_argument("--kb", help="a knowledge base (ray-suti index) whose nearest pairs to the prompt are the demos")
    p.add_argument("--neighbours", type=int, default=3, help="with --kb: demos retrieved")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output PNG (extra images get -1, -2, ... suffixes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-text", type=float, default=1.5)
    p.add_argument("--guidance-subject", type=float, default=1.5)
    p.add_argument("--guidance-mode", choices=GUIDANCE_MODES, default="branches",
                   help="branches: three UNet passes a step; interleaved: two (reimagen: Re-Imagen's literal rule)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--caption", nargs="+", default=None, help="one caption per subject photo")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="ddim", metavar="SCHEDULER",
                   help="ddim, dpm++, euler, euler-a, unipc, ... or a diffusers scheduler class name")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp16/bf16 halve memory on a GPU")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="where and how large, as fractions of the image (checkpoints trained with controls)")
    p.add_argument("--keypoints", type=float, nargs=4, metavar=("TOP_X", "TOP_Y", "SIDE_X", "SIDE_Y"),
                   help="the subject's top and right-hand side, as fractions of the image")
    p.add_argument("--edges", help="an outline image (bright lines on dark)")
    p.add_argument("--json", action="store_true", help="print JSON (image paths, seed) instead of the paths")
    p.set_defaults(func=_generate)

    p = sub.add_parser("serve", help="stage 6: serve the HTTP API locally (Ray Serve; serve/config.yaml for clusters)")
    p.add_argument("--checkpoint", default="checkpoints/tiny-32.safetensors")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; other than loopback needs API keys")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", default="runs/subjects", help="folder or URI of registered subjects")
    p.add_argument("--knowledge-base", default=None, help="a knowledge base (ray-suti index) for requests with "
                                                          "\"retrieve\"; {tenant} in it: one per tenant")
    p.add_argument("--replicas", "--max-replicas", dest="max_replicas", type=int, default=2,
                   help="most model replicas (the autoscaler starts at 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="ddim", metavar="SCHEDULER",
                   help="sampler, any allowed diffusers scheduler (dpm++ with --steps 10 per request: same fidelity, 2.6x faster on tiny-32)")
    p.add_argument("--token-file", help="require this file's key as a bearer token (else SUTI_API_TOKEN, else open)")
    p.add_argument("--api-keys-file", help='JSON {"key": "tenant"}: keys and their tenants')
    p.set_defaults(func=_serve)

    p = sub.add_parser("client", help="call a running API (ray_suti.client): register, generate, list, delete")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--token-file", help="the API key, in a file (else SUTI_API_TOKEN)")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("register", help="1-5 photos -> a subject id")
    a.add_argument("photos", nargs="+", help="photos, or a folder of them")
    a.add_argument("--caption", nargs="+", default=None, help="one caption per photo")
    a = actions.add_parser("generate", help="draw a registered subject (or photos sent along)")
    a.add_argument("prompt")
    a.add_argument("--subject-id")
    a.add_argument("--photos", nargs="+", help="instead of --subject-id")
    a.add_argument("--out", default="generated.png", help="output PNG (extra images get -1, -2, ... suffixes)")
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--steps", type=int, default=25)
    a.add_argument("--num-images", type=int, default=1)
    a.add_argument("--guidance-text", type=float, default=1.5)
    a.add_argument("--guidance-subject", type=float, default=1.5)
    actions.add_parser("list", help="your subjects")
    a = actions.add_parser("delete", help="remove a subject and its photos")
    a.add_argument("subject_id")
    p.set_defaults(func=_client)

    p = sub.add_parser("demo", help="run every stage on the embedded default and print the results")
    p.add_argument("--preset", default="default", help="default (< 20 min on 2 cores) or smoke (< 5 min)")
    p.add_argument("--out", default=None, help="artefact folder (default: runs/demo, runs/demo-smoke)")
    p.add_argument("--keep-serving", action="store_true", help="then serve the trained model and its web page "
                                                               "on 127.0.0.1 until Ctrl-C")
    p.add_argument("--port", type=int, default=8000, help="with --keep-serving")
    p.add_argument("--verbose", action="store_true", help="Ray's and the libraries' logs on the terminal too, "
                                                          "not in <out>/logs/demo.log")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
