"""[tool.virtsvc] settings (virtsvc.config) and their use as defaults by the CLI."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from virtsvc.cli import main
from virtsvc.config import Settings, load_settings
from virtsvc.errors import ConfigError

ESTATE = Path(__file__).resolve().parents[1] / "protos"


def _pyproject(directory: Path, table: str) -> Path:
    path = directory / "pyproject.toml"
    path.write_text('[project]\nname = "demo"\n\n[tool.virtsvc]\n' + textwrap.dedent(table))
    return path


def test_no_pyproject_gives_builtin_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings == Settings()
    assert settings.source is None
    assert (settings.protos, settings.scenarios, settings.generated) == (None, (), Path("generated"))
    assert (settings.host, settings.port, settings.default_scenario) == ("127.0.0.1", 50051, None)


def test_pyproject_without_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\n[tool.other]\nx = 1\n')
    assert load_settings(tmp_path) == Settings()
    assert load_settings(tmp_path).source is None


def test_full_table_paths_relative_to_pyproject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pyproject = _pyproject(
        tmp_path,
        """\
        protos = "contracts"
        scenarios = ["scenarios", "more/scenarios"]
        generated = "build/gen"
        host = "0.0.0.0"
        port = 6000
        default_scenario = "happy"
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    root = tmp_path.resolve()
    for start in (tmp_path, pyproject):
        settings = load_settings(start)
        assert settings.protos == root / "contracts"
        assert settings.scenarios == (root / "scenarios", root / "more/scenarios")
        assert settings.generated == root / "build/gen"
        assert (settings.host, settings.port, settings.default_scenario) == ("0.0.0.0", 6000, "happy")
        assert settings.source == pyproject.resolve()


def test_scenarios_as_a_single_string(tmp_path: Path) -> None:
    _pyproject(tmp_path, 'scenarios = "scenarios"\n')
    settings = load_settings(tmp_path)
    assert settings.scenarios == (tmp_path.resolve() / "scenarios",)
    assert settings.generated == Path("generated")  # unset keys keep the built-in default


def test_misspelt_key_did_you_mean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pyproject(tmp_path, 'protos = "p"\nscenaros = "s"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    # file (with the line of the key), key, and the suggestion
    assert (
        str(exc.value)
        == "pyproject.toml:6: [tool.virtsvc] unknown key 'scenaros' (did you mean 'scenarios'?)"
    )


def test_unknown_key_without_close_match_lists_known_keys(tmp_path: Path) -> None:
    _pyproject(tmp_path, "colour = 1\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'colour' \(known keys: default_scenario, generated, host"
    ):
        load_settings(tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('port = "50051"', "port: expected a port number (integer 0-65535), got a string '50051'"),
        ("port = true", "port: expected a port number (integer 0-65535), got a boolean True"),
        ("port = 70000", "port: expected a port number (integer 0-65535), got an integer 70000"),
        ("protos = 3", "protos: expected a path (string), got an integer 3"),
        (
            "scenarios = [1, 2]",
            "scenarios: expected a path or a list of paths (strings), got an array [1, 2]",
        ),
        ('generated = ""', "generated: expected a path (string), got a string ''"),
        ("default_scenario = []", "default_scenario: expected a scenario name (string), got an array []"),
    ],
)
def test_wrong_types(tmp_path: Path, line: str, message: str) -> None:
    pyproject = _pyproject(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(tmp_path)
    assert str(exc.value) == f"{pyproject.resolve()}:5: [tool.virtsvc] {message}"


def test_invalid_toml_and_non_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.virtsvc\nprotos = 1\n")
    with pytest.raises(ConfigError, match=r"pyproject\.toml: not valid TOML"):
        load_settings(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool]\nvirtsvc = "protos"\n')
    with pytest.raises(ConfigError, match=r"\[tool.virtsvc\] must be a table, got a string"):
        load_settings(tmp_path)


def test_merged_flags_win() -> None:
    base = Settings(protos=Path("/p"), generated=Path("/g"), port=1, scenarios=(Path("/s"),))
    merged = base.merged(protos="other", generated=None, port=2, scenarios="one", host=None)
    assert merged.protos == Path("other")
    assert merged.generated == Path("/g")
    assert (merged.port, merged.host) == (2, "127.0.0.1")
    assert merged.scenarios == (Path("one"),)
    assert base.merged(scenarios=["a", Path("b")]).scenarios == (Path("a"), Path("b"))
    assert base.merged() == base
    with pytest.raises(TypeError):
        base.merged(prots="x")


def test_gen_without_arguments_uses_pyproject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    shutil.copytree(ESTATE, tmp_path / "contracts")
    _pyproject(tmp_path, 'protos = "contracts"\ngenerated = "build/gen"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["gen"]) == 0
    assert capsys.readouterr().out == "generated 17 files from 5 protos into build/gen/\n"
    assert "shop.v1.Orders" in json.loads((tmp_path / "build/gen/manifest.json").read_text())["services"]
    assert main(["gen"]) == 0
    assert capsys.readouterr().out == "build/gen/ is up to date (5 protos)\n"
    # flags win over the settings
    assert main(["gen", "-o", "flagged"]) == 0
    assert capsys.readouterr().out == "generated 17 files from 5 protos into flagged/\n"
    # from a subdirectory there is no ./pyproject.toml: PROTO_DIR is needed
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["gen"]) == 1
    assert "no PROTO_DIR given" in capsys.readouterr().err


def test_bad_settings_fail_every_command_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _pyproject(tmp_path, 'proto = "protos"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["gen", "protos"]) == 1
    assert capsys.readouterr().err == (
        "virtsvc: error: pyproject.toml:5: [tool.virtsvc] unknown key 'proto' (did you mean 'protos'?)\n"
    )
