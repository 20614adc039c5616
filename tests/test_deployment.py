"""The deployment files (Dockerfile, docker-compose.yml, .env.example, deploy/), checked statically.

There is no Docker engine on the build machines, so these tests parse the files and assert that
they are wired as docs/DEPLOYMENT.md says; the commands the containers run are the `python -m ...`
commands the rest of the suite exercises, and their arguments are checked against the real parsers.
The last tests run the container's TorchServe config and the HEALTHCHECK against a real TorchServe.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from ingest.settings import BY_NAME
from serving.client import MULTIPART_PART_OVERHEAD
from serving.paths import REPO_ROOT
from serving.torchserve import TorchServe, free_port, load_properties, parse_properties

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DEPLOY_CONFIG = REPO_ROOT / "deploy" / "config.properties"
K8S = REPO_ROOT / "deploy" / "k8s"

# Keys deploy/config.properties sets differently from the local config.properties, on purpose.
DELIBERATE = {
    "inference_address", "management_address", "metrics_address",  # 0.0.0.0 inside the container
    "model_store", "allowed_urls",  # the image's model store
    "disable_token_authorization", "token_expiration_min",  # token authorization on
}


# -- helpers ---------------------------------------------------------------------------------

VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def compose_variables(text: str) -> dict[str, str | None]:
    """{name: default} of every ${VAR...} in a compose file (None: no default)."""
    found: dict[str, str | None] = {}
    for m in VAR.finditer(text.replace("$$", "")):
        default = m.group("arg") if m.group("op") in (":-", "-") else None
        found[m.group("name")] = found.get(m.group("name")) or default
    return found


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution, the subset docker-compose.yml uses."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    """The compose file as `docker compose config` would see it with .env = .env.example + a password."""
    env = {**env_example(), "POSTGRES_PASSWORD": "test-password"}
    return interpolate(raw_compose, env)


def mounts(service: dict) -> list[dict]:
    """The service's volumes in long syntax: {type, source, target, read_only}."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out.append({"type": kind, "source": source, "target": target, "read_only": "ro" in mode.split(",")})
        else:
            out.append({"read_only": False, **v})
    return out


def mount_at(service: dict, target: str) -> dict:
    found = [m for m in mounts(service) if m["target"] == target]
    assert len(found) == 1, f"expected one mount at {target}: {mounts(service)}"
    return found[0]


