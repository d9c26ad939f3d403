"""How busy other processes keep the machine: benchmarks on a shared machine are only as good as
the idle CPU they get. Used by run.py (between systems) and worker.py (around each measurement)."""
from __future__ import annotations

import os
import resource
import sys
import time

NOISY_CORES = 0.1  # a measurement during which other processes used more CPU is "noisy"


def cpu_snapshot(children: bool = True):
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process [and of its ended
    children], the machine's steal seconds): two snapshots tell how much CPU other processes used
    in between (others_cores), and how much the hypervisor gave other guests (steal_cores).
    Children count as this process's own once waited for (tracejit compiles in forked processes)."""
    busy = steal = None
    try:
        with open("/proc/stat") as f:
            line = f.readline()
        fields = [int(x) for x in line.split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        ticks = parse_steal(line)
        steal = None if ticks is None else ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    whos = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,)
    own = sum(getattr(resource.getrusage(who), k) for who in whos for k in ("ru_utime", "ru_stime"))
    return time.time(), busy, own, steal


def parse_steal(stat_text: str):
    """Steal time in clock ticks from the text of /proc/stat: the 8th number of the `cpu` line
    (user nice system idle iowait irq softirq steal ...), summed over the CPUs; None if absent
    (kernels before 2.6.11, or no such line)."""
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            return int(fields[8]) if len(fields) > 8 else None
    return None


def steal_cores(before, after, seconds: float):
    """Average cores stolen between two steal readings (cpu_snapshot's last field) `seconds`
    apart (None if unknown): time the hypervisor ran something else while this VM's virtual CPUs
    wanted to run."""
    if before is None or after is None or seconds <= 0:
        return None
    return max(0.0, after - before) / seconds


def others_cores(before, after):
    """Average number of cores used by other processes between two snapshots (None if unknown)."""
    if before[1] is None or after[1] is None or after[0] <= before[0]:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def wait_idle(max_seconds, threshold=0.25, children=True):
    """Wait (at most `max_seconds`) until other processes use under `threshold` cores over one
    second; returns how many they used in the last second. Says on stderr when it waits."""
    t0 = time.time()
    said = False
    while True:
        a = cpu_snapshot(children)
        time.sleep(1.0)
        used = others_cores(a, cpu_snapshot(children))
        if used is None or used < threshold or time.time() - t0 >= max_seconds:
            if said:
                print(f"  ... waited {time.time() - t0:.0f} s; other processes now use "
                      f"{used:.2f} cores", file=sys.stderr, flush=True)
            return used
        if not said:
            print(f"  waiting up to {max_seconds:.0f} s for an idle machine (other processes use "
                  f"{used:.2f} cores) ...", file=sys.stderr, flush=True)
            said = True
