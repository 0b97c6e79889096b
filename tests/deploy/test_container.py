"""deploy/container: Containerfile and compose.yaml read statically; built where an engine runs.

The static checks are the test and always run. Building needs a container engine, which this
machine and CI do not run (the docker CLI is there, no daemon): the build test is marked
``container_engine`` and deselected, not skipped, when ``docker info`` fails
(tests/deploy/conftest.py), so the run says "N deselected" instead of passing silently.

compose.yaml is read with a small reader of the block-YAML subset the file uses (mappings,
"- " lists, JSON-style flow lists, quoted scalars): anything else fails the test loudly, so
the file cannot grow a construct the checks would misread. (No YAML library is a test
dependency.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy import DEPLOY, NGINX_SAMPLE, ROOT

CONTAINER = DEPLOY / "container"
CONTAINERFILE = CONTAINER / "Containerfile"
COMPOSE = CONTAINER / "compose.yaml"
SERVICES = {"postgres", "redis", "portal", "notifier", "nginx"}
INSTANCE = "/var/lib/pickup-portal"
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|KEYRING|PRIVATE", re.IGNORECASE)
_INTERPOLATED = re.compile(r"\$\{[A-Z_]+(:[?-][^}]*)?\}")


def _scalar(raw: str) -> Any:
    raw = raw.strip()
    if raw.startswith(("[", "{")):
        return json.loads(raw)
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    assert not raw.startswith(("&", "*", "|", ">", "!")), f"unsupported YAML: {raw}"
    return raw


def _lines(text: str) -> list[tuple[int, str]]:
    kept = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            kept.append((len(line) - len(line.lstrip(" ")), line.strip()))
    return kept


def _block(lines: list[tuple[int, str]], start: int, indent: int) -> tuple[Any, int]:
    """Parse the block at ``indent`` from ``start``; return it and the next line's index."""
    is_list = lines[start][1].startswith("- ")
    result: Any = [] if is_list else {}
    index = start
    while index < len(lines) and lines[index][0] == indent:
        text = lines[index][1]
        assert text.startswith("- ") == is_list, f"mixed block at: {text}"
        if is_list:
            result.append(_scalar(text[2:]))
            index += 1
            continue
        key, sep, rest = text.partition(": ") if ": " in text else text.partition(":")
        assert sep, f"bad line: {text}"
        index += 1
        if rest.strip():
            result[key] = _scalar(rest)
        elif index < len(lines) and lines[index][0] > indent:
            result[key], index = _block(lines, index, lines[index][0])
        else:
            result[key] = None
    assert index == len(lines) or lines[index][0] < indent, f"bad indent: {lines[index]}"
    return result, index


def read_compose() -> dict[str, Any]:
    """compose.yaml as dicts and lists of strings."""
    lines = _lines(COMPOSE.read_text())
    parsed, end = _block(lines, 0, 0)
    assert end == len(lines)
    return parsed