def published(service: dict) -> list[tuple[str, str, str]]:
    """(host_ip, host_port, container_port) of each published port ("" where not given)."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip", ""), str(p.get("published", "")), str(p["target"])))
        else:
            parts = str(p).split(":")  # [[host_ip:]host_port:]container_port
            out.append(tuple([""] * (3 - len(parts)) + parts))
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    return args


def exec_form(rest: str) -> list[str]:
    rest = re.sub(r"^(--\S+\s+)*", "", rest)  # HEALTHCHECK options
    if rest.startswith("CMD "):
        rest = rest[4:]
    return json.loads(rest)


def config_port(key: str) -> int:
    return urlsplit(load_properties(DEPLOY_CONFIG)[key]).port


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def k8s_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}"
    return found[0]


# -- docker-compose.yml ----------------------------------------------------------------------

def test_compose_parses_with_the_four_services(compose):
    assert set(compose["services"]) == {"postgres", "torchserve", "ingest", "review"}
    assert set(compose["volumes"]) >= {"pgdata", "torchserve-state", "review-state"}


def test_every_compose_variable_is_documented_in_env_example_with_the_same_default():
    used = compose_variables(COMPOSE.read_text())
    documented = env_example()
    assert set(used) == set(documented), f"missing in .env.example: {set(used) - set(documented)}; unused: {set(documented) - set(used)}"
    for name, default in used.items():
        if default is not None:
            assert documented[name] == default, f"{name}: compose default {default!r}, .env.example {documented[name]!r}"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert any(l.startswith("#") for l in lines[max(0, i - 4):i]), f"{line!r} has no comment above it"


def test_the_password_is_required_and_never_written_down(raw_compose, compose):
    assert env_example()["POSTGRES_PASSWORD"] == ""
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(raw_compose, {k: v for k, v in env_example().items() if k != "POSTGRES_PASSWORD"})
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()
    # Only the database, the job and the review desk see it; TorchServe gets no credentials.
    for name, service in compose["services"].items():
        text = json.dumps(service)
        assert ("test-password" in text) == (name in ("postgres", "ingest", "review")), name
    assert compose["services"]["ingest"]["environment"]["PGPASSWORD"] == "test-password"
    assert compose["services"]["review"]["environment"]["PGPASSWORD"] == "test-password"


def test_our_containers_run_without_capabilities(compose):
    for name in ("torchserve", "ingest", "review"):
        service = compose["services"][name]
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"], name


def test_gpu_override_only_reserves_gpus_for_torchserve():
    override = yaml.safe_load((REPO_ROOT / "deploy" / "docker-compose.gpu.yml").read_text())
    assert set(override["services"]) == {"torchserve"}
    devices = override["services"]["torchserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_postgres_service(compose):
    pg = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+\.\d+(-[a-z0-9]+)?", pg["image"]), f"official image, pinned by full tag: {pg['image']}"
    assert mount_at(pg, "/var/lib/postgresql/data") == {"type": "volume", "source": "pgdata", "target": "/var/lib/postgresql/data", "read_only": False}
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert set(pg["environment"]) == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
    assert not pg.get("ports"), "PostgreSQL is reached on the compose network only"


def test_torchserve_service(compose):
    ts = compose["services"]["torchserve"]
    assert ts["command"] == ["python", "-m", "serving", "up", "--foreground"]
    # the model store: where the container config and the image's VOLUME say
    store = load_properties(DEPLOY_CONFIG)["model_store"]
    assert mount_at(ts, store)["type"] == "bind" and not mount_at(ts, store)["read_only"]
    # the state folder (TorchServe's working directory, with key_file.json) is a named volume
    key_file = Path(ts["environment"]["TORCHSERVE_KEY_FILE"])
    state = mount_at(ts, str(key_file.parent))
    assert state["type"] == "volume" and state["source"] == "torchserve-state" and not state["read_only"]
    assert key_file.parent == Path(ts["environment"]["RC_STATE_DIR"]) / "torchserve"
    # the copy of the inference key alone, on a volume of its own
    copy = Path(ts["environment"]["RC_INFERENCE_KEY_FILE"])
    shared = mount_at(ts, str(copy.parent))
    assert shared["type"] == "volume" and shared["source"] == "torchserve-inference-key" and not shared["read_only"]
    # an external database, so `serving up` starts no private cluster
    assert urlsplit(ts["environment"]["DATABASE_URL"]).hostname == "postgres"
    # management never published; what is published is on the host's loopback
    ports = published(ts)
    assert {c for _, _, c in ports} == {str(config_port("inference_address")), str(config_port("metrics_address"))}
    assert str(config_port("management_address")) not in {c for _, _, c in ports}
    assert all(host == "127.0.0.1" for host, _, _ in ports), ports
    assert ts["healthcheck"]["test"] == ["CMD", "python", "-m", "deploy.healthcheck"]


def test_ingest_service(compose):
    ingest, ts = compose["services"]["ingest"], compose["services"]["torchserve"]
    assert ingest["image"] == ts["image"] and ingest["build"] == ts["build"], "one image, another command"
    assert ingest["depends_on"] == {"postgres": {"condition": "service_healthy"}, "torchserve": {"condition": "service_healthy"}}
    cmd = ingest["command"]
    assert cmd[:4] == ["python", "-m", "ingest", "schedule"] and cmd[cmd.index("--every") + 1] == "15m"
    for flag, default_host_dir in (("--inbox", "./inbox"), ("--processed", "./processed"), ("--quarantine", "./quarantine")):
        m = mount_at(ingest, cmd[cmd.index(flag) + 1])
        assert m["type"] == "bind" and m["source"] == default_host_dir and not m["read_only"], m
    env = ingest["environment"]
    assert urlsplit(env["TORCHSERVE_URL"]).hostname == "torchserve"
    assert urlsplit(env["TORCHSERVE_URL"]).port == config_port("inference_address")
    assert "TORCHSERVE_MANAGEMENT_URL" not in env, "inference access only"
    db = urlsplit(env["DATABASE_URL"])
    assert db.hostname == "postgres" and db.path == "/" + compose["services"]["postgres"]["environment"]["POSTGRES_DB"]
    assert db.username == compose["services"]["postgres"]["environment"]["POSTGRES_USER"] and db.password is None
    # the inference key alone: the copy `serving up --foreground` keeps, read-only; never the state
    # volume with key_file.json (management and API keys)
    assert env["TORCHSERVE_KEY_FILE"] == ts["environment"]["RC_INFERENCE_KEY_FILE"]
    keys = mount_at(ingest, str(Path(env["TORCHSERVE_KEY_FILE"]).parent))
    assert keys["type"] == "volume" and keys["source"] == "torchserve-inference-key" and keys["read_only"]
    assert all(m.get("source") != "torchserve-state" for m in ingest["volumes"] if isinstance(m, dict))
    assert not ingest.get("ports")
    assert ingest["healthcheck"] == {"disable": True}


def test_review_service(compose):
    """The review desk: the same image, the database as the job has it, the photos where the job
    moved them (read-only: the desk never changes a photo), published on the host's loopback only."""
    review, ingest = compose["services"]["review"], compose["services"]["ingest"]
    assert review["image"] == ingest["image"] and review["build"] == ingest["build"]
    assert review["environment"]["DATABASE_URL"] == ingest["environment"]["DATABASE_URL"]
    assert review["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    processed_in_ingest = ingest["command"][ingest["command"].index("--processed") + 1]
    photos = mount_at(review, processed_in_ingest)
    assert photos["type"] == "bind" and photos["source"] == mount_at(ingest, processed_in_ingest)["source"]
    assert photos["read_only"], "the review desk only reads the photos"
    store = mount_at(review, review["environment"]["REVIEW_MODEL_STORE"])
    assert store["source"] == mount_at(compose["services"]["torchserve"], "/app/model_store")["source"] and store["read_only"]
    # the generated session key lives on a volume of its own, under the state folder
    state = mount_at(review, str(Path(review["environment"]["RC_STATE_DIR"]) / "review"))
    assert state["type"] == "volume" and state["source"] == "review-state"
    cmd = review["command"]
    ports = published(review)
    assert ports == [("127.0.0.1", "8090", cmd[cmd.index("--port") + 1])]
    assert "/login" in " ".join(review["healthcheck"]["test"])
    assert review["cap_drop"] == ["ALL"]


def test_compose_commands_are_accepted_by_the_real_command_lines(compose):
    from deploy import healthcheck
    from ingest import __main__ as ingest_cli
    from review import __main__ as review_cli
    from serving import __main__ as serving_cli

    def parse(cmd: list[str]):
        assert cmd[:2] == ["python", "-m"]
        parser = {"serving": serving_cli, "ingest": ingest_cli, "review": review_cli,
                  "deploy.healthcheck": healthcheck}[cmd[2]].get_args_parser()
        return parser.parse_args(cmd[3:])  # argparse exits (SystemExit) on an unknown flag

    assert parse(compose["services"]["torchserve"]["command"]).foreground
    review = parse(compose["services"]["review"]["command"])
    assert review.fn.__name__ == "cmd_serve" and review.port == 8090
    assert parse(compose["services"]["torchserve"]["healthcheck"]["test"][1:]).config.name == "config.properties"
    k8s_torchserve, k8s_ingest = _k8s_commands()
    assert parse(k8s_torchserve).archive == "refund_classifier-1.mar"
    assert Path(parse(compose["services"]["ingest"]["command"]).inbox) == Path("/data/inbox")
    assert Path(parse(k8s_ingest).inbox) == Path("/data/inbox")


# -- deploy/config.properties ----------------------------------------------------------------

def test_container_config_binds_inside_and_turns_token_authorization_on():
    props = load_properties(DEPLOY_CONFIG)
    for key in ("inference_address", "metrics_address"):
        assert urlsplit(props[key]).hostname == "0.0.0.0", key
    # management: the container's loopback, out of the other containers' reach
    assert urlsplit(props["management_address"]).hostname == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "true"
    assert props["metrics_mode"] == "prometheus"
    assert props["model_store"] == "/app/model_store"
    assert "\\" not in props["allowed_urls"], "a backslash would be read differently by Java's Properties"


@pytest.mark.parametrize("url, allowed", [
    ("file:///app/model_store/refund_classifier-2.mar", True),
    ("FILE:///app/model_store/refund_classifier-10.mar", True),
    ("file:///app/model_store/../etc/x.mar", False),
    ("file:///app/model_store/sub/x.mar", False),
    ("file:///app/model_store/x.marx", False),
    ("file:///etc/passwd", False),
    ("file:///tmp/refund_classifier-2.mar", False),
    ("https://example.com/refund_classifier-2.mar", False),
    ("s3://bucket/refund_classifier-2.mar", False),
])
def test_allowed_urls_only_the_model_store(url, allowed):
    # TorchServe matches each comma-separated pattern against the whole URL, case-insensitively.
    patterns = load_properties(DEPLOY_CONFIG)["allowed_urls"].split(",")
    assert any(re.fullmatch(p, url, re.IGNORECASE) for p in patterns) == allowed


def test_container_config_keeps_the_local_tuning():
    local, container = load_properties(REPO_ROOT / "config.properties"), load_properties(DEPLOY_CONFIG)
    for key, value in local.items():
        if key not in DELIBERATE:
            assert container.get(key) == value, f"{key}: config.properties has {value!r}, deploy/config.properties {container.get(key)!r}"


# -- Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_base_is_pinned_python_311():
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert len(froms) == 1
    base = re.sub(r"\$\{(\w+)\}", lambda m: dockerfile_args()[m.group(1)], froms[0])
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base


def test_dockerfile_runs_as_a_non_root_user_with_healthcheck_ports_and_volume():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    users = [rest for w, rest in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert words.index("USER") < words.index("CMD") and words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    health = next(rest for w, rest in ins if w == "HEALTHCHECK")
    assert exec_form(health) == ["python", "-m", "deploy.healthcheck"]
    assert sorted(next(rest for w, rest in ins if w == "EXPOSE").split()) == ["8080", "8081", "8082"]
    assert json.loads(next(rest for w, rest in ins if w == "VOLUME")) == [load_properties(DEPLOY_CONFIG)["model_store"]]
    assert exec_form(next(rest for w, rest in ins if w == "CMD")) == ["python", "-m", "serving", "up", "--foreground"]


def test_dockerfile_copies_the_container_config_and_every_package():
    copies = [rest.split() for w, rest in dockerfile_instructions() if w == "COPY"]
    assert ["deploy/config.properties", "config.properties"] in copies
    packages = sorted(p.parent.name for p in REPO_ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "bench"))
    copied = {src.split("/")[0] for c in copies for src in c[:-1]}
    assert set(packages) <= copied, f"not in the image: {set(packages) - copied}"
    assert "deploy/healthcheck.py" in {src for c in copies for src in c[:-1]}


def test_dockerfile_installs_java_17_and_pinned_requirements_with_cpu_torch_by_default():
    runs = " ".join(rest for w, rest in dockerfile_instructions() if w == "RUN")
    assert "openjdk-17-jre-headless" in runs
    assert "-r requirements.txt" in runs
    args = dockerfile_args()
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    assert '--index-url "${TORCH_INDEX_URL}"' in runs
    for name in ("requirements.txt", "requirements-runtimes.txt"):
        for line in (REPO_ROOT / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=\s]+", line.strip()), f"unpinned requirement: {line}"
    # the image keeps the distribution's Java (security updates); the wheels are for machines without one
    assert "requirements-runtimes" not in " ".join(rest for _, rest in dockerfile_instructions())


def test_dockerfile_bakes_in_no_secrets():
    ins = dockerfile_instructions()
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|API_?KEY|PRIVATE", re.IGNORECASE)
    for word, rest in ins:
        if word in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest):
                assert not secretish.search(name), f"{word} {name}"
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|key_file|\.pem|id_rsa|\.run", rest), rest
        assert not re.search(r"postgres(ql)?://[^/\s]*:[^@/\s]*@", rest), f"credentials in {word}"
    # The build context excludes them too.
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for pattern in (".env", ".git", ".run/", "runs/", "model_store/", "*.mar", "*.pt", "**/key_file.json"):
        assert pattern in ignored, pattern


