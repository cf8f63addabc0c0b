"""`virtsvc diff` and virtsvc.contracts.diff: pairs of real proto trees compiled into tmp dirs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from virtsvc import cli
from virtsvc.contracts.diff import diff_catalogs, load_tree

BANK = """\
syntax = "proto3";

package bank.v1;

service Accounts {
  rpc Get(GetRequest) returns (Account);
  rpc Watch(GetRequest) returns (stream Account);
  rpc Upload(stream Account) returns (Summary);
}

service Audit {
  rpc Log(GetRequest) returns (Summary);
}

message GetRequest {
  string id = 1;
}

message Account {
  enum Kind {
    KIND_UNSPECIFIED = 0;
    CHECKING = 1;
    SAVINGS = 2;
  }
  message Owner {
    string name = 1;
    int32 age = 2;
  }
  string id = 1;
  Owner owner = 2;
  Kind kind = 3;
  repeated string tags = 4;
  map<string, int64> limits = 5;
  oneof contact {
    string email = 6;
    string phone = 7;
  }
  string note = 8;
}

message Summary {
  int32 count = 1;
}

enum Tier {
  TIER_UNSPECIFIED = 0;
  GOLD = 1;
}
"""

# edit -> the exact breaking lines `virtsvc diff` prints
BREAKING = {
    "service removed": (
        ("service Audit {\n  rpc Log(GetRequest) returns (Summary);\n}\n", ""),
        ["bank.v1.Audit: service removed"],
    ),
    "service renamed": (
        ("service Audit {", "service Audits {"),
        ["bank.v1.Audit: service removed (renamed to bank.v1.Audits?)"],
    ),
    "method removed": (
        ("  rpc Watch(GetRequest) returns (stream Account);\n", ""),
        ["bank.v1.Accounts/Watch: method removed"],
    ),
    "method renamed": (
        ("rpc Watch(", "rpc WatchAll("),
        ["bank.v1.Accounts/Watch: method removed (renamed to bank.v1.Accounts/WatchAll?)"],
    ),
    "server streaming dropped": (
        ("returns (stream Account)", "returns (Account)"),
        ["bank.v1.Accounts/Watch: streaming kind changed from server_streaming to unary"],
    ),
    "client streaming added": (
        ("rpc Get(GetRequest)", "rpc Get(stream GetRequest)"),
        ["bank.v1.Accounts/Get: streaming kind changed from unary to client_streaming"],
    ),
    "input type": (
        ("rpc Log(GetRequest)", "rpc Log(Summary)"),
        ["bank.v1.Audit/Log: input type changed from bank.v1.GetRequest to bank.v1.Summary"],
    ),
    "output type": (
        ("rpc Get(GetRequest) returns (Account)", "rpc Get(GetRequest) returns (Summary)"),
        ["bank.v1.Accounts/Get: output type changed from bank.v1.Account to bank.v1.Summary"],
    ),
    "field removed": (("  Owner owner = 2;\n", ""), ["bank.v1.Account.owner: field removed"]),
    "field renamed": (
        ("Owner owner = 2;", "Owner holder = 2;"),
        ["bank.v1.Account.owner: field 2 renamed to holder"],
    ),
    "field number": (
        ("string note = 8;", "string note = 9;"),
        ["bank.v1.Account.note: field number changed from 8 to 9"],
    ),
    "scalar type": (
        ("int32 age = 2;", "int64 age = 2;"),
        ["bank.v1.Account.Owner.age: type changed from int32 to int64"],
    ),
    "message type": (
        ("Owner owner = 2;", "Summary owner = 2;"),
        ["bank.v1.Account.owner: type changed from bank.v1.Account.Owner to bank.v1.Summary"],
    ),
    "enum to scalar": (
        ("Kind kind = 3;", "int32 kind = 3;"),
        ["bank.v1.Account.kind: type changed from bank.v1.Account.Kind to int32"],
    ),
    "map value type": (
        ("map<string, int64> limits", "map<string, int32> limits"),
        ["bank.v1.Account.limits: type changed from map<string, int64> to map<string, int32>"],
    ),
    "label repeated": (
        ("repeated string tags = 4;", "string tags = 4;"),
        ["bank.v1.Account.tags: label changed from repeated to singular"],
    ),
    "label optional": (
        ("string note = 8;", "optional string note = 8;"),
        ["bank.v1.Account.note: label changed from singular to optional"],
    ),
    "moved into a oneof": (
        (
            "    string phone = 7;\n  }\n  string note = 8;",
            "    string phone = 7;\n    string note = 8;\n  }",
        ),
        ["bank.v1.Account.note: moved into oneof contact"],
    ),
    "message and enum removed": (
        ("enum Tier {\n  TIER_UNSPECIFIED = 0;\n  GOLD = 1;\n}\n", ""),
        ["bank.v1.Tier: enum removed"],
    ),
    "enum value removed": (
        ("    SAVINGS = 2;\n", ""),
        ["bank.v1.Account.Kind.SAVINGS: enum value removed"],
    ),
    "enum value renamed": (
        ("SAVINGS = 2;", "SAVING = 2;"),
        ["bank.v1.Account.Kind.SAVINGS: enum value 2 renamed to SAVING"],
    ),
    "enum value renumbered": (
        ("SAVINGS = 2;", "SAVINGS = 5;"),
        ["bank.v1.Account.Kind.SAVINGS: enum value number changed from 2 to 5"],
    ),
}

ADDITIVE = {
    "field added": ("string note = 8;", "string note = 8;\n  bool vip = 9;"),
    "method added": ("service Audit {", "service Audit {\n  rpc Ping(GetRequest) returns (Summary);"),
    "service added": (
        "message Summary {",
        "service Extra {\n  rpc Go(Summary) returns (Summary);\n}\n\nmessage Summary {",
    ),
    "message added": ("message Summary {", "message Fresh {\n  string x = 1;\n}\n\nmessage Summary {"),
    "enum value added": ("GOLD = 1;", "GOLD = 1;\n  PLATINUM = 2;"),
    "comments and options": (
        "service Accounts {",
        '// The accounts.\noption java_package = "x.y";\nservice Accounts {',
    ),
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test compiles into a cache of its own: parallel workers never prune each other's entries."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _tree(root: Path, text: str) -> Path:
    (root / "bank" / "v1").mkdir(parents=True)
    (root / "bank" / "v1" / "bank.proto").write_text(text)
    return root


def _pair(tmp_path: Path, old: str, new: str) -> tuple[Path, Path]:
    return _tree(tmp_path / "old", old), _tree(tmp_path / "new", new)


def _edit(text: str, edit: tuple[str, str]) -> str:
    before, after = edit
    assert before in text, f"the edit must apply: {before!r}"
    return text.replace(before, after)


def _diff(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    capsys.readouterr()
    rc = cli.main(["diff", *args])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err.splitlines()


@pytest.mark.parametrize("case", sorted(BREAKING))
def test_each_breaking_change_is_one_named_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """Each kind of breaking change: exit 1, exactly its lines naming the element, a count on stderr."""
    edit, expected = BREAKING[case]
    if case == "message and enum removed":  # Summary, once no method uses it, and Tier
        new = _edit(
            _edit(BANK, edit),
            (
                "rpc Upload(stream Account) returns (Summary);",
                "rpc Upload(stream Account) returns (GetRequest);",
            ),
        )
        new = _edit(
            new, ("rpc Log(GetRequest) returns (Summary);", "rpc Log(GetRequest) returns (GetRequest);")
        )
        new = _edit(new, ("message Summary {\n  int32 count = 1;\n}\n", ""))
        expected = [
            "bank.v1.Accounts/Upload: output type changed from bank.v1.Summary to bank.v1.GetRequest",
            "bank.v1.Audit/Log: output type changed from bank.v1.Summary to bank.v1.GetRequest",
            "bank.v1.Summary: message removed",
            *expected,
        ]
    else:
        new = _edit(BANK, edit)
    old_dir, new_dir = _pair(tmp_path, BANK, new)
    rc, out, err = _diff([str(old_dir), str(new_dir)], capsys)
    assert (rc, out) == (1, expected)
    n = len(expected)
    assert err == [f"{n} breaking change{'s' if n > 1 else ''}"]


def test_identical_trees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two copies of one tree (under different file names even): exit 0, "no breaking changes (identical)"."""
    old_dir = _tree(tmp_path / "old", BANK)
    new_dir = tmp_path / "new"
    (new_dir / "other").mkdir(parents=True)
    (new_dir / "other" / "accounts.proto").write_text(BANK)
    assert _diff([str(old_dir), str(new_dir)], capsys) == (0, ["no breaking changes (identical)"], [])


