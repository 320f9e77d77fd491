"""FLOPs of the sd15 SuTI model per training example, counted on the meta device (no weights, no
memory): the encoders (VAE, text) and the UNet's forward, demo encoding and training step.

    .venv/bin/python bench/sd15_flops.py
"""
import torch
import torch.fx.experimental._config as fxc
from torch.utils.flop_counter import FlopCounterMode

from ray_suti.model.presets import get_preset
from ray_suti.model.suti import SuTIModel

fxc.meta_nonzero_assume_all_nonzero = True  # every example has demos


def _count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def count_sd15(demos: int = 3) -> dict:
    """GFLOP of one example with ``demos`` demos (batch 1, 512 px, 77 tokens)."""
    cfg = get_preset("sd15")
    with torch.device("meta"):
        model = SuTIModel(cfg)
        x, txt, t = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768), torch.tensor([500])
        demo_latents, demo_txt = torch.randn(1, demos, 4, 64, 64), torch.randn(1, demos, 77, 768)
        base = _count(lambda: model(x, t, txt, None))
        enc = _count(lambda: model.suti.encode_demos(model.unet, demo_latents, demo_txt))
        with torch.no_grad():
            feats = model.suti.encode_demos(model.unet, demo_latents, demo_txt)
        feats.valid = torch.ones(1, demos, dtype=torch.bool, device="cpu")  # real (CPU) flags: the no-padding check reads them
        with_demos = _count(lambda: model(x, t, txt, feats))
        train = _count(lambda: model(x, t, txt, feats).float().pow(2).mean().backward())
        vae = _count(lambda: model.vae.encode(torch.randn(1, 3, 512, 512)).latent_dist.mean)
        text = _count(lambda: model.text_encoder(input_ids=torch.zeros(1, 77, dtype=torch.long)))
    g = 1e9
    return {"demos": demos, "vae_encode_512px": vae / g, "text_encoder_77_tokens": text / g, "unet_forward": base / g,
            "demo_encoding": enc / g, "unet_forward_with_demos": with_demos / g, "train_fwd_bwd_with_demos": train / g}


if __name__ == "__main__":
    f = count_sd15()
    k = f["demos"]
    print(f"VAE encode 512 px image       : {f['vae_encode_512px']:8.1f} GFLOP")
    print(f"text encoder, 77 tokens       : {f['text_encoder_77_tokens']:8.1f} GFLOP")
    print(f"UNet forward, no demos        : {f['unet_forward']:8.1f} GFLOP")
    print(f"demo encoding, K={k} (down path): {f['demo_encoding']:8.1f} GFLOP")
    print(f"UNet forward with K={k} demos   : {f['unet_forward_with_demos']:8.1f} GFLOP  "
          f"(neighbour attention +{f['unet_forward_with_demos'] - f['unet_forward']:.1f})")
    print(f"fwd+bwd with K={k} demos (demos encoded once, no demo grad): {f['train_fwd_bwd_with_demos']:8.1f} GFLOP")
