"""SuTI with the diffusers ecosystem: as an adapter file, with LoRAs, ControlNets and T2I-Adapters."""
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, T2IAdapter
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from ray_suti import SuTIPipeline
from ray_suti.model import SuTIInputError, SuTILayers

from .test_diffusers import _gen, _open_neighbours, _subject

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe():
    return _open_neighbours(SuTIPipeline.from_preset("tiny-32"))


# ---- 6. SuTI as an adapter onto any SD 1.x-shaped checkpoint ------------------------------------
def test_the_adapter_file_moves_suti_onto_a_stable_diffusion_folder(tmp_path):
    suti = _open_neighbours(SuTIPipeline.from_preset("tiny-latent"))
    suti.save_pretrained(str(tmp_path / "full"))
    suti.save_suti_adapter(str(tmp_path / "suti.safetensors"), dtype=torch.float32)
    sd = StableDiffusionPipeline.from_pretrained(str(tmp_path / "full"), safety_checker=None,
                                                 requires_safety_checker=False)
    sd.save_pretrained(str(tmp_path / "sd"))  # a folder with no SuTI in it
    rebuilt = SuTIPipeline.from_base(str(tmp_path / "sd"), adapter=str(tmp_path / "suti.safetensors"))
    rebuilt.set_progress_bar_config(disable=True)
    # the same weights; a loaded model's CPU kernels may round differently from a fresh one's (~1e-6)
    np.testing.assert_allclose(_gen(rebuilt), _gen(suti), atol=1e-5)
    # ... and onto a pipeline that has none yet
    text_only = SuTIPipeline.from_base(str(tmp_path / "sd")).unload_suti_adapter()
    text_only.set_progress_bar_config(disable=True)
    with pytest.raises(SuTIInputError, match="no SuTI layers"):
        _gen(text_only)
    np.testing.assert_allclose(_gen(text_only.load_suti_adapter(str(tmp_path / "suti.safetensors"))), _gen(suti),
                               atol=1e-5)


def test_an_adapter_for_another_unet_shape_is_refused(pipe, tmp_path):
    pipe.save_suti_adapter(str(tmp_path / "tiny32.safetensors"))
    latent = SuTIPipeline.from_preset("tiny-latent")
    with pytest.raises(ValueError, match="another UNet shape"):
        latent.load_suti_adapter(str(tmp_path / "tiny32.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(Exception):
        SuTILayers.from_adapter(str(tmp_path / "junk.safetensors"))


def test_adapter_sizes():
    from bench.adapter_size import adapter_sizes

    sizes = adapter_sizes(["tiny-32"])
    assert 0 < sizes["tiny-32"]["adapter_mb_fp16"] < sizes["tiny-32"]["full_mb_fp16"] / 3


# ---- 7. LoRA ---------------------------------------------------------------------------------
def test_a_dreambooth_expert_lora_loads_and_unloads_bit_exactly(pipe, tmp_path):
    from ray_suti.apprentice.dreambooth import DreamBoothConfig, dreambooth_expert, with_identifier

    before = _gen(pipe, subject=None)
    cfg = DreamBoothConfig(steps=3, batch_size=2, sample_steps=4)
    with dreambooth_expert(pipe, _subject(k=2, size=32), None, "toy", cfg) as expert:
        expert.save_lora(str(tmp_path / "lora"))
        tuned = expert.sample(["a toy on the grass"], seed=0)
    np.testing.assert_array_equal(_gen(pipe, subject=None), before)  # the expert cleaned up after itself
    pipe.load_lora_weights(str(tmp_path / "lora"))
    try:
        with_lora = _gen(pipe, subject=None)
        assert np.abs(with_lora - before).max() > 1e-4
        again = pipe([with_identifier("a toy on the grass", "toy", cfg.identifier)], None, num_inference_steps=4, guidance_scale_text=1.5,
                     generator=torch.Generator().manual_seed(0), output_type="np").images
        np.testing.assert_allclose(again, tuned, atol=1e-5)  # draws what the expert drew
    finally:
        pipe.unload_lora_weights()
    np.testing.assert_array_equal(_gen(pipe, subject=None), before)


def test_a_diffusers_format_lora_with_text_encoder_layers(pipe, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    before = _gen(pipe)
    torch.manual_seed(0)
    layers = {}
    for name, targets in (("unet", ["to_k", "to_q", "to_v"]), ("text_encoder", ["q_proj", "v_proj"])):
        model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets),
                                        copy.deepcopy(getattr(pipe, name)))  # a LoRA trained elsewhere
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        layers[name] = get_peft_model_state_dict(model)
    unet_layers, text_layers = layers["unet"], layers["text_encoder"]
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora2"), unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_layers)
    pipe.load_lora_weights(str(tmp_path / "lora2"), adapter_name="style")
    try:
        assert any("lora" in n for n, _ in pipe.text_encoder.named_parameters())  # both parts loaded
        assert np.abs(_gen(pipe) - before).max() > 1e-4
    finally:
        pipe.unload_lora_weights()
    np.testing.assert_array_equal(_gen(pipe), before)


# ---- 7. ControlNet and T2I-Adapter -----------------------------------------------------------
def _active_controlnet(unet, seed):
    # conditions come at the image's size; a pixel-space UNet needs no downsampling of them
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,))
    g = torch.Generator().manual_seed(seed)
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:  # zero convs, as after training
        conv.weight.data = torch.randn(conv.weight.shape, generator=g) * 0.05
    return net


