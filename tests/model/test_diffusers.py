"""SuTIPipeline as a diffusers DiffusionPipeline: folders, processors, dtypes, schedulers, call conventions."""
import json
import os
import sys
import threading

import numpy as np
import pytest
import torch
from diffusers import (DiffusionPipeline, EulerAncestralDiscreteScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)

from ray_suti import SuTIPipeline
from ray_suti.model import SuTIInputError, SuTILayers
from ray_suti.model.layers import SuTIAttnProcessor
from ray_suti.model.pipeline import guidance_branches, interleaved_run
from ray_suti.model.schedulers import SCHEDULER_NAMES, scheduler_class
from ray_suti.world import Context, render

from ..conftest import REPO, start_early_command

torch.set_num_threads(1)
COMMITTED = str(REPO / "checkpoints" / "tiny-32.safetensors")


def _open_neighbours(pipe, seed=3):
    g = torch.Generator().manual_seed(seed)
    for n in pipe.suti.neighbours.values():  # as after training: demos matter
        n.to_out.weight.data = torch.randn(n.to_out.weight.shape, generator=g) * 0.2
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _open_neighbours(SuTIPipeline.from_preset("tiny-32"))


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("latent") / "suti-latent"
    _open_neighbours(SuTIPipeline.from_preset("tiny-latent")).save_pretrained(str(path))
    return str(path)


def _subject(seed=21, k=3, size=64):
    contexts = [Context(scene="beach"), Context(), Context(scene="snow"), Context(scene="grass")]
    return [render(seed, c, size)[0] for c in contexts[:k]]


def _gen(pipe, seed=0, prompt="a toy on the grass", **kw):
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("output_type", "np")
    return pipe(prompt, kw.pop("subject", _subject()), generator=torch.Generator().manual_seed(seed), **kw).images


# ---- 1. a real DiffusionPipeline -------------------------------------------------------------
def test_a_saved_pipeline_is_a_diffusers_folder_that_diffusion_pipeline_loads(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path / "m"))
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "SuTIPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["suti"][1] == "SuTILayers"
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    assert type(loaded) is SuTIPipeline and isinstance(loaded.unet, UNet2DConditionModel)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_gen(pipe), _gen(loaded))
    # the UNet's weights are exactly a plain UNet's: the SuTI layers live in their own component
    plain = UNet2DConditionModel.from_pretrained(str(tmp_path / "m"), subfolder="unet")
    assert set(plain.state_dict()) == set(loaded.unet.state_dict())
    layers = SuTILayers.from_pretrained(str(tmp_path / "m"), subfolder="suti")
    assert set(layers.state_dict()) == set(pipe.suti.state_dict())


