"""The ``portal`` command's structure (issue 11 item 3): Flask's click integration, the app
factory registering one group per module, no import cycle, and the commands' contract intact.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from portal import cli

ROOT = Path(__file__).resolve().parents[2]
COMMAND_MODULES = sorted(
    f"portal.commands.{p.stem}"
    for p in (ROOT / "portal" / "commands").glob("*.py")
    if p.stem != "__init__"
)

# The commands scripts rely on, and the options each one's contract names.
CONTRACT = {
    "db upgrade": [],
    "users create": ["--role", "--email", "--name", "--dob", "--access-code", "--password-stdin"],
    "messages send": [
        "--from",
        "--to",
        "--subject",
        "--body",
        "--body-file",
        "--attach",
        "--expires-in",
    ],
    "keys status": [],
    "keys rotate": [],
    "keys remove": [],
    "audit verify": ["--from-head"],
    "audit export": ["--format", "--since", "--until", "--patient", "-o"],
    "retention run": [],
    "serve": ["--host", "--port", "--workers", "--threads", "--download-slots"],
    "demo": ["--port"],
    "backup": ["FOLDER"],
    "restore": ["FOLDER"],
}
TOP_LEVEL = sorted({name.split()[0] for name in CONTRACT})

# Imports inside functions that defer a heavy import on purpose (each says so at its site).
DELIBERATE_DEFERRALS = {("serve.py", "portal.server")}


@pytest.mark.parametrize("module", ["portal.cli", "portal.commands", *COMMAND_MODULES])
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        f"assert {module!r} == 'portal.cli' or 'portal.cli' not in sys.modules, "
        "'a command module imports portal.cli'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_no_import_hides_inside_a_function() -> None:
    files = [ROOT / "portal" / "cli.py", *(ROOT / "portal" / "commands").glob("*.py")]
    hidden = set()
    for path in files:
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden |= {
                    (
                        path.name,
                        node.module if isinstance(node, ast.ImportFrom) else node.names[0].name,
                    )
                    for node in ast.walk(function)
                    if isinstance(node, ast.Import | ast.ImportFrom)
                }
    assert hidden == DELIBERATE_DEFERRALS


def test_the_factory_registers_every_contract_command(instance: Path) -> None:
    from portal import create_app

    assert sorted(create_app().cli.commands) == TOP_LEVEL


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_contract_command_help(instance: Path, name: str) -> None:
    result = CliRunner().invoke(cli.main, [*name.split(), "--help"], prog_name="portal")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: portal {name} ")
    for option in CONTRACT[name]:
        assert option in result.output


def test_top_level_help_lists_the_contract_only(instance: Path) -> None:
    result = CliRunner().invoke(cli.main, ["--help"], prog_name="portal")
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:")[1].strip().splitlines()
    assert [line.split()[0] for line in listed] == TOP_LEVEL


@pytest.mark.parametrize(
    "args",
    [
        ["run"],
        ["shell"],
        ["routes"],
        ["limiter", "--help"],
        ["--app", "x", "db", "upgrade"],
        ["--debug", "db", "upgrade"],
        ["--env-file", "x", "db", "upgrade"],
        ["--version"],
    ],
)
def test_flasks_development_commands_and_options_are_absent(
    instance: Path, args: list[str]
) -> None:
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2
    assert "No such" in result.output
    assert not instance.joinpath("portal.db").exists()


def test_options_are_not_read_from_flask_environment_variables(
    instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FlaskGroup's default would let FLASK_AUDIT_EXPORT_FORCE=1 replace an existing file.
    out = instance.parent / "export.csv"
    out.write_text("keep")
    env = {"FLASK_AUDIT_EXPORT_FORCE": "1", "FLASK_AUDIT_EXPORT_FORMAT": "csv"}
    CliRunner().invoke(cli.main, ["db", "upgrade"])
    result = CliRunner().invoke(cli.main, ["audit", "export", "-o", str(out)], env=env)
    assert result.exit_code == 2  # --format is still required
    result = CliRunner().invoke(
        cli.main, ["audit", "export", "--format", "csv", "-o", str(out)], env=env
    )
    assert result.exit_code == 1
    assert out.read_text() == "keep"


@pytest.mark.parametrize(
    "args", [["--help"], ["keys", "status"], ["users", "create", "--help"], ["db", "upgrade"]]
)
def test_malformed_setting_stops_before_any_command(instance: Path, args: list[str]) -> None:
    env = {**os.environ, "PORTAL_INSTANCE_DIR": str(instance), "PORTAL_SMTP_TLS": "bogus"}
    done = subprocess.run(
        [sys.executable, "-m", "portal", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "portal: configuration error: PORTAL_SMTP_TLS: expected starttls or implicit"
    ]
    assert done.stdout == ""
    assert not instance.joinpath("portal.db").exists()
