"""The training loop's start-up on CPU: DeepSpeed's comm backend compiles no C++ kernel (its
shared-memory all-reduce serves only inference; training reduces through gloo)."""
import os

from ray_suti.train import loop


def test_the_cpu_comm_backend_builds_no_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    name = get_accelerator().create_op_builder("ShareMemCommBuilder").NAME
    assert deepspeed.ops.__compatible_ops__[name]  # left alone, the backend would compile it here
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, name, True)  # restored after the test
    loop.skip_cpu_inference_comm_op()
    assert build_shm_op() is None and os.listdir(tmp_path) == []
