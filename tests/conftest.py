"""Shared fixtures: a tiny catalogue, a tiny trained model and its archive, and real services.

The services are real: a private PostgreSQL cluster (initdb/pg_ctl) and a TorchServe on free
ports, each in its own temporary folder, so test runs never touch the demo's services.
"""
from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg2
import pytest

from ingest import db
from serving.archive import MODEL_NAME, archive_name
from serving.postgres import Cluster
from serving.torchserve import free_port, make_torchserve
from support import extract, train_tiny
from training import export as export_mod
from training import make_sample_catalogue

# A test that uses one of these starts a service: it is an integration test (`make test-fast` leaves it out).
SERVICE_FIXTURES = {"pg_cluster", "database_url", "torchserve", "secured_torchserve", "start_torchserve"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def sample_catalogue(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("catalogue")
    make_sample_catalogue.write_catalogue(out, per_class=30, seed=0)
    return out


@pytest.fixture(scope="session")
def unseen_images(tmp_path_factory) -> Path:
    """Images the model never saw (another seed), with their true labels in styles.csv."""
    out = tmp_path_factory.mktemp("unseen")
    make_sample_catalogue.write_catalogue(out, per_class=3, seed=999, first_id=50000)
    return out


@pytest.fixture(scope="session")
def trained_run(sample_catalogue, tmp_path_factory) -> Path:
    return train_tiny(sample_catalogue, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def model_store(trained_run, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    # fp32/bf16, what the tests of answers against the float model expect; test_handler_int8 exports its own
    export_mod.export(trained_run, "1", model_store=store, int8="off")
    return store


@pytest.fixture(scope="session")
def extracted_archive(model_store, tmp_path_factory) -> Path:
    return extract(model_store / archive_name("1"), tmp_path_factory.mktemp("mar"))


# -- PostgreSQL ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_cluster():
    # Under /tmp, not pytest's 0700 tmp dir: as root the server runs as `postgres`, which must reach it.
    root = Path(tempfile.mkdtemp(prefix="rc-test-pg-"))
    cluster = Cluster(root=root, port=free_port())
    cluster.start()
    template = "refund_template"
    _admin(cluster, f'CREATE DATABASE "{template}"')
    db.migrate(cluster.url(template))
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def _admin(cluster: Cluster, sql: str) -> None:
    conn = psycopg2.connect(cluster.url("postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture
def database_url(pg_cluster) -> str:
    """A fresh database per test, cloned from the migrated template."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    _admin(pg_cluster, f'CREATE DATABASE "{name}" TEMPLATE refund_template')
    yield pg_cluster.url(name)
    _admin(pg_cluster, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- TorchServe ----------------------------------------------------------------------------

@pytest.fixture
def start_torchserve(model_store, tmp_path):
    """start(**config overrides, models=[...], wait_s=...) -> a TorchServe on free ports, stopped after the test."""
    started = []

    def start(*, models: list[str] | None = None, wait_s: float = 180.0, **overrides: str):
        ts = make_torchserve(model_store, tmp_path / f"ts-{len(started)}", **overrides)
        started.append(ts)
        ts.start(models, wait_s=wait_s)
        return ts

    yield start
    for ts in started:
        ts.stop()


@pytest.fixture(scope="module")
def secured_torchserve(model_store, tmp_path_factory):
    """The model served with token authorization on (as deployed): clients need the key file."""
    ts = make_torchserve(model_store, tmp_path_factory.mktemp("ts-secured"), disable_token_authorization="false")
    ts.start([f"{MODEL_NAME}={archive_name('1')}"])
    yield ts
    ts.stop()


@pytest.fixture(scope="session")
def torchserve(model_store, tmp_path_factory):
    ts = make_torchserve(model_store, tmp_path_factory.mktemp("ts"))
    ts.start(["refund_classifier=refund_classifier-1.mar"])
    yield ts
    ts.stop()