def final_stage() -> list[str]:
    """The Containerfile's instructions after its last FROM, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    instructions = [
        line for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]
    last = max(i for i, line in enumerate(instructions) if line.startswith("FROM "))
    return instructions[last:]


def test_the_image_is_multi_stage_and_runs_as_an_unprivileged_user() -> None:
    assert CONTAINERFILE.read_text().count("\nFROM ") >= 2
    users = [line.split()[1] for line in final_stage() if line.startswith("USER ")]
    assert users == ["10001:10001"]
    assert "useradd --system --uid 10001" in " ".join(final_stage())


def test_the_instance_folder_is_a_volume_and_the_only_state() -> None:
    stage = " ".join(final_stage())
    assert f'VOLUME ["{INSTANCE}"]' in stage
    assert f"PORTAL_INSTANCE_DIR={INSTANCE}" in stage
    assert "PYTHONDONTWRITEBYTECODE=1" in stage  # nothing to write on a read-only root
    assert "HEALTHCHECK" in stage


def test_no_secret_is_built_into_the_image() -> None:
    for line in final_stage() + CONTAINERFILE.read_text().splitlines():
        if line.startswith(("ENV ", "ARG ", "LABEL ")):
            assert not SECRET_WORDS.search(line), line
    copied = [
        line.split()[1]
        for line in CONTAINERFILE.read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
    ]
    assert set(copied) == {
        "requirements/main.txt",
        "pyproject.toml",
        "portal",
        "notifier",
        "migrations",
        "templates",
        "static",
    }  # named sources only: never instance/ or .env


def test_compose_runs_every_service_read_only_hardened_and_health_checked() -> None:
    services = read_compose()["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service["read_only"] == "true", name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["restart"] == "unless-stopped", name
        assert "privileged" not in service, name
    assert [n for n, s in services.items() if "ports" in s] == ["nginx"]


def test_the_portal_migrates_then_serves_and_shares_the_instance_with_the_notifier() -> None:
    services = read_compose()["services"]
    portal, notifier = services["portal"], services["notifier"]
    command = portal["entrypoint"][-1]
    assert command.index("portal db upgrade &&") < command.index("exec portal serve")
    assert portal["build"]["dockerfile"] == "deploy/container/Containerfile"
    assert notifier["image"] == portal["image"]
    assert notifier["entrypoint"] == ["notifier", "run"]
    for service in (portal, notifier):
        assert service["volumes"] == [f"instance:{INSTANCE}"]
        assert service["tmpfs"] == ["/tmp"]
        assert service["environment"]["PORTAL_DATABASE_URL"].endswith("@postgres:5432/portal")
    assert portal["environment"]["PORTAL_REDIS_URL"] == "redis://redis:6379/0"


def test_the_portal_trusts_nginx_alone_and_only_nginx_leaves_the_internal_networks() -> None:
    compose = read_compose()
    services, networks = compose["services"], compose["networks"]
    address = services["nginx"]["networks"]["frontend"]["ipv4_address"]
    assert services["portal"]["environment"]["PORTAL_TRUSTED_PROXIES"] == address
    assert networks["backend"]["internal"] == networks["frontend"]["internal"] == "true"
    assert set(services["portal"]["networks"]) == {"backend", "frontend"}
    assert (
        set(services["postgres"]["networks"]) == set(services["redis"]["networks"]) == {"backend"}
    )


def test_nginx_uses_the_sample_config_with_every_placeholder_set() -> None:
    nginx = read_compose()["services"]["nginx"]
    assert "../nginx/portal.conf:/etc/nginx/templates/portal.conf.template:ro" in nginx["volumes"]
    placeholders = set(re.findall(r"\$\{([A-Z_]+)\}", NGINX_SAMPLE.read_text()))
    assert set(nginx["environment"]) == placeholders
    assert (CONTAINER / Path(nginx["volumes"][0].split(":")[0])).resolve() == NGINX_SAMPLE


def test_compose_holds_no_secret_values() -> None:
    text = COMPOSE.read_text()
    for service in read_compose()["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_WORDS.search(key):
                assert _INTERPOLATED.fullmatch(value), f"{key} is written in compose.yaml"
    for url in re.findall(r"postgresql://[^@\s]+@", text):
        assert _INTERPOLATED.search(url), url
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    documented = set(
        re.findall(r"^([A-Z_]+)=", (CONTAINER / "env.example").read_text(), re.MULTILINE)
    )
    assert required <= documented


def test_the_reader_refuses_yaml_it_does_not_understand() -> None:
    with pytest.raises(AssertionError, match="unsupported YAML"):
        _scalar("*hardening")
    with pytest.raises(AssertionError, match="mixed block"):
        _block(_lines("a:\n  - x\n  b: y\n"), 1, 2)


@pytest.mark.container_engine
def test_the_image_builds_and_runs_read_only_as_its_user(tmp_path: Path) -> None:
    tag = f"pickup-portal:test-{os.getpid()}"
    build = subprocess.run(
        ["docker", "build", "-f", str(CONTAINERFILE), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    try:
        ran = subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "--read-only",
                "--tmpfs",
                "/tmp",
                "--entrypoint",
                "/bin/sh",
                tag,
                "-c",
                "id -u && portal --help >/dev/null && notifier --help",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert ran.stdout.splitlines()[0] == "10001"
        env = {
            **os.environ,
            "POSTGRES_PASSWORD": "build-test-only",
            "PORTAL_HOST": "p.test",
            "PORTAL_SMTP_HOST": "smtp.test",
            "PORTAL_MAIL_FROM": "n@p.test",
            "PORTAL_ORG_NAME": "Test",
        }
        config = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert config.returncode == 0, config.stderr
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, check=False)