def test_a_latent_suti_folder_is_a_stable_diffusion_folder(latent_folder):
    suti = SuTIPipeline.from_pretrained(latent_folder)
    suti.set_progress_bar_config(disable=True)
    sd = StableDiffusionPipeline.from_pretrained(latent_folder, safety_checker=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ours = suti("a red toy", None, num_inference_steps=3, guidance_scale_text=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    theirs = sd("a red toy", num_inference_steps=3, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)  # same UNet, scheduler, text and noise
    assert np.abs(_gen(suti, subject=_subject()) - ours).max() > 1e-3  # and SuTI does use the demos


def test_half_precision_variants_save_and_load(latent_folder, tmp_path):
    p = SuTIPipeline.from_pretrained(latent_folder, torch_dtype=torch.bfloat16)
    assert p.dtype == torch.bfloat16 and p.suti.dtype == torch.bfloat16
    p.to(torch.float16).save_pretrained(str(tmp_path / "v"), variant="fp16")
    names = [f for _, _, fs in os.walk(tmp_path / "v") for f in fs]
    assert any(f.endswith(".fp16.safetensors") for f in names) and not any(f.endswith((".bin", ".pt")) for f in names)
    again = DiffusionPipeline.from_pretrained(str(tmp_path / "v"), variant="fp16", torch_dtype=torch.float16)
    assert again.dtype == again.unet.dtype == again.suti.dtype == again.text_encoder.dtype == torch.float16
    with pytest.raises(ValueError, match="variant"):
        SuTIPipeline.from_pretrained(str(tmp_path / "v"), variant="bf16")


def test_hub_ids_give_a_clear_error_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local folder"):
        SuTIPipeline.from_pretrained("someone/no-such-suti-model")


# ---- 2. neighbour attention as attention processors --------------------------------------------
def test_processors_carry_the_neighbours_and_nothing_is_stored_on_modules(pipe):
    procs = pipe.unet.attn_processors
    assert all(isinstance(p, SuTIAttnProcessor) for p in procs.values())
    with_neighbours = [p for p in procs.values() if p.neighbour is not None]
    assert len(with_neighbours) == len(pipe.suti.neighbours) > 0
    before = {n: set(vars(m)) for n, m in pipe.unet.named_modules()}
    _gen(pipe)
    assert {n: set(vars(m)) for n, m in pipe.unet.named_modules()} == before


def test_two_threads_with_two_subjects_match_running_them_in_turn(pipe):
    subjects = {"a": _subject(21), "b": _subject(33)}
    alone = {k: _gen(pipe, subject=s, num_inference_steps=6) for k, s in subjects.items()}
    together, barrier = {}, threading.Barrier(2)

    def run(k):
        barrier.wait()
        together[k] = _gen(pipe, subject=subjects[k], num_inference_steps=6)

    threads = [threading.Thread(target=run, args=(k,)) for k in subjects]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in subjects:
        np.testing.assert_array_equal(together[k], alone[k])
    assert np.abs(alone["a"] - alone["b"]).max() > 1e-3


def compile_matches_eager(out: str) -> None:
    """``torch.compile(pipe.unet)`` (inductor) against eager on the same subject and seed, in a process
    of its own: ``python -m tests.model.test_diffusers OUT.json`` writes the largest difference."""
    from torch._dynamo.utils import counters

    pipe = _open_neighbours(SuTIPipeline.from_preset("tiny-32"))
    feats = pipe.encode_subject(_subject())
    eager = _gen(pipe, subject=feats, num_inference_steps=2)
    pipe.unet = torch.compile(pipe.unet)
    compiled = _gen(pipe, subject=feats, num_inference_steps=2)
    with open(out, "w") as f:
        json.dump({"max_abs_diff": float(np.abs(compiled - eager).max()), "graphs": counters["stats"]["unique_graphs"],
                   "graph_breaks": sum(counters["graph_break"].values())}, f)


def start_early(folder):
    """On a cold inductor cache (CI's case) the compilation is ~100 s of CPU, half of it C++: it runs
    from the session's start in the background (tests/conftest.py, ``EarlyRuns``), on the share of
    the cores the other tests leave idle, and the test below joins it. One compiling process: a pool
    of inductor's compile workers would import torch again in each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    return start_early_command([sys.executable, "-m", "tests.model.test_diffusers", str(folder / "compile.json")],
                               folder, background=True, env=env)


def test_torch_compile_of_the_unet_matches_eager(early_run):
    early_run.join(timeout=900)
    result = json.loads((early_run.folder / "compile.json").read_text())
    assert result["graphs"] >= 1 and result["graph_breaks"] == 0, result  # the UNet, whole, really compiled
    assert result["max_abs_diff"] <= 1e-4, result


# ---- 3. half precision -----------------------------------------------------------------------
def _psnr(a, b):
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_bf16_matches_fp32_on_the_committed_model():
    p = SuTIPipeline.from_pretrained(COMMITTED)
    p.set_progress_bar_config(disable=True)
    photos = _subject(seed=40, size=32)
    full = _gen(p, subject=photos, num_inference_steps=5)
    p.to(torch.bfloat16)
    assert p.dtype == torch.bfloat16
    assert p.encode_subject(photos).dtype == torch.bfloat16  # demo features cached in the model's dtype
    half = _gen(p, subject=photos, num_inference_steps=5)
    assert np.isfinite(half).all()
    psnr = _psnr(half, full)
    print(f"bf16 vs fp32 PSNR {psnr:.2f} dB")
    assert psnr >= 25, psnr


def test_fp16_gives_finite_images():
    p = SuTIPipeline.from_pretrained(COMMITTED, torch_dtype=torch.float16)
    p.set_progress_bar_config(disable=True)
    out = _gen(p, subject=_subject(seed=40, size=32), num_inference_steps=3, guidance_scale_text=4.0,
               guidance_scale_subject=2.0)
    assert p.dtype == torch.float16 and np.isfinite(out).all() and out.std() > 0.01


# ---- 4. any diffusers scheduler --------------------------------------------------------------
def test_an_ancestral_scheduler_gets_the_generator_and_survives_save_and_load(pipe, tmp_path):
    p = SuTIPipeline.from_preset("tiny-32")
    _open_neighbours(p)
    p.scheduler = EulerAncestralDiscreteScheduler.from_config(p.scheduler.config)
    torch.manual_seed(1)
    a = _gen(p)
    torch.manual_seed(2)  # the global generator differs: only the call's generator may matter
    b = _gen(p)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - _gen(p, seed=5)).max() > 1e-3
    p.save_pretrained(str(tmp_path / "euler"))
    again = SuTIPipeline.from_pretrained(str(tmp_path / "euler"))
    assert type(again.scheduler) is EulerAncestralDiscreteScheduler
    assert again.scheduler.config.prediction_type == "v_prediction"


def test_scheduler_names_come_from_an_allow_list():
    for name in SCHEDULER_NAMES:
        assert scheduler_class(name).__module__.startswith("diffusers.")
    for bad in ("os.system", "DiffusionPipeline", "__import__", "euler-magic"):
        with pytest.raises(ValueError, match="unknown scheduler"):
            scheduler_class(bad)


# ---- 5. the call conventions of diffusers ----------------------------------------------------
def test_prompt_embeds_latents_and_output_types(pipe):
    ref = _gen(pipe)
    embeds = pipe.encode_prompt(["a toy on the grass"])
    np.testing.assert_array_equal(pipe(prompt_embeds=embeds, subject_images=_subject(), num_inference_steps=4,
                                       generator=torch.Generator().manual_seed(0), output_type="np").images, ref)
    latents = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(_gen(pipe, seed=99, latents=latents), ref)
    raw = _gen(pipe, output_type="latent")
    assert raw.shape == (1, 3, 32, 32) and torch.allclose((raw / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1),
                                                          torch.from_numpy(ref))
    assert _gen(pipe, output_type="pt").shape == (1, 3, 32, 32)
    images = pipe("a toy", _subject(), num_inference_steps=2, return_dict=False)[0]
    assert images[0].size == (32, 32)
    assert np.abs(_gen(pipe, negative_prompt="a red toy") - ref).max() > 1e-3


def test_callback_on_step_end_sees_and_changes_latents(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, int(t), tuple(kwargs["latents"].shape)))
        return {"latents": kwargs["latents"] * 0} if i == 3 else {}

    out = _gen(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][2] == (1, 3, 32, 32)
    np.testing.assert_allclose(out, 0.5)  # zero latents at the end decode to mid-grey
    with pytest.raises(SuTIInputError, match="callback_on_step_end_tensor_inputs"):
        _gen(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


def test_subject_images_as_pil_numpy_and_tensors(pipe):
    from PIL import Image

    arrays = _subject(size=32)
    ref = _gen(pipe, subject=arrays)
    pil = [Image.fromarray(a) for a in arrays]
    floats = np.stack(arrays).astype(np.float32) / 255  # (N, H, W, 3) in [0, 1]
    tensors = torch.from_numpy(floats).permute(0, 3, 1, 2)  # (N, 3, H, W) in [0, 1]
    for form in (pil, floats, tensors, list(tensors)):
        np.testing.assert_array_equal(_gen(pipe, subject=form), ref)
    one = _gen(pipe, subject=pil[0])
    np.testing.assert_array_equal(one, _gen(pipe, subject=[pil[0]]))


def test_num_images_per_prompt_and_model_cpu_offload(pipe):
    two = _gen(pipe, num_images_per_prompt=2)
    assert two.shape == (2, 32, 32, 3) and np.abs(two[0] - two[1]).max() > 1e-3
    assert pipe.model_cpu_offload_seq == "text_encoder->unet->vae"
    p = SuTIPipeline.from_preset("tiny-32")
    _open_neighbours(p)
    ref = _gen(p)
    p.enable_model_cpu_offload(device="cpu")  # the hooks run; on a GPU box they move each model in turn
    np.testing.assert_array_equal(_gen(p), ref)


# ---- 8. interleaved guidance -----------------------------------------------------------------
def test_interleaved_guidance_costs_two_passes_a_step(pipe):
    rows, images = {}, {}
    for mode in ("branches", "interleaved", "reimagen"):
        calls = []
        hook = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        try:
            images[mode] = _gen(pipe, guidance_scale_text=3.0, guidance_scale_subject=2.0, guidance_mode=mode,
                                num_inference_steps=6)
        finally:
            hook.remove()
        rows[mode] = calls  # rows per UNet call: branches x 1 image
    assert rows == {"branches": [3] * 6, "interleaved": [3] + [2] * 5, "reimagen": [2] * 6}
    assert np.abs(images["branches"] - images["interleaved"]).max() > 1e-6  # a direction is carried over
    assert np.abs(images["interleaved"] - images["reimagen"]).max() > 1e-4
    f, s, u = guidance_branches(3.0, 2.0, True, "interleaved", 3)  # text weight 3, subject weight |1 - 2|
    debt = {}
    assert interleaved_run([f, s, u], 0, debt) == [f, s, u]
    picks = ["text" if interleaved_run([f, s, u], i, debt)[1] is f else "subject" for i in range(1, 9)]
    assert picks.count("text") == 6 and picks.count("subject") == 2  # refreshed in proportion to the weights
    even = guidance_branches(2.0, 3.0, True)  # equal weights (2 and |1 - 3|): the two alternate
    debt = {}
    assert [interleaved_run(even, i, debt)[1][1] for i in range(1, 5)] == [True, False, True, False]
    assert guidance_branches(3.0, 2.0, True, "reimagen", 0) == [(3.0, True, True), (-2.0, False, True)]
    assert guidance_branches(3.0, 2.0, True, "reimagen", 1) == [(2.0, True, True), (-1.0, True, False)]
    # equal scales need two branches anyway: interleaved is then exactly the branches mode
    np.testing.assert_array_equal(_gen(pipe, guidance_scale_text=2.0, guidance_scale_subject=2.0),
                                  _gen(pipe, guidance_scale_text=2.0, guidance_scale_subject=2.0,
                                       guidance_mode="interleaved"))
    with pytest.raises(SuTIInputError, match="guidance_mode"):
        _gen(pipe, guidance_mode="alternate")


def test_demo_keys_and_values_are_computed_once_per_call(pipe, monkeypatch):
    """Every step and guidance branch reuses one set of demo keys and values (per-branch sets are
    tiled from it), and the execution device is looked up once per call."""
    ref = _gen(pipe, guidance_scale_text=3.0, guidance_scale_subject=2.0, guidance_mode="interleaved")
    counts = {"kv": 0, "device": 0}
    kv, device = pipe.suti.neighbour_inputs, type(pipe)._execution_device

    def counted_kv(*a, **k):
        counts["kv"] += 1
        return kv(*a, **k)

    def counted_device(self):
        counts["device"] += 1
        return device.fget(self)

    monkeypatch.setattr(pipe.suti, "neighbour_inputs", counted_kv)
    monkeypatch.setattr(type(pipe), "_execution_device", property(counted_device))
    out = _gen(pipe, guidance_scale_text=3.0, guidance_scale_subject=2.0, guidance_mode="interleaved")
    assert counts == {"kv": 1, "device": 1}  # three branch sets over the steps, one computation
    np.testing.assert_array_equal(out, ref)


if __name__ == "__main__":  # the early run of test_torch_compile_of_the_unet_matches_eager
    compile_matches_eager(sys.argv[1])
