"""The README's examples are run, so the documentation cannot rot."""

from __future__ import annotations

import argparse
import inspect
import re
import shutil
import sys
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


def test_readme_virtual_time_example(pytester: pytest.Pytester) -> None:
    """The virtual-time example passes as written: a backoff loop in virtual seconds, and real deadlines."""
    for folder in ("protos", "scenarios"):
        shutil.copytree(ROOT / folder, pytester.path / folder)
    _protoc.generate(pytester.path / "protos", pytester.path / "generated")
    pytester.makefile(".toml", pyproject=_block("toml", "Configure it once"))
    pytester.makepyfile(test_clock=_block("python", "runs this block as a pytest project of its own (with"))
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
    return _console_pairs(_block("console", "With the server from command 1 running"))


def _console_pairs(block: str) -> list[tuple[str, str]]:
    """A console block's ``$ command`` / output pairs (continuation lines joined)."""
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


def _table_calls(after: str) -> dict[str, str]:
    """The first cells (`.name(...)`) of the Markdown table after ``after``, by method name."""
    start = README.index(after)
    table = README[start:].split("\n\n")[1]
    calls: dict[str, str] = {}
    for row in table.splitlines()[2:]:
        for code in re.findall(r"`(\.[a-z_]+(?:\(.*?\))?)`", row.split(" | ")[0]):
            calls[code[1:].split("(")[0]] = code
    return calls


def _shown(fn: object) -> str:
    """How the README writes a signature: ``.name(a, b=None, *, c=None)``, without ``self``."""
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    parts: list[str] = []
    for param in list(sig.parameters.values())[1:]:
        if param.kind is param.KEYWORD_ONLY and "*" not in parts:
            parts.append("*")
        parts.append(param.name if param.default is param.empty else f"{param.name}={param.default!r}")
    return f".{fn.__name__}({', '.join(parts)})"  # type: ignore[attr-defined]


def test_readme_builder_signatures_are_the_code_s() -> None:
    """Every rule builder is documented with its real signature, and every documented one exists."""
    from virtsvc.testing.service import InlineRule

    documented = _table_calls("The builders `.on(...)` returns")
    builders = ("reply", "fail", "stream", "sequence", "each_request", "replies", "fault", "handler")
    assert sorted(documented) == sorted(builders)
    for name in builders:
        assert documented[name] == _shown(getattr(InlineRule, name)), name


def test_readme_effect_builders_are_the_code_s() -> None:
    """The effect builders' table names every one with its real signature."""
    from virtsvc.testing.service import InlineRule

    documented = _table_calls("Effects, added to a rule after its answer")
    assert sorted(documented) == ["put", "remove", "remove_self"]
    for name, shown in documented.items():
        assert shown == _shown(getattr(InlineRule, name)), name


def test_readme_virtual_service_calls_are_the_code_s() -> None:
    """The `virtual_service` table names real methods with their real signatures, and every public one."""
    from virtsvc.testing.service import VirtualService

    documented = _table_calls("`virtual_service` (a `virtsvc.testing.VirtualService`)")
    for name, shown in documented.items():
        member = getattr(VirtualService, name)
        if isinstance(member, property):
            assert shown == f".{name}", name
        else:
            assert shown == _shown(member), name
    public = {
        n
        for n, v in vars(VirtualService).items()
        if not n.startswith("_") and (callable(v) or isinstance(v, property))
    }
    # plain attributes, and what the plugin itself calls at teardown
    internal = {
        "close",
        "rules",
        "address",
        "scenario",
        "session",
        "unmatched_text",
        "rule_problems",
        "format_problems",
    }
    assert public - internal <= set(documented), public - internal - set(documented)


def _help_flags(command: str) -> set[str]:
    from virtsvc.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        flag
        for action in sub.choices[command]._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }


def test_readme_serve_synopsis_lists_every_flag() -> None:
    """The sidecar's synopsis names every flag `virtsvc serve --help` lists, and none it does not."""
    synopsis = _block("", "checks that this synopsis lists every flag")
    shown = set(re.findall(r"(--[a-z][a-z-]*)", synopsis)) | {
        "--include" for _ in re.findall(r"\[-I INCLUDE", synopsis)
    }
    assert shown == _help_flags("serve")


def test_readme_module_map_lists_every_module() -> None:
    """The Development section's module map lists every module and package of virtsvc/, and no other."""
    block = README[README.index("```\nvirtsvc/\n") + 4 :].split("```")[0]
    listed: set[str] = set()
    parents: list[str] = []  # the package path down to the current depth
    for line in block.splitlines()[1:]:
        indent = len(line) - len(line.lstrip(" "))
        name = line.strip().split(" ")[0]
        if not name or indent % 2 or indent > 8:
            continue  # a description's continuation line
        depth = indent // 2 - 1
        del parents[depth:]
        path = "/".join([*parents, name.rstrip("/")])
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
            if not (ROOT / "virtsvc" / path / "__init__.py").exists():
                continue  # a data folder (static files, the admin contract), not a package
        elif not name.endswith(".py"):
            continue  # a data file
        listed.add(path)
    on_disk = {
        p.relative_to(ROOT / "virtsvc").as_posix()
        for p in (ROOT / "virtsvc").rglob("*.py")
        if p.name != "__init__.py" and "v1" not in p.parts and "__pycache__" not in p.parts
    }
    on_disk |= {
        p.parent.relative_to(ROOT / "virtsvc").as_posix()
        for p in (ROOT / "virtsvc").rglob("__init__.py")
        if p.parent != ROOT / "virtsvc"
    }
    assert listed == on_disk | {"__init__.py"}


