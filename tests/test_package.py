"""What importing ``ray_suti`` does to a process: its GC policy (ray_suti/__init__.py)."""
import subprocess
import sys


def test_importing_ray_suti_makes_full_collections_rarer_and_freezes_the_heap_at_exit():
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))  # first in: runs last\n"
            "print('before:', gc.get_threshold())\n"
            "import ray_suti\n"
            "print('after:', gc.get_threshold(), 'frozen:', gc.get_freeze_count() > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["before: (700, 10, 10)", "after: (700, 10, 100) frozen: False", "frozen at exit: True"]