def test_image_environment_matches_compose(compose):
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for w, rest in dockerfile_instructions() if w == "ENV")))
    ts = compose["services"]["torchserve"]["environment"]
    assert env["RC_STATE_DIR"] == ts["RC_STATE_DIR"]
    # no key file baked in: a pod whose TorchServe has tokens off (Kubernetes) must not look for one
    assert "TORCHSERVE_KEY_FILE" not in env


# -- deploy/k8s ------------------------------------------------------------------------------

def _k8s_commands() -> list[list[str]]:
    deployment = k8s_kind(k8s_docs("torchserve.yaml"), "Deployment")
    cron = k8s_kind(k8s_docs("ingest-cronjob.yaml"), "CronJob")
    return [deployment["spec"]["template"]["spec"]["containers"][0]["command"],
            cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]]


def test_k8s_manifests_parse_and_kustomization_lists_them():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        for doc in k8s_docs(name):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{name}: {doc.get('kind')}"
            assert doc["kind"] != "Secret", "no secrets in the repository"
    assert set(kustomization["resources"]) | {"kustomization.yaml", "kserve-inferenceservice.yaml"} == {p.name for p in K8S.glob("*.yaml")}


def test_k8s_torchserve_replicas_behind_a_service():
    docs = k8s_docs("torchserve.yaml")
    deployment, service = k8s_kind(docs, "Deployment"), k8s_kind(docs, "Service")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2 and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert {p["containerPort"] for p in container["ports"]} == {8080, 8082}
    assert {p["port"] for p in service["spec"]["ports"]} == {8080, 8082}, "no management API in the Service"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/ping"
    # The k8s config: per-replica keys cannot be balanced, so token authorization is off and the
    # management API listens on the pod's loopback only (NetworkPolicy guards the rest).
    props = parse_properties(k8s_kind(docs, "ConfigMap")["data"]["config.properties"])
    assert props["disable_token_authorization"] == "true" and props["enable_model_api"] == "false"
    assert urlsplit(props["management_address"]).hostname == "127.0.0.1"
    assert urlsplit(props["inference_address"]).port == 8080 and urlsplit(props["metrics_address"]).port == 8082
    policy = k8s_kind(k8s_docs("network-policy.yaml"), "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    inference_rule = next(r for r in policy["spec"]["ingress"] if r["ports"] == [{"protocol": "TCP", "port": 8080}])
    cron_pod = k8s_kind(k8s_docs("ingest-cronjob.yaml"), "CronJob")["spec"]["jobTemplate"]["spec"]["template"]
    assert inference_rule["from"][0]["podSelector"]["matchLabels"].items() <= cron_pod["metadata"]["labels"].items()
    # a request of several photos stays under this TorchServe's max_request_size (with the framing)
    env = {e["name"]: e.get("value") for e in cron_pod["spec"]["containers"][0]["env"]}
    per_request = int(env.get("INGEST_PHOTOS_PER_REQUEST") or BY_NAME["photos_per_request"].default)
    max_request_bytes = int(env.get("INGEST_MAX_REQUEST_BYTES") or BY_NAME["max_request_bytes"].default)
    assert max_request_bytes + per_request * MULTIPART_PART_OVERHEAD < int(props["max_request_size"])


def test_every_torchserve_config_takes_the_job_s_largest_request_and_one_photo_of_max_bytes():
    """The job's default request (--photos-per-request photos, --max-request-bytes, the framing),
    its largest photo sent alone (--max-bytes) and the handler's largest photo (max_bytes) in base64
    JSON all stay under max_request_size of the local, the compose and the Kubernetes TorchServe:
    else the frontend refuses with a 413 a photo that the job and the handler accept."""
    handler_max_bytes = yaml.safe_load((REPO_ROOT / "handler" / "model-config.yaml").read_text())["handler"]["max_bytes"]
    configs = {"config.properties": load_properties(REPO_ROOT / "config.properties"),
               "deploy/config.properties": load_properties(DEPLOY_CONFIG),
               "deploy/k8s/torchserve.yaml": parse_properties(
                   k8s_kind(k8s_docs("torchserve.yaml"), "ConfigMap")["data"]["config.properties"])}
    most = BY_NAME["max_request_bytes"].default + BY_NAME["photos_per_request"].default * MULTIPART_PART_OVERHEAD
    for name, props in configs.items():
        limit = int(props["max_request_size"])
        assert most < limit, name
        assert BY_NAME["max_bytes"].default + MULTIPART_PART_OVERHEAD < limit, name
        assert 4 * -(-handler_max_bytes // 3) + 1024 < limit, name  # base64 in a JSON body


def test_k8s_ingestion_cronjob_one_runner_per_inbox():
    cron = k8s_kind(k8s_docs("ingest-cronjob.yaml"), "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    # the advisory lock lets one run per database work; a second pod would only exit 75
    assert job["parallelism"] == 1 and job["completions"] == 1
    # ... and a lock loser or bad settings end the Job instead of burning its retries
    rule = next(r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob")
    assert {2, 75} <= set(rule["onExitCodes"]["values"]) and rule["onExitCodes"]["operator"] == "In"
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    container = job["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["python", "-m", "ingest", "run"]
    env = {e["name"]: e for e in container["env"]}
    assert urlsplit(env["TORCHSERVE_URL"]["value"]).hostname == k8s_kind(k8s_docs("torchserve.yaml"), "Service")["metadata"]["name"]
    for secret in ("DATABASE_URL", "PGPASSWORD"):
        assert "secretKeyRef" in env[secret]["valueFrom"], f"{secret} comes from a Secret"
    assert job["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # One mount of the volume holding the three folders: a move is a link within one mount, not a copy
    # (a subPath per folder is a bind mount each, and link(2) across them fails with EXDEV).
    mounts = container["volumeMounts"]
    assert len(mounts) == 1 and "subPath" not in mounts[0]
    from ingest import __main__ as ingest_cli

    assert container["command"][:3] == ["python", "-m", "ingest"]
    command = ingest_cli.get_args_parser().parse_args(container["command"][3:])
    for folder in (command.inbox, command.processed, command.quarantine):
        assert Path(folder).parent == Path(mounts[0]["mountPath"]), folder
    init = job["template"]["spec"]["initContainers"][0]
    assert init["volumeMounts"] == mounts and all(f"'{Path(f).name}'" in init["command"][-1]
                                                  for f in (command.inbox, command.processed, command.quarantine))


# The manifests against the real Kubernetes schemas (kubernetes-validate ships them), strictly:
# an unknown or misplaced field fails, as `kubectl apply --validate=strict` would.
K8S_VERSION = "1.31"


@pytest.mark.parametrize("name", sorted(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]))
def test_k8s_manifests_are_valid_kubernetes(name):
    import kubernetes_validate

    for doc in k8s_docs(name):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validation_catches_a_misplaced_field():
    import kubernetes_validate

    cron = k8s_kind(k8s_docs("ingest-cronjob.yaml"), "CronJob")
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def test_kserve_alternative_parses():
    isvc = k8s_kind(k8s_docs("kserve-inferenceservice.yaml"), "InferenceService")
    assert isvc["apiVersion"].startswith("serving.kserve.io/")
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] == "pytorch"
    assert isvc["spec"]["predictor"]["minReplicas"] >= 2


# -- against a real TorchServe -----------------------------------------------------------------

def test_healthcheck_local_url():
    from deploy import healthcheck

    assert healthcheck.local_url("http://0.0.0.0:8080") == "http://127.0.0.1:8080"
    assert healthcheck.local_url("http://torchserve:8080/") == "http://torchserve:8080"


@pytest.mark.integration
def test_healthcheck_against_a_real_torchserve(torchserve, tmp_path, capsys):
    from deploy import healthcheck

    # the session TorchServe runs with token authorization off: no key needed
    assert healthcheck.main(["--config", str(torchserve.config), "--key-file", str(tmp_path / "absent.json")]) == 0
    assert "Healthy" in capsys.readouterr().out
    dead = tmp_path / "dead.properties"
    dead.write_text(f"inference_address=http://127.0.0.1:{free_port()}\ndisable_token_authorization=true\n")
    assert healthcheck.main(["--config", str(dead), "--timeout", "2"]) == 1


@pytest.mark.integration
def test_container_config_in_a_real_torchserve_registers_only_from_the_store(model_store, start_torchserve):
    """deploy/config.properties, re-pointed at free ports and a test model store, in TorchServe 0.12."""
    props = load_properties(DEPLOY_CONFIG)
    # start_torchserve gives it free ports and the test model store
    overrides = {k: v for k, v in props.items() if not k.endswith(("_address", "_port")) and k != "model_store"}
    overrides.update({
        "allowed_urls": props["allowed_urls"].replace("/app/model_store", str(model_store)),
    })
    ts = start_torchserve(**overrides)

    def register(url: str) -> requests.Response:
        return ts.client.management("POST", "models", params={"url": url, "model_name": "rc", "synchronous": "true", "initial_workers": "1"}, timeout=120)

    for outside in ("https://example.com/refund_classifier-1.mar", "file:///etc/passwd", f"file://{model_store}/../refund_classifier-1.mar"):
        r = register(outside)
        assert r.status_code == 404, (outside, r.status_code, r.text)
        assert re.search("does not match any allowed URL|Relative path is not allowed", r.json()["message"]), r.text
    r = register("refund_classifier-1.mar")  # by name, from the store
    assert r.status_code == 200, r.text
    assert ts.token_auth
    r = ts.client.inference("POST", "predictions/rc", data=b"", timeout=30)
    assert r.status_code == 400 and r.json()["code"] == "empty"
    assert "ts_inference_requests_total" in requests.get(f"{ts.metrics_url}/metrics", timeout=10).text


@pytest.mark.integration
def test_healthcheck_with_token_authorization_renews_an_expired_key(start_torchserve):
    from deploy import healthcheck

    ts = start_torchserve(disable_token_authorization="false", token_expiration_min="0.1", wait_s=90)
    key_file = ts.state / "key_file.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    ok, why = healthcheck.check(ts.config, key_file)
    assert ok, why
    assert requests.get(f"{ts.inference_url}/ping", timeout=5).status_code == 400, "keyless /ping is refused"
    first = json.loads(key_file.read_text())["inference"]
    expires = datetime.fromisoformat(first["expiration time"][:26] + "+00:00")
    time.sleep(max(0.0, expires.timestamp() - time.time()) + 1)
    ok, why = healthcheck.check(ts.config, key_file)  # expired: renewed with the API key
    assert ok, why
    assert json.loads(key_file.read_text())["inference"]["key"] != first["key"]


@pytest.mark.integration
def test_the_k8s_cronjob_pod_environment_ingests(torchserve, database_url, tmp_path, unseen_images):
    """The CronJob's command in the environment its pod gets (the image's ENV, then the container's
    env, the Secret's values given), against a TorchServe with token authorization off as in the
    cluster: every photo recorded."""
    from ingest_helpers import assert_exactly_once, fill_inbox, summary_of

    image_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for w, rest in dockerfile_instructions() if w == "ENV")))
    cron = k8s_kind(k8s_docs("ingest-cronjob.yaml"), "CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    pod_env = {**image_env}
    for e in container["env"]:
        if "value" in e:
            pod_env[e["name"]] = e["value"]
    secrets = {"DATABASE_URL": database_url, "PGPASSWORD": ""}  # the password is in the test URL
    pod_env.update({name: secrets[name] for name in (e["name"] for e in container["env"] if "valueFrom" in e)})
    pod_env["TORCHSERVE_URL"] = torchserve.inference_url  # the Service's name, resolved here to the test server
    pod_env["RC_STATE_DIR"] = str(tmp_path / "state")  # the image's /app/.run, here
    data = {"inbox": tmp_path / "data" / "inbox", "processed": tmp_path / "data" / "processed",
            "quarantine": tmp_path / "data" / "quarantine"}
    for folder in data.values():
        folder.mkdir(parents=True)
    originals = fill_inbox(data["inbox"], unseen_images)
    command = [str(a) for a in container["command"]]
    for flag, folder in (("--inbox", "inbox"), ("--processed", "processed"), ("--quarantine", "quarantine")):
        command[command.index(flag) + 1] = str(data[folder])
    assert command[:2] == ["python", "-m"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT), "HOME": str(tmp_path), **pod_env}
    result = subprocess.run([sys.executable, *command[1:], "--min-age", "0", "--settle", "0", "--log-format", "json", "--no-progress"],
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(result.stdout)
    assert summary["processed"] + summary["duplicates"] == len(originals) and summary["failed"] == 0, summary
    assert_exactly_once(database_url, data["inbox"], originals)
