"""The README's examples are run, so the documentation cannot rot."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from virtsvc.contracts import protoc as _protoc

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _block(lang: str, after: str) -> str:
    """The first ```lang block after the text ``after``."""
    start = README.index(after)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    assert match, f"no {lang} block after {after!r} in README.md"
    return match.group(1)


def test_readme_pytest_example(pytester: pytest.Pytester) -> None:
    """The plugin example passes as written, with the README's configuration, in a project of its own."""
    for folder in ("protos", "scenarios"):
        shutil.copytree(ROOT / folder, pytester.path / folder)
    _protoc.generate(pytester.path / "protos", pytester.path / "generated")
    pytester.makefile(".toml", pyproject=_block("toml", "Configure it once"))
    pytester.makepyfile(test_checkout=_block("python", "tests/test_readme.py runs this block"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_readme_commands_use_real_flags() -> None:
    """The set-up commands name subcommands that exist."""
    setup = _block("sh", "Two commands on a fresh machine")
    assert "virtsvc gen protos && virtsvc serve" in setup
    assert "tox" in setup
    assert (ROOT / "tox.ini").read_text().count("[testenv:") >= 3


def _console_sessions() -> list[tuple[str, str]]:
    """The Quick start's ``$ command`` / output pairs (continuation lines joined)."""
    block = _block("console", "With the server from command 1 running")
    pairs: list[tuple[str, list[str]]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + next(lines).strip()
            pairs.append((command, []))
        elif pairs:
            pairs[-1][1].append(line)
    return [(command, "\n".join(out).strip()) for command, out in pairs]


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_readme_quick_start_with_grpcurl(catalog: object) -> None:
    """The Quick start's grpcurl commands print exactly what the README shows, against the sidecar's
    configuration (protos/ and scenarios/ from [tool.virtsvc])."""
    import shlex
    import subprocess

    from virtsvc import serve_in_process

    sessions = _console_sessions()
    assert len(sessions) == 3
    with serve_in_process(protos=ROOT / "protos", scenarios=ROOT / "scenarios") as server:
        for command, expected in sessions:
            argv = [server.address if a == "127.0.0.1:50051" else a for a in shlex.split(command)]
            run = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert (run.stdout + run.stderr).strip() == expected, command
