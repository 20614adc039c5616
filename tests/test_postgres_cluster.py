"""The private cluster wherever a user clones: as root, the server runs as `postgres`, which may not
be able to enter the checkout (a root user's home, `mktemp -d`)."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import psycopg2
import pytest

from serving.postgres import Cluster, PostgresError
from serving.torchserve import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user"),
]


@pytest.fixture
def hidden_checkout():
    """A checkout inside a folder only root may enter, and a shared folder the `postgres` user can enter."""
    private = Path(tempfile.mkdtemp(prefix="rc-private-"))  # 0700, like /root
    shared = Path(tempfile.mkdtemp(prefix="rc-shared-"))
    os.chmod(shared, 0o755)
    yield private / "clone" / ".run" / "postgres", shared
    shutil.rmtree(private, ignore_errors=True)
    shutil.rmtree(shared, ignore_errors=True)


def test_cluster_in_a_folder_the_server_cannot_enter(hidden_checkout, monkeypatch):
    root, shared = hidden_checkout
    monkeypatch.setenv("RC_PG_SHARED_DIR", str(shared))
    cluster = Cluster(root=root, port=free_port())
    assert cluster.data.parent.parent == shared and cluster.data.parent.name.startswith("refund-classifier-pg-")

    seen = {}
    run = Cluster._run

    def spy(self, tool, *args, **kwargs):
        if tool == "initdb":
            pwfile = Path(args[args.index("--pwfile") + 1])
            seen["initpw_mode"] = stat.S_IMODE(pwfile.stat().st_mode)
        return run(self, tool, *args, **kwargs)

    monkeypatch.setattr(Cluster, "_run", spy)
    url = cluster.start()
    try:
        assert seen["initpw_mode"] == 0o600  # never world-readable, not even while initdb runs
        assert not list(cluster.data.parent.glob(".initpw"))
        assert stat.S_IMODE(cluster.password_file.stat().st_mode) == 0o600
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        # the same checkout finds the same cluster again
        assert Cluster(root=root, port=cluster.port).data == cluster.data
        assert Cluster(root=root, port=cluster.port).running()
    finally:
        cluster.stop()


def test_unreachable_shared_folder_stops_before_initdb(hidden_checkout, monkeypatch):
    root, shared = hidden_checkout
    os.chmod(shared, 0o700)  # nor can the server's user enter this one
    monkeypatch.setenv("RC_PG_SHARED_DIR", str(shared))
    cluster = Cluster(root=root, port=free_port())
    with pytest.raises(PostgresError) as err:
        cluster.start()
    message = str(err.value)
    assert "\n" not in message and str(cluster.data.parent) in message and "RC_PG_SHARED_DIR" in message
    assert not cluster.data.exists()
