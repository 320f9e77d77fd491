"""CPU per process over a window, from /proc: what shares the cores during a load test.

    python bench/cpu_by_process.py [--seconds 20] [--top 15]

Prints the busy cores in all and each process's share of one core (user + system time over the
window), its command line cut short. Processes that start or end inside the window count from
when they are first or last seen.
"""
import argparse
import os
import time


def snapshot() -> tuple[dict, dict]:
    ticks, names = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                names[pid] = f.read().replace("\0", " ")[:80]
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass  # it ended meanwhile
    return ticks, names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    before, _ = snapshot()
    t0 = time.time()
    time.sleep(args.seconds)
    after, names = snapshot()
    wall, hz = time.time() - t0, os.sysconf("SC_CLK_TCK")
    share = {pid: (t - before.get(pid, t)) / hz / wall for pid, t in after.items()}
    print(f"busy cores in all: {sum(share.values()):.3f}")
    for pid, s in sorted(share.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{100 * s:6.1f}%  {pid:>7}  {names.get(pid) or '?'}")


if __name__ == "__main__":
    main()