def _with(pipe, **components):
    return SuTIPipeline(**{**pipe.components, **components})


def test_a_controlnet_at_scale_zero_is_exactly_none(pipe):
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 8] = 255
    p = _with(pipe, controlnet=_active_controlnet(pipe.unet, 0))
    p.set_progress_bar_config(disable=True)
    none = _gen(pipe)
    np.testing.assert_array_equal(_gen(p), none)  # a controlnet but no control image
    np.testing.assert_array_equal(_gen(p, control_image=edges, controlnet_conditioning_scale=0.0), none)
    full = _gen(p, control_image=edges)
    assert np.abs(full - none).max() > 1e-4
    early = _gen(p, control_image=edges, control_guidance_end=0.5)  # only the first half of the steps
    assert np.abs(early - full).max() > 1e-5 and np.abs(early - none).max() > 1e-5
    with pytest.raises(SuTIInputError, match="control_guidance_start"):
        _gen(p, control_image=edges, control_guidance_start=0.8, control_guidance_end=0.2)


def test_several_controlnets_and_a_t2i_adapter(pipe):
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[4:12, 4:28] = 255
    nets = [_active_controlnet(pipe.unet, 1), _active_controlnet(pipe.unet, 2)]
    p = _with(pipe, controlnet=nets)
    assert isinstance(p.controlnet, MultiControlNetModel)
    p.set_progress_bar_config(disable=True)
    none = _gen(pipe)
    np.testing.assert_array_equal(_gen(p, control_image=[edges, edges], controlnet_conditioning_scale=[0.0, 0.0]), none)
    assert np.abs(_gen(p, control_image=[edges, edges], controlnet_conditioning_scale=[1.0, 0.5]) - none).max() > 1e-4
    with pytest.raises(SuTIInputError, match="2 controlnets"):
        _gen(p, control_image=[edges])

    with pytest.raises(SuTIInputError, match="T2I adapter"):
        _gen(pipe, adapter_image=edges)


def test_a_t2i_adapter_on_a_stable_diffusion_shaped_unet(tmp_path):
    from .test_pipeline import _sd_shaped_folder

    _sd_shaped_folder(tmp_path / "sd")  # SD's block layout (cross-attention first), 16 px through its VAE
    base = _open_neighbours(SuTIPipeline.from_base(str(tmp_path / "sd"), neighbour_levels=(0, 1), neighbour_heads=4))
    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter")
    a = _with(base, adapter=adapter)
    a.set_progress_bar_config(disable=True)
    edges = np.zeros((16, 16, 3), np.uint8)
    edges[4:12, 6] = 255
    none = _gen(base, subject=_subject(k=2))
    np.testing.assert_array_equal(_gen(a, subject=_subject(k=2), adapter_image=edges, adapter_conditioning_scale=0.0),
                                  none)
    assert np.abs(_gen(a, subject=_subject(k=2), adapter_image=edges) - none).max() > 1e-4