def test_additions_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """New fields, methods, services, messages and enum values are not breaking: exit 0, counted."""
    new = BANK
    for edit in ADDITIVE.values():
        new = _edit(new, edit)
    old_dir, new_dir = _pair(tmp_path, BANK, new)
    assert _diff([str(old_dir), str(new_dir)], capsys) == (0, ["no breaking changes: 5 additions"], [])
    changes = diff_catalogs(load_tree(old_dir), load_tree(new_dir))
    assert sorted(str(c) for c in changes) == [
        "bank.v1.Account.vip: field added",
        "bank.v1.Audit/Ping: method added",
        "bank.v1.Extra: service added",
        "bank.v1.Fresh: message added",
        "bank.v1.Tier.PLATINUM: enum value added",
    ]
    assert not any(c.breaking for c in changes)


SCENARIO = """\
scenario: bank
rules:
  - method: bank.v1.Accounts/Get
    when:
      request: {id: {$eq: a-1}}
    reply: {id: a-1, owner: {name: Ann}}
  - method: bank.v1.Accounts/Get
    reply: {id: a-2, kind: SAVINGS, limits: {daily: "10"}}
  - method: bank.v1.Accounts/Watch
    stream:
      - reply: {id: a-3}
  - method: bank.v1.Audit/Log
    reply: {count: 1}
"""


