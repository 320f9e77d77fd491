"""The training loop's start-up: on CPU DeepSpeed's comm backend compiles no C++ kernel (its
shared-memory all-reduce serves only inference; training reduces through gloo), and a worker's rows
are read ahead in a thread while the model is set up."""
import itertools
import os
import threading
import time

import pytest

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


def test_rows_are_read_ahead_while_the_reader_is_busy_in_order_and_bounded():
    pulled, started = [], threading.Event()

    def rows():
        for i in itertools.count():
            started.set()
            pulled.append(i)
            yield i

    ahead = loop.ReadAhead(rows(), depth=2)
    assert started.wait(5)  # reading began before anyone asked (the worker is still setting up)
    time.sleep(0.3)
    assert len(pulled) <= 2 + 2  # the queue's depth, one held by the thread, one being made
    assert list(itertools.islice(ahead, 5)) == [0, 1, 2, 3, 4]
    ahead.close()
    time.sleep(0.3)
    stopped_at = len(pulled)
    time.sleep(0.3)
    assert len(pulled) == stopped_at  # closed: the thread stopped pulling


def test_an_error_while_reading_ahead_reaches_the_reader():
    def rows():
        yield 1
        raise OSError("shard vanished")

    with pytest.raises(OSError, match="shard vanished"):
        list(loop.ReadAhead(rows()))
    assert list(loop.ReadAhead(iter([1, 2]))) == [1, 2]  # a finite iterable ends the reader's loop
