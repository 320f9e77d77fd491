"""CPU of a process that imports the model stack and exits, with ray_suti's GC policy and without.

    python bench/import_cost.py [--rounds 5] [--module ray_suti.model.pipeline] [--out runs/import-cost.json]

Each round starts two fresh interpreters, one per arm, in alternating order: one imports ``--module``
(``import ray_suti`` first applies the policy: full collections 10x rarer, the heap frozen at exit),
the other undoes the policy right after ``import ray_suti`` (CPython's default thresholds, nothing
frozen). Each child's user+system CPU is read from ``wait4``, so its interpreter's exit counts.
Prints the medians and their ratio; writes every round as JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

UNDO = "import atexit, gc, ray_suti; gc.set_threshold(700, 10, 10); atexit.unregister(gc.freeze); "
ARMS = {"policy": "import ray_suti; ", "default": UNDO}


def child_cpu(code: str) -> float:
    """User+system CPU seconds of a fresh interpreter running ``code``, its exit included."""
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the child failed: {code}")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--module", default="ray_suti.model.pipeline")
    parser.add_argument("--out", default="runs/import-cost.json")
    args = parser.parse_args()

    child_cpu(f"import {args.module}")  # bytecode written, files in the page cache
    rounds = []
    for i in range(args.rounds):
        order = list(ARMS) if i % 2 == 0 else list(reversed(ARMS))
        rounds.append({arm: child_cpu(ARMS[arm] + f"import {args.module}") for arm in order})
        print(f"round {i + 1}: " + ", ".join(f"{arm} {s:.2f} s" for arm, s in rounds[-1].items()), flush=True)
    median = {arm: statistics.median(r[arm] for r in rounds) for arm in ARMS}
    ratio = median["policy"] / median["default"]
    print(f"import {args.module} and exit: {median['policy']:.2f} core-s with the policy, "
          f"{median['default']:.2f} without: {ratio:.2f}x")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"module": args.module, "rounds": rounds, "median_s": median, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
