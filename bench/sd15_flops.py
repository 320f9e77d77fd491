"""FLOPs of the sd15 SuTI UNet on the meta device (no weights, no memory): base forward, with K demos."""
import torch
import torch.fx.experimental._config as fxc
fxc.meta_nonzero_assume_all_nonzero = True  # every example has demos
from torch.utils.flop_counter import FlopCounterMode
from ray_suti.model.presets import get_preset
from ray_suti.model.suti import SuTIModel

cfg = get_preset("sd15")
with torch.device("meta"):
    model = SuTIModel(cfg)
    unet = model  # forward(sample, t, text, demos)
    unet.encode_demos = lambda images, text: model.suti.encode_demos(model.unet, images, text)
    B, K = 1, 3
    x = torch.randn(B, 4, 64, 64); txt = torch.randn(B, 77, 768); t = torch.tensor([500])
    def count(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()
    base = count(lambda: unet(x, t, txt, None))
    demos_images = torch.randn(B, K, 4, 64, 64); demo_txt = torch.randn(B, K, 77, 768)
    enc = count(lambda: unet.encode_demos(demos_images, demo_txt))
    with torch.no_grad():
        feats = unet.encode_demos(demos_images, demo_txt)
    withd = count(lambda: unet(x, t, txt, feats))
    # training step on meta: forward + backward (trainable UNet incl. neighbours)
    def step():
        out = unet(x, t, txt, feats); out.float().pow(2).mean().backward()
    train = count(step)
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel
with torch.device("meta"):
    vae = AutoencoderKL(**cfg.vae); img = torch.randn(1, 3, 512, 512)
    vae_enc = count(lambda: vae.encode(img).latent_dist.mean)
    te = CLIPTextModel(CLIPTextConfig(**cfg.text)); ids = torch.zeros(1, 77, dtype=torch.long)
    txt_f = count(lambda: te(ids))
print(f"VAE encode 512 px image       : {vae_enc/1e9:8.1f} GFLOP")
print(f"text encoder, 77 tokens       : {txt_f/1e9:8.1f} GFLOP")
print(f"UNet forward, no demos        : {base/1e9:8.1f} GFLOP")
print(f"demo encoding, K={K} (down path): {enc/1e9:8.1f} GFLOP")
print(f"UNet forward with K={K} demos   : {withd/1e9:8.1f} GFLOP  (neighbour attention +{(withd-base)/1e9:.1f})")
print(f"fwd+bwd with K={K} demos (demos encoded once, no demo grad): {train/1e9:8.1f} GFLOP")
