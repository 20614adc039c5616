"""The model archive (.mar): its name and what it says about itself, read without torch.

A .mar is a zip file that torch-model-archiver writes (`training.export` drives it):

    MAR-INF/MANIFEST.json   {"model": {"modelName", "modelVersion", "serializedFile", "configFile", ...}}
    model-config.yaml       TorchServe's per-model settings (batching, workers, handler options)
    model_meta.json         arch, num_classes, preprocessing, calibration, version (training.export)
    index_to_name.json      {"0": class, ...}
    weights.pt              the state_dict (its name is the manifest's serializedFile)
    sample/                 a Kaggle-layout labelled sample for `serving rollout` (optional)

This is the one reader of that format: serving (rollouts), training (checkpoint.load_archive_model)
and the benchmarks use it; only zipfile, json and yaml are needed, so serving stays torch-free.
"""
from __future__ import annotations

import json
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

# The TorchServe model name: URLs (/predictions/refund_classifier), archive file names, the
# rollout state file. ingest/settings.py keeps its own default literal (ingest stays apart).
MODEL_NAME = "refund_classifier"
# The label of the "not a refund category" output (handler/refund_inference.py's OTHER_LABEL,
# repeated here so serving stays torch-free; a test holds them equal). A rollout sample's
# images labelled so are out-of-category photos.
OTHER_LABEL = "other"

# Where an archive may carry its sample (see docs/ROLLOUTS.md): a Kaggle-layout folder
# `sample/` (sample/styles.csv + sample/images/<id>.jpg), or `sample.csv` at the top with the
# images in `sample/images/` or `images/`.
SAMPLE_CSVS = ("sample/styles.csv", "sample.csv")
SAMPLE_IMAGE_DIRS = ("sample/images/", "images/")


class ArchiveError(RuntimeError):
    pass


def archive_name(version: str, model_name: str = MODEL_NAME) -> str:
    """The model store names each archive after its model and version: refund_classifier-2.mar."""
    return f"{model_name}-{version}.mar"


@dataclass(frozen=True)
class Archive:
    path: Path
    model: str
    version: str
    config: dict  # the archive's model-config.yaml (workers, batching), {} when it has none
    manifest: dict = field(default_factory=dict, compare=False)  # MAR-INF/MANIFEST.json, whole
    meta: dict = field(default_factory=dict, compare=False)  # model_meta.json, {} when it has none

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def weights_file(self) -> str:
        """The state_dict's name inside the archive (the manifest's serializedFile)."""
        return self.manifest["model"]["serializedFile"]

    def classes(self) -> list[str]:
        """index_to_name.json as a list, index order."""
        names = json.loads(self.read("index_to_name.json"))
        return [names[str(i)] for i in range(len(names))]

    def read(self, member: str) -> bytes:
        """One file of the archive, as bytes."""
        try:
            with zipfile.ZipFile(self.path) as z:
                return z.read(member)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise ArchiveError(f"{self.path}: cannot read {member}: {exc}") from exc


def read_archive(path: Path) -> Archive:
    """Model name, version, model-config.yaml and model_meta.json of a .mar, from its MAR-INF/MANIFEST.json."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
            model = manifest["model"]
            config_file = model.get("configFile")
            config = yaml.safe_load(z.read(config_file)) if config_file else {}
            meta = json.loads(z.read("model_meta.json")) if "model_meta.json" in names else {}
    except FileNotFoundError as exc:
        raise ArchiveError(f"archive {path} does not exist") from exc
    except (zipfile.BadZipFile, KeyError, ValueError, yaml.YAMLError) as exc:
        raise ArchiveError(f"{path} is not a readable model archive (.mar): {exc}") from exc
    return Archive(path=path, model=model["modelName"], version=str(model["modelVersion"]), config=config or {},
                   manifest=manifest, meta=meta)


@contextmanager
def archive_sample(archive: Archive) -> Iterator[Path | None]:
    """Extract the sample the archive carries into a temporary Kaggle-layout folder; None if it has none."""
    with zipfile.ZipFile(archive.path) as z:
        names = set(z.namelist())
        csv = next((c for c in SAMPLE_CSVS if c in names), None)
        images = next((d for d in SAMPLE_IMAGE_DIRS if any(n.startswith(d) and n != d for n in names)), None)
        if csv is None or images is None:
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="rollout-sample-") as tmp:
            out = Path(tmp)
            (out / "images").mkdir()
            (out / "styles.csv").write_bytes(z.read(csv))
            for n in names:
                if n.startswith(images) and not n.endswith("/") and "/" not in n[len(images):]:
                    (out / "images" / n[len(images):]).write_bytes(z.read(n))
            yield out
