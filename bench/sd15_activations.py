"""Bytes the sd15 SuTI UNet saves for backward per example (meta device, bf16), with and without
diffusers gradient checkpointing; K=3 demos encoded without grad, as the training loop does."""
import torch
import torch.fx.experimental._config as fxc
fxc.meta_nonzero_assume_all_nonzero = True
from ray_suti.model.presets import get_preset
from ray_suti.model.suti import SuTIModel

cfg = get_preset("sd15")

def saved_bytes(checkpointing: bool, B=2, K=3):
    with torch.device("meta"):
        model = SuTIModel(cfg).to(torch.bfloat16)
        unet = model  # forward(sample, t, text, demos)
        unet.encode_demos = lambda images, text: model.suti.encode_demos(model.unet, images, text)
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        unet.train()
        x = torch.randn(B, 4, 64, 64, dtype=torch.bfloat16); txt = torch.randn(B, 77, 768, dtype=torch.bfloat16)
        with torch.no_grad():
            feats = unet.encode_demos(torch.randn(B, K, 4, 64, 64, dtype=torch.bfloat16),
                                      torch.randn(B, K, 77, 768, dtype=torch.bfloat16))
        seen, total = set(), 0
        attn = 0
        def pack(t):
            nonlocal total, attn
            key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.dtype)
            if key in seen or isinstance(t, torch.nn.Parameter) or t.requires_grad and t.is_leaf:
                return t
            seen.add(key)
            n = t.numel() * t.element_size()
            total += n
            if t.dim() >= 3 and t.shape[-1] >= 77 and t.shape[-2] >= 256 and t.shape[-1] != t.shape[-3] and t.shape[-1] in (77, 256, 1024, 4096, 3*256, 3*1024, 3*4096):
                attn += n
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, torch.tensor([500] * B), txt, feats)
        return total / B, attn / B

for ck in (False, True):
    tot, att = saved_bytes(ck)
    print(f"checkpointing={ck}: saved for backward per example {tot/2**30:.2f} GiB, of which attention-score-shaped {att/2**30:.2f} GiB")
