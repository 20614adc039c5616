"""Run a module as `python -m MODULE ARGS...` and write this process's peak RSS (VmHWM) to a file at exit.

    python -m bench.peak_rss OUT.json ingest run --inbox ...

wait4(2)'s ru_maxrss is no use here: it carries the parent's high-water mark across fork+exec,
so a child of a process that loaded ResNet-50 "peaks" at the parent's size. VmHWM belongs to the
address space, which exec replaces, so it is this program's own peak.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    out, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        Path(out).write_text(json.dumps({"vm_hwm_kib": vm_hwm_kib()}))


if __name__ == "__main__":
    main()
