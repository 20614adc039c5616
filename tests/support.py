"""Helpers the test files share that are not fixtures: a handler in TorchServe's MockContext, tiny
training runs, an archive unpacked. Fixtures live in conftest.py; test files import nothing from each other.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import yaml
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

import ts
from handler.refund_handler import RefundClassifierHandler
from serving.archive import MODEL_NAME
from training import train

IMAGE_SIZE = (32, 32)
# The tiny recipe: seconds on a CPU.
TINY = ["--arch", "tinynet", "--image-size", *map(str, IMAGE_SIZE), "--batch-size", "16", "--lr", "0.01"]


# -- training --------------------------------------------------------------------------------

def run_train(*argv: str) -> Path:
    """training.train's command line, in-process."""
    return train.main(train.get_args_parser().parse_args(list(argv)))


def train_tiny(data_dir: Path, out: Path, *extra: str, epochs: int = 10) -> Path:
    run_train("--data-dir", str(data_dir), "--out", str(out), "--epochs", str(epochs), *TINY, *extra)
    return out


def extract(mar: Path, out: Path) -> Path:
    """A .mar unpacked into `out`, as TorchServe unpacks it for its workers."""
    with zipfile.ZipFile(mar) as z:
        z.extractall(out)
    return out


# -- the handler -----------------------------------------------------------------------------

DEFAULT_METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"


class RecordingMetrics(MetricsCacheYamlImpl):
    """TorchServe's real metrics cache (as a worker has it), remembering what was added."""

    def __init__(self):
        super().__init__(config_file_path=str(DEFAULT_METRICS_YAML))
        self.model_name = MODEL_NAME
        self.initialize_cache()
        self.recorded: list[tuple[str, float, dict]] = []

    def _parse_yaml_file(self, config_file_path) -> None:  # ts leaves the file open (a ResourceWarning)
        with open(config_file_path, encoding="utf-8") as f:
            self._parsed_file = yaml.safe_load(f)

    def add_metric(self, name, value, unit, idx=None, dimensions=[], metric_type=None):  # noqa: B006 (mirrors ts)
        self.recorded.append((name, value, {d.name: d.value for d in dimensions}))
        super().add_metric(name, value, unit, idx, dimensions, metric_type)

    def values(self, name: str, **labels) -> list[float]:
        return [v for n, v, dims in self.recorded if n == name and all(dims.get(k) == x for k, x in labels.items())]


class RecordingContext(MockContext):
    """MockContext plus the per-request status TorchServe's real Context keeps, and a real metrics cache."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.statuses: dict[int, tuple[int, str]] = {}
        self.metrics = RecordingMetrics()

    def set_response_status(self, code=200, phrase="", idx=0):
        self.statuses[idx] = (code, phrase)


def make_handler(model_dir: Path, gpu_id: str | None = None) -> tuple[RefundClassifierHandler, RecordingContext]:
    """The handler initialized on an extracted archive, as a TorchServe worker does (gpu_id: CUDA)."""
    ctx = RecordingContext(model_pt_file="weights.pt", model_dir=str(model_dir), model_file=None, gpu_id=gpu_id,
                           model_name=MODEL_NAME, model_yaml_config_file="model-config.yaml")
    ctx.manifest["model"].update(modelName=MODEL_NAME, modelVersion="1")
    h = RefundClassifierHandler()
    h.initialize(ctx)
    h.context = ctx
    return h, ctx