def test_scenarios_name_the_rules_each_change_breaks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--scenarios: each change line names the rules (file:line) whose method or data it breaks."""
    new = _edit(BANK, ("Owner owner = 2;", "Owner holder = 2;"))
    new = _edit(new, ("    SAVINGS = 2;\n", ""))
    new = _edit(new, ("returns (stream Account)", "returns (Account)"))
    new = _edit(new, ("repeated string tags = 4;", "repeated string labels = 4;"))
    old_dir, new_dir = _pair(tmp_path, BANK, new)
    scenario = tmp_path / "bank.yaml"
    scenario.write_text(SCENARIO)
    rc, out, err = _diff([str(old_dir), str(new_dir), "--scenarios", str(scenario)], capsys)
    assert rc == 1
    assert out == [
        f"bank.v1.Account.Kind.SAVINGS: enum value removed; breaks {scenario}:7",
        f"bank.v1.Account.owner: field 2 renamed to holder; breaks {scenario}:3",
        "bank.v1.Account.tags: field 4 renamed to labels",
        f"bank.v1.Accounts/Watch: streaming kind changed from server_streaming to unary; breaks {scenario}:9",
    ]
    assert err == ["4 breaking changes, breaking 3 scenario rules"]


def test_the_readme_example_is_what_diff_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `virtsvc diff` example, run on the trees and scenario of the test above, prints it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("$ virtsvc diff ", readme.index("## Contract changes: `virtsvc diff`"))
    command, _, rest = readme[start:].partition("\n")
    expected = rest[: rest.index("```")].splitlines()
    new = _edit(BANK, ("Owner owner = 2;", "Owner holder = 2;"))
    new = _edit(new, ("    SAVINGS = 2;\n", ""))
    new = _edit(new, ("returns (stream Account)", "returns (Account)"))
    new = _edit(new, ("repeated string tags = 4;", "repeated string labels = 4;"))
    _tree(tmp_path / "protos-v1", BANK)
    _tree(tmp_path / "protos-v2", new)
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "bank.yaml").write_text(SCENARIO)
    monkeypatch.chdir(tmp_path)
    rc, out, _err = _diff(command.removeprefix("$ virtsvc diff ").split(), capsys)
    assert (rc, out) == (1, expected)


def test_scenarios_are_loaded_against_the_old_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scenario that does not fit the OLD tree is reported at file:line, exit 1."""
    old_dir, new_dir = _pair(tmp_path, BANK, BANK)
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(
        textwrap.dedent(
            """\
            scenario: bad
            rules:
              - method: bank.v1.Accounts/Gett
                reply: {}
            """
        )
    )
    rc, out, err = _diff([str(old_dir), str(new_dir), "--scenarios", str(scenario)], capsys)
    assert (rc, out) == (1, [])
    assert len(err) == 1 and err[0].startswith(f"{scenario}:3: ") and "bank.v1.Accounts/Get" in err[0]


@pytest.mark.parametrize("which", ["old", "new", "scenarios"])
def test_bad_paths_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str) -> None:
    """A missing tree or scenario path: exit 1 and one line naming it, never a traceback."""
    good = _tree(tmp_path / "good", BANK)
    missing = tmp_path / "missing"
    args = {
        "old": [str(missing), str(good)],
        "new": [str(good), str(missing)],
        "scenarios": [str(good), str(good), "--scenarios", str(missing)],
    }[which]
    rc, out, err = _diff(args, capsys)
    what = "scenario file or directory" if which == "scenarios" else "proto directory or descriptor set"
    assert (rc, out, err) == (1, [], [f"virtsvc: error: {missing}: no such {what}"])


def test_descriptor_sets_compare_like_trees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """OLD and NEW may be descriptor sets (virtsvc gen's descriptors.binpb) as well as proto trees."""
    old_dir, new_dir = _pair(tmp_path, BANK, _edit(BANK, ("  Owner owner = 2;\n", "")))
    for name, tree in (("old", old_dir), ("new", new_dir)):
        assert cli.main(["gen", str(tree), "--out", str(tmp_path / f"gen-{name}")]) == 0
    rc, out, _err = _diff(
        [str(tmp_path / "gen-old" / "descriptors.binpb"), str(tmp_path / "gen-new" / "descriptors.binpb")],
        capsys,
    )
    assert (rc, out) == (1, ["bank.v1.Account.owner: field removed"])