def test_readme_near_miss_example_is_what_a_call_gets(
    catalog: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The near-miss text in "Routing and sessions" is exactly what the call described under it receives."""
    import grpc

    from virtsvc import serve_in_process

    shown = _block("", "compares the message line by line").strip()
    monkeypatch.chdir(ROOT)  # paths in messages are shown as given
    method = catalog.method("shop.v1.Inventory/Reserve")  # type: ignore[attr-defined]
    request = method.input_class(sku="XYZ", qty=3, region=1, labels={"channel": "web"})
    with (
        serve_in_process(protos="protos", scenarios="scenarios") as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        call = channel.unary_unary(method.path, request_serializer=method.input_class.SerializeToString)
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=(("x-virtsvc-scenario", "matching"), ("x-virtsvc-session", "t-42")))
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details().splitlines() == shown.splitlines()
    assert '{"sku": "XYZ", "qty": 3, "region": "REGION_EU", "labels": {"channel": "web"}}' in README


def test_readme_check_and_gen_lines_are_what_they_print(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`virtsvc check scenarios/`, `virtsvc gen` and `--version` print what the README says they print."""
    from virtsvc.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["check", "scenarios/"]) == 0
    assert f"exit 0 with\n`{capsys.readouterr().out.strip()}`" in README
    out = tmp_path / "generated"
    assert main(["gen", "protos", "--out", str(out)]) == 0
    first = capsys.readouterr().out.strip().replace(str(out), "generated")
    assert main(["gen", "protos", "--out", str(out)]) == 0
    again = capsys.readouterr().out.strip().replace(str(out), "generated")
    assert f"`{first}`" in README, first
    assert f"`{again}`" in README, again
    assert main(["--version"]) == 0
    assert re.fullmatch(r"virtsvc \d+\.\d+\.\d+\S*", capsys.readouterr().out.strip())


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_readme_put_scenario_needs_no_jq(tmp_path: Path) -> None:
    """The admin PutScenario example works as written with python3 and grpcurl alone."""
    import subprocess

    from virtsvc import serve_in_process

    block = _block("sh", "The admin API, `virtsvc.admin.v1.Admin` on the same port")
    lines = block.splitlines()
    first = next(i for i, line in enumerate(lines) if "my-scenario.yaml" in line)
    command = (lines[first].rstrip("\\") + lines[first + 1].split("#")[0]).replace("python3", sys.executable)
    (tmp_path / "my-scenario.yaml").write_text(
        "scenario: from-readme\nrules:\n  - method: shop.v1.Inventory/Ping\n    reply: {}\n"
    )
    with serve_in_process(protos=ROOT / "protos") as server:
        command = command.replace("127.0.0.1:50051", server.address)
        run = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30
        )
        assert run.returncode == 0, run.stderr
        import grpc

        from virtsvc.admin import AdminClient

        with grpc.insecure_channel(server.address) as channel:
            listed = AdminClient(channel).call("ListScenarios").scenarios
        assert "from-readme" in {s.name for s in listed}


def test_interop_test_skips_with_a_reason_without_node(tmp_path: Path) -> None:
    """On a machine without Node.js the interop test is reported as skipped with its reason, never passed."""
    import os
    import subprocess

    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(bare)}
    run = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-rs", "-q"),
            str(ROOT / "tests" / "test_interop_node.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout and "Node.js is not installed" in run.stdout, run.stdout


def test_readme_gripmock_import_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The 'Coming from GripMock' stubs import as the README says, and the scenario answers both stubs."""
    from virtsvc import VirtualServer, cli
    from virtsvc.contracts import Catalog
    from virtsvc.scenarios import load_scenarios

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "reserve.yaml").write_text(_block("yaml", "## Coming from GripMock"))
    command, printed = next(
        (c, o) for c, o in _console_pairs(_block("console", "## Coming from GripMock")) if "import" in c
    )
    argv = command.split()[1:]
    out = tmp_path / argv[argv.index("-o") + 1]
    argv[argv.index("-o") + 1] = str(out)
    argv[argv.index("stubs")] = str(stubs)
    assert cli.main([*argv, "--protos", str(ROOT / "protos")]) == 0
    assert capsys.readouterr().out.strip() == printed.replace(
        "scenarios/imported/stubs.yaml", str(out / "stubs.yaml")
    )
    import grpc

    catalog = Catalog.from_protos(ROOT / "protos")
    server = VirtualServer(catalog, load_scenarios(out, catalog), default_scenario="stubs").start()
    try:
        reserve = catalog.method("shop.v1.Inventory/Reserve")
        with grpc.insecure_channel(server.address) as channel:
            call = channel.unary_unary(
                "/shop.v1.Inventory/Reserve",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=reserve.output_class.FromString,
            )
            reply = call(reserve.input_class(sku="ABC-1"))
            assert (reply.reservation_id, reply.qty_reserved) == ("r-ABC-1", 3)
            with pytest.raises(grpc.RpcError) as failed:
                call(reserve.input_class(sku="OUT-7"))
            assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert failed.value.details() == "out of stock"
    finally:
        server.stop(grace=None)
