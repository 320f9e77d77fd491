"""`--adapter-only`: IP-Adapter's recipe, the base frozen and only the SuTI layers trained and exported."""
import numpy as np
import torch

from ray_suti import SuTIPipeline
from ray_suti.train.config import TrainConfig
from ray_suti.train.local import train_local
from ray_suti.world import Context, render
from ray_suti.world.oracle import OracleConfig, write_oracle_shard

from ..conftest import REPO

COMMITTED = str(REPO / "checkpoints" / "tiny-32.safetensors")


def test_adapter_only_training_moves_only_the_suti_layers_and_exports_them(tmp_path):
    (tmp_path / "data").mkdir()
    write_oracle_shard(OracleConfig(out=str(tmp_path / "data"), examples=16, examples_per_shard=16), 0)
    start = int(SuTIPipeline.single_file_metadata(COMMITTED)["step"])  # the file's step count carries on
    cfg = TrainConfig(data=str(tmp_path / "data"), init_from=COMMITTED, adapter_only=True, steps=start + 2, batch_size=4,
                      noise_repeats=1, new_lr=1e-2, warmup_steps=1, ema_decay=0.0, probe_every=0, report_every=1, checkpoint_every=100,
                      storage_path=str(tmp_path / "runs"), export_file=str(tmp_path / "m.safetensors"),
                      export_adapter=str(tmp_path / "suti.safetensors"))
    train_local(cfg, loader_workers=0)
    before, after = SuTIPipeline.from_pretrained(COMMITTED), SuTIPipeline.from_pretrained(str(tmp_path / "m.safetensors"))
    for name in ("unet", "text_encoder"):  # the base model is exactly as it was
        a, b = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    old, new = before.suti.state_dict(), after.suti.state_dict()
    assert any(not torch.equal(old[k], new[k]) for k in old)  # the SuTI layers learnt
    # the adapter file alone turns the frozen base into the trained model
    moved = before.load_suti_adapter(str(tmp_path / "suti.safetensors"))
    for p in (moved, after):
        p.set_progress_bar_config(disable=True)
    photos = [render(40, Context(scene=s), 32)[0] for s in ("beach", "snow")]
    run = lambda p: p("a toy", photos, num_inference_steps=3, output_type="np",  # noqa: E731
                      generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(run(moved), run(after))
