"""TorchServe's /metrics (Prometheus text format) as numbers: what the tests and bench.serving read
of the handler's metrics and TorchServe's own."""
from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*?),?\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, labels without Hostname): value}; comment lines are passed over."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = frozenset((k, v) for k, v in _LABEL.findall(m.group(2) or "") if k.lower() != "hostname")
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples called `name` that carry (at least) these labels."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
