#!/usr/bin/env python3
"""Memory of each running machine of a Hangar data dir: its pilot and every
process below it (a sandbox's init and workload), from smaps_rollup.

    python3 benches/machine_memory.py <data dir>

Prints a line per process kind and, last, one JSON object: machines, and
per machine the mean PSS and private kB (RSS counts Hangar's binary, one
shared file, in every process; PSS shares it out).
"""
import json
import os
import re
import sys


def field(rollup, name):
    m = re.search(rf"^{name}:\s+(\d+)", rollup, re.M)
    return int(m.group(1)) if m else 0


def main():
    data = os.path.realpath(sys.argv[1])
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            parent[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    children = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)

    def cmdline(pid):
        try:
            return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    pilots = [p for p in parent if f"pilot --dir {data}/machines/" in cmdline(p)]
    kinds = {}
    for pilot in pilots:
        todo = [(pilot, "pilot")]
        while todo:
            pid, kind = todo.pop()
            try:
                rollup = open(f"/proc/{pid}/smaps_rollup").read()
            except OSError:
                continue
            pss = field(rollup, "Pss")
            private = field(rollup, "Private_Clean") + field(rollup, "Private_Dirty")
            k = kinds.setdefault(kind, [0, 0])
            k[0] += pss
            k[1] += private
            for child in children.get(pid, []):
                below = "init" if kind == "pilot" and " init -- " in cmdline(child) else "workload"
                todo.append((child, below))
    n = max(len(pilots), 1)
    for kind, (pss, private) in sorted(kinds.items()):
        print(f"{kind:10} per machine: PSS {pss / n:8.0f} kB, private {private / n:8.0f} kB")
    total = [sum(v[i] for v in kinds.values()) / n for i in (0, 1)]
    print(json.dumps({"bench": "machine_memory", "machines": len(pilots),
                      "pss_kb": round(total[0]), "private_kb": round(total[1]),
                      "by_kind_pss_kb": {k: round(v[0] / n) for k, v in kinds.items()}}))


if __name__ == "__main__":
    main()
