"""Gradient checkpointing: the same loss and gradients, through the denoiser and the demo-encoding pass."""
import torch

from ray_suti.model import SuTIModel, get_preset
from ray_suti.train.config import TrainConfig
from ray_suti.train.step import start_pipeline


def _batch(cfg, b=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, L = cfg.image_size, cfg.max_text_len
    return dict(target=torch.rand(b, 3, s, s, generator=g) * 2 - 1, prompt_ids=torch.randint(0, 49406, (b, L), generator=g),
                demo_images=torch.rand(b, k, 3, s, s, generator=g) * 2 - 1,
                demo_caption_ids=torch.randint(0, 49406, (b, k, L), generator=g), demo_valid=torch.ones(b, k, dtype=torch.bool))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model.loss(batch, model.noise_scheduler(), demo_grad=True, generator=torch.Generator().manual_seed(1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_keeps_loss_and_gradients():
    cfg = get_preset("tiny-32")
    torch.manual_seed(0)
    model = SuTIModel(cfg).train()
    g = torch.Generator().manual_seed(2)
    for n in model.suti.neighbours.values():  # open the neighbour path, as after training
        n.to_out.weight.data = torch.randn(n.to_out.weight.shape, generator=g) * 0.2
    batch = _batch(cfg)
    loss, grads = _loss_and_grads(model, batch)
    model.enable_gradient_checkpointing()
    assert model.unet.is_gradient_checkpointing and model.text_encoder.is_gradient_checkpointing
    loss_ck, grads_ck = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_ck, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ck.keys() and any(k.startswith("suti.") for k in grads)
    for name in grads:  # the demo pass (down blocks under demo_grad) and the neighbours get the same gradients
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_training_flag_turns_it_on():
    pipe = start_pipeline(TrainConfig(preset="tiny-32", gradient_checkpointing=True))
    assert pipe.unet.is_gradient_checkpointing
