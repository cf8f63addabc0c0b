"""Contract fingerprints (virtsvc.contracts.fingerprint) and the stale-rule report of `virtsvc check`.

Every proto tree here is a real tree compiled by the project's protoc wrapper into a tmp dir.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from virtsvc import cli
from virtsvc.contracts.catalog import Catalog
from virtsvc.contracts.fingerprint import method_fingerprint
from virtsvc.scenarios.loader import load_scenarios
from virtsvc.scenarios.staleness import stale_rules

BANK = """\
syntax = "proto3";

package bank.v1;

option go_package = "example.com/bank/v1;bankv1";
option java_package = "com.example.bank.v1";

service Accounts {
  rpc Get(GetRequest) returns (Account);
  rpc Watch(GetRequest) returns (stream Account);
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
  optional string note = 8;
}

message Unrelated {
  string x = 1;
}
"""

METHOD = "bank.v1.Accounts/Get"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test compiles into a cache of its own: parallel workers never prune each other's entries."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _catalog(tmp_path: Path, files: dict[str, str], name: str = "tree") -> Catalog:
    root = tmp_path / name
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Catalog.from_protos(root, cache_dir=tmp_path / "cache")


def _fp(tmp_path: Path, text: str, name: str, method: str = METHOD, file: str = "bank/v1/bank.proto") -> str:
    return method_fingerprint(_catalog(tmp_path, {file: text}, name), method)


def test_fingerprint_form_and_stability(tmp_path: Path) -> None:
    """A fingerprint is sha256: and 24 hex digits, the same for two compiles, and differs between methods."""
    first = _fp(tmp_path, BANK, "a")
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 24
    assert int(first.removeprefix("sha256:"), 16) >= 0
    assert _fp(tmp_path, BANK, "b") == first
    assert _fp(tmp_path, BANK, "c", method="bank.v1.Accounts/Watch") != first


def test_unknown_method_names_the_closest(tmp_path: Path) -> None:
    """Asking for a method the catalog lacks raises KeyError with a did-you-mean."""
    catalog = _catalog(tmp_path, {"bank.proto": BANK})
    with pytest.raises(KeyError, match=r"bank\.v1\.Accounts/Get"):
        method_fingerprint(catalog, "bank.v1.Accounts/Gte")


SAME = {
    "comments": BANK.replace(
        "message Account {", "// An account.\n/* block */\nmessage Account {  // trailing"
    ),
    "option order": BANK.replace(
        'option go_package = "example.com/bank/v1;bankv1";\noption java_package = "com.example.bank.v1";',
        'option java_package = "com.example.bank.v1";\noption go_package = "example.com/bank/v1;bankv1";',
    ),
    "field options": BANK.replace("int32 age = 2;", "int32 age = 2 [deprecated = true];"),
    "unrelated message changed": BANK.replace("string x = 1;", "int64 x = 1;\n  string y = 2;"),
    "unrelated message added": BANK + "\nmessage Other {\n  repeated bytes blobs = 1;\n}\n",
    "another method added": BANK.replace(
        "rpc Get(GetRequest) returns (Account);",
        "rpc Get(GetRequest) returns (Account);\n  rpc Delete(GetRequest) returns (Unrelated);",
    ),
    "declaration order": BANK.replace(
        "  string id = 1;\n  Owner owner = 2;", "  Owner owner = 2;\n  string id = 1;"
    ),
}


@pytest.mark.parametrize("case", sorted(SAME))
def test_fingerprint_ignores_what_is_not_contract(tmp_path: Path, case: str) -> None:
    """Comments, options and their order, unrelated types and methods, declaration order: same fingerprint."""
    assert _fp(tmp_path, SAME[case], "new") == _fp(tmp_path, BANK, "old")


def test_fingerprint_ignores_file_names_and_layout(tmp_path: Path) -> None:
    """The same types under another file name, or split across two files, keep their fingerprint."""
    assert _fp(tmp_path, BANK, "renamed", file="elsewhere/accounts_api.proto") == _fp(tmp_path, BANK, "old")
    owner = "message Owner {\n    string name = 1;\n    int32 age = 2;\n  }\n"
    top_level_owner = 'syntax = "proto3";\npackage bank.v1;\n' + owner.replace("    ", "  ")
    api = BANK.replace("  " + owner, "").replace("Owner owner = 2;", "bank.v1.Owner owner = 2;")
    flat = api + top_level_owner.split("\n", 2)[2]
    split = api.replace("option go_package", 'import "bank/v1/owner.proto";\n\noption go_package')
    one_file = method_fingerprint(_catalog(tmp_path, {"bank/v1/api.proto": flat}, "flat"), METHOD)
    two_files = {"bank/v1/api.proto": split, "bank/v1/owner.proto": top_level_owner}
    assert method_fingerprint(_catalog(tmp_path, two_files, "split"), METHOD) == one_file
    renamed = {
        "a.proto": split.replace('"bank/v1/owner.proto"', '"b/people.proto"'),
        "b/people.proto": top_level_owner,
    }
    assert method_fingerprint(_catalog(tmp_path, renamed, "split2"), METHOD) == one_file


CHANGED = {
    "field renamed": BANK.replace("string id = 1;\n  Owner", "string account_id = 1;\n  Owner"),
    "field number": BANK.replace("repeated string tags = 4;", "repeated string tags = 9;"),
    "field type": BANK.replace("repeated string tags = 4;", "repeated bytes tags = 4;"),
    "field label": BANK.replace("repeated string tags = 4;", "string tags = 4;"),
    "field removed": BANK.replace("  repeated string tags = 4;\n", ""),
    "field added": BANK.replace("optional string note = 8;", "optional string note = 8;\n  bool vip = 9;"),
    "proto3 optional": BANK.replace("optional string note = 8;", "string note = 8;"),
    "nested message field": BANK.replace("int32 age = 2;", "int64 age = 2;"),
    "message type of a field": BANK.replace("Owner owner = 2;", "Unrelated owner = 2;"),
    "enum value removed": BANK.replace("    SAVINGS = 2;\n", ""),
    "enum value renamed": BANK.replace("SAVINGS = 2;", "SAVING = 2;"),
    "enum value renumbered": BANK.replace("SAVINGS = 2;", "SAVINGS = 3;"),
    "enum value added": BANK.replace("SAVINGS = 2;", "SAVINGS = 2;\n    LOAN = 3;"),
    "oneof membership": BANK.replace("    string phone = 7;\n  }", "  }\n  string phone = 7;"),
    "oneof renamed": BANK.replace("oneof contact {", "oneof reach {"),
    "map value type": BANK.replace("map<string, int64> limits = 5;", "map<string, int32> limits = 5;"),
    "map to repeated": BANK.replace(
        "map<string, int64> limits = 5;",
        "repeated LimitsEntry limits = 5;\n  message LimitsEntry {\n"
        "    string key = 1;\n    int64 value = 2;\n  }",
    ),
    "input field": BANK.replace(
        "message GetRequest {\n  string id = 1;", "message GetRequest {\n  int64 id = 1;"
    ),
    "input type": BANK.replace("rpc Get(GetRequest)", "rpc Get(Unrelated)"),
    "output type": BANK.replace("returns (Account);", "returns (Unrelated);"),
    "client streaming": BANK.replace("rpc Get(GetRequest)", "rpc Get(stream GetRequest)"),
    "server streaming": BANK.replace("returns (Account);", "returns (stream Account);"),
    "package": BANK.replace("package bank.v1;", "package bank.v2;"),
}


@pytest.mark.parametrize("case", sorted(CHANGED))
def test_fingerprint_changes_with_the_contract(tmp_path: Path, case: str) -> None:
    """Each kind of change to the method's kinds or its messages, transitively, changes the fingerprint."""
    text = CHANGED[case]
    assert text != BANK, "the edit must apply"
    method = METHOD.replace("bank.v1", "bank.v2") if case == "package" else METHOD
    assert _fp(tmp_path, text, "new", method=method) != _fp(tmp_path, BANK, "old")


