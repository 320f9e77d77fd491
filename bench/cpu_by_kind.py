"""CPU seconds by kind of process while a command runs: where a test suite's or a demo's CPU goes.

    python bench/cpu_by_kind.py [--out runs/cpu-by-kind.txt] -- make test

Polls /proc every half second; a process counts from its start (its CPU before the first poll
included) to the last poll that saw it, so processes shorter than a poll are missed. Kinds: Ray
actors and workers by their title at each poll (``ray::TrainController``; a task worker's CPU under
the task it ran, ``ray::MapBatches``, and between tasks under ``ray::IDLE``), Ray's daemons by
name, ``pytest`` and its xdist workers, ``cli: <subcommand>``, else the program's name. Prints the
table (and writes it to ``--out``): seconds, processes, kind; then the idle core-seconds minute by
minute and the ``--processes`` costliest processes, each with the start of its command line.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import time

DAEMONS = {"gcs_server": "gcs_server", "raylet/raylet": "raylet", "dashboard/dashboard.py": "dashboard",
           "ray-dashboard-": "dashboard-module", "dashboard/agent.py": "dashboard-agent",
           "log_monitor": "log_monitor", "runtime_env/agent": "runtime_env_agent"}


def kind(cmdline: str) -> str:
    title = re.match(r"(ray::[A-Za-z_]+)", cmdline)
    if title:
        return title.group(1)
    for needle, name in DAEMONS.items():
        if needle in cmdline:
            return name
    if "ray_suti.cli" in cmdline or "ray-suti" in cmdline:
        words = cmdline.split()
        at = next((i for i, w in enumerate(words) if w.endswith(("ray_suti.cli", "ray-suti"))), 0)
        return "cli: " + " ".join(words[at + 1:at + 2])
    words = cmdline.split()
    if "pytest" in " ".join(words[:3]):  # the program, not a path it was given
        return "pytest"
    if "exec(eval(sys.stdin.readline()))" in cmdline:  # execnet's bootstrap
        return "pytest (xdist worker)"
    return os.path.basename(cmdline.split()[0])[:30] if cmdline.strip() else "?"


def poll(seen: dict, me: int, first: bool = False) -> None:
    """seen: (pid, start time) -> [CPU ticks at first sight, latest CPU ticks, kind, command line,
    ticks by kind]. A poll's ticks go to the process's title then: a Ray task worker's CPU to the
    task it ran (``ray::MapBatches``), its idle polling to ``ray::IDLE``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline") as f:
                cmdline = f.read().replace("\0", " ")
        except OSError:
            continue  # it ended meanwhile
        ticks, key = int(fields[11]) + int(fields[12]), (pid, fields[19])
        if key not in seen:  # processes already running at the start count from there
            start = ticks if first else 0
            seen[key] = [start, ticks, kind(cmdline), cmdline, collections.Counter({kind(cmdline): ticks - start})]
        else:
            if cmdline:  # a Ray worker's title changes as it runs actors and tasks
                seen[key][2:4] = kind(cmdline), cmdline
            seen[key][4][seen[key][2]] += ticks - seen[key][1]
            seen[key][1] = ticks


def busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def idle_by_minute(busy: list, start: float, hz: int) -> list:
    """(minute, core-seconds the machine's cores sat idle in it) from (time, busy ticks) samples."""
    idle: dict = collections.defaultdict(float)
    for (t0, b0), (t1, b1) in zip(busy, busy[1:]):
        idle[int((t0 - start) // 60)] += max(0.0, (t1 - t0) * os.cpu_count() - (b1 - b0) / hz)
    return sorted(idle.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--processes", type=int, default=0, help="also list this many costliest processes")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    seen: dict = {}
    poll(seen, os.getpid(), first=True)
    start, process = time.time(), subprocess.Popen(command)
    busy = [(start, busy_ticks())]  # the whole machine's, for the idle cores minute by minute
    while process.poll() is None:
        time.sleep(0.5)
        poll(seen, os.getpid())
        busy.append((time.time(), busy_ticks()))
    hz, seconds, count = os.sysconf("SC_CLK_TCK"), collections.Counter(), collections.Counter()
    for *_, by_kind in seen.values():
        for name, ticks in by_kind.items():
            seconds[name] += ticks / hz
            count[name] += ticks > 0 or len(by_kind) == 1
    lines = [f"{time.time() - start:.0f} s wall, {sum(seconds.values()):.1f} s CPU in all, exit {process.returncode}"]
    lines += [f"{s:8.1f} s {count[k]:5d}  {k}" for k, s in seconds.most_common(args.top)]
    lines.append("idle core-s by minute: " + " ".join(f"{m}:{idle:.0f}" for m, idle in idle_by_minute(busy, start, hz)))
    costliest = sorted(seen.values(), key=lambda p: p[0] - p[1])[:args.processes]
    lines += [f"{(last - first) / hz:8.1f} s  {cmdline[:150]}" for first, last, _, cmdline, _ in costliest]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