RECORDED = """\
scenario: recorded
rules:
  - method: bank.v1.Accounts/Get
    contract: "{fp}"
    reply: {{id: "a-1"}}
  - method: bank.v1.Accounts/Watch
    reply: {{id: "a-2"}}
"""


def _check(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # what compiling the trees above logged
    rc = cli.main(["check", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_check_passes_a_current_contract_and_names_a_stale_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rule with today's contract: passes `check`; once the proto changes, `check` names it at file:line."""
    protos = tmp_path / "protos"
    (protos / "bank").mkdir(parents=True)
    (protos / "bank" / "bank.proto").write_text(BANK)
    before = method_fingerprint(Catalog.from_protos(protos, cache_dir=tmp_path / "cache"), METHOD)
    scenario = tmp_path / "recorded.yaml"
    scenario.write_text(RECORDED.format(fp=before))
    assert _check(["--protos", str(protos), str(scenario)], capsys) == (
        0,
        "checked 1 scenario, 2 rules: ok\n",
        "",
    )

    (protos / "bank" / "bank.proto").write_text(CHANGED["enum value removed"])
    catalog = Catalog.from_protos(protos, cache_dir=tmp_path / "cache")
    after = method_fingerprint(catalog, METHOD)
    stale = stale_rules(load_scenarios([scenario], catalog), catalog)
    assert [(s.rule.where, s.recorded, s.current) for s in stale] == [(f"{scenario}:3", before, after)]
    rc, out, err = _check(["--protos", str(protos), str(scenario)], capsys)
    assert (rc, out) == (1, "")
    assert err == (
        f"{scenario}:3: rule recorded against a contract that has since changed: bank.v1.Accounts/Get "
        f"(recorded {before}, now {after}); re-record it with `virtsvc record --mode refresh`\n"
    )


@pytest.mark.parametrize(
    ("value", "shown"),
    [("sha1:abc", '"sha1:abc"'), ("sha256:XYZ0000000", '"sha256:XYZ0000000"'), ("12", "12")],
)
def test_malformed_contract_is_a_located_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, shown: str
) -> None:
    """contract: that is not a fingerprint is reported at its file:line with the expected form."""
    protos = tmp_path / "protos"
    protos.mkdir()
    (protos / "bank.proto").write_text(BANK)
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(
        textwrap.dedent(
            f"""\
            scenario: bad
            rules:
              - method: bank.v1.Accounts/Get
                reply: {{id: "a"}}
                contract: {value}
            """
        )
    )
    rc, _out, err = _check(["--protos", str(protos), str(scenario)], capsys)
    assert rc == 1
    assert err.startswith(f"{scenario}:5:")
    assert "contract: expected a contract fingerprint like" in err
    assert err.rstrip().endswith(f"got {shown}")
