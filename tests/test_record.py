"""`virtsvc record` against a real upstream (a hand-written grpcio servicer on loopback): the proxy answers
as the real service does, the file replays through `virtsvc serve` to the same answers, secrets never reach
it, interrupted recordings leave a valid file, the schema comes through reflection, and every record mode."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import yaml
from _upstream import Upstream, every_kind, run_virtsvc, start_upstream

from virtsvc.contracts import Catalog
from virtsvc.record import Interaction, Redaction, to_rules
from virtsvc.record.writer import write_scenario
from virtsvc.server import VirtualServer
from virtsvc.upstream.reflection import REFLECTION_PATHS, fetch_file_set

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


@pytest.fixture(scope="module")
def upstream(pb: SimpleNamespace) -> Iterator[Upstream]:
    up = start_upstream(pb)
    try:
        yield up
    finally:
        up.stop()


def _redacted(answers: list[Any]) -> list[Any]:
    """Answers with the values recording redacts (cookies, API keys, authorization) blanked out."""
    secret = {"set-cookie", "x-api-key", "authorization"}

    def clean(pairs: Any) -> Any:
        return tuple((k, "REDACTED" if k in secret else v) for k, v in pairs)

    out = []
    for item in answers:
        if isinstance(item, tuple):
            replies, headers, trailers, code, details = item
            out.append((replies, clean(headers), clean(trailers), code, details))
        else:
            out.append(item)
    return out


def test_record_then_replay_every_kind(
    spawn: Any, upstream: Upstream, pb: SimpleNamespace, tmp_path: Path
) -> None:
    """Through `virtsvc record` (a real process) every RPC kind answers exactly as the real service; on
    SIGINT the file is complete, `check` passes it, and `serve` replays it to the same answers (redacted
    values aside), identical requests with different answers as a sequence."""
    with grpc.insecure_channel(upstream.address) as direct:
        expected = every_kind(pb, direct)
    record = spawn("record", "--upstream", upstream.address, "--protos", str(PROTOS), "--out", "rec.yaml",
                   "--port", "0")  # fmt: skip
    ready = record.wait_serving()
    assert ready["upstream"] == upstream.address and ready["port"] > 0
    with grpc.insecure_channel(record.address) as channel:
        recorded = every_kind(pb, channel)
        inv = pb.inv_grpc.InventoryStub(channel)
        on_hand = [inv.GetItem(pb.inv.GetItemRequest(sku="X"), timeout=5).on_hand for _ in range(2)]
    assert recorded == expected
    assert record.stop() == 0
    assert [e["event"] for e in record.events()][-1] == "recorded"
    text = (tmp_path / "rec.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    assert doc["scenario"] == "rec"
    assert all(rule["contract"].startswith("sha256:") for rule in doc["rules"])
    getitem = next(r for r in doc["rules"] if r["method"] == "shop.v1.Inventory/GetItem")
    assert [step["reply"]["onHand"] for step in getitem["sequence"]] == [str(n) for n in on_hand]
    checked = run_virtsvc("check", "--protos", str(PROTOS), "rec.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    serve = spawn("serve", "--protos", str(PROTOS), "--scenarios", "rec.yaml", "--default-scenario", "rec",
                  "--port", "0")  # fmt: skip
    serve.wait_serving()
    with grpc.insecure_channel(serve.address) as channel:
        replayed = every_kind(pb, channel)
        inv = pb.inv_grpc.InventoryStub(channel)
        assert [inv.GetItem(pb.inv.GetItemRequest(sku="X"), timeout=5).on_hand for _ in range(2)] == on_hand
    assert replayed == _redacted(recorded)
    assert serve.stop() == 0


def test_secrets_never_reach_the_file(
    spawn: Any, upstream: Upstream, pb: SimpleNamespace, tmp_path: Path
) -> None:
    """authorization, cookie and API-key-like headers are redacted by default; --redact adds headers and
    request/reply field paths (a redacted request field leaves the matcher, so replay still answers)."""
    record = spawn("record", "--upstream", upstream.address, "--protos", str(PROTOS), "--out", "rec.yaml",
                   "--port", "0", "--redact", "x-trace", "reply.reservation_id", "--redact",
                   "request.card.number")  # fmt: skip
    record.wait_serving()
    with grpc.insecure_channel(record.address) as channel:
        pb.inv_grpc.InventoryStub(channel).Reserve(pb.inv.ReserveRequest(sku="A", qty=1), timeout=5)
        pay = pb.pay_grpc.PaymentsStub(channel)
        pay.Charge(
            pb.pay.ChargeRequest(account="acct", card=pb.pay.Card(number="4111222233334444")), timeout=5
        )
    assert record.stop(signal.SIGTERM) == 0
    data = (tmp_path / "rec.yaml").read_bytes()
    for secret in (b"s3cr3t", b"k-12345", b"up-secret", b"4111222233334444", b"t-A", b"real-A-1"):
        assert secret not in data
    assert data.count(b"REDACTED") == 5  # set-cookie, x-api-key, x-trace, reservationId, authorization
    rules = yaml.safe_load(data)["rules"]
    charge = next(r for r in rules if r["method"] == "shop.v1.Payments/Charge")
    assert charge["when"]["request"] == {"account": "acct", "card": {}}
    assert run_virtsvc("check", "--protos", str(PROTOS), "rec.yaml", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_recording_leaves_a_valid_file(
    spawn: Any, upstream: Upstream, pb: SimpleNamespace, tmp_path: Path, sig: int
) -> None:
    """SIGINT or SIGTERM with a call in flight: the file holds every finished call, `check` passes it,
    and no temporary file is left beside it."""
    record = spawn("record", "--upstream", upstream.address, "--protos", str(PROTOS), "--out", "rec.yaml",
                   "--port", "0", "--keep-latency")  # fmt: skip
    record.wait_serving()
    channel = grpc.insecure_channel(record.address)
    try:
        inv = pb.inv_grpc.InventoryStub(channel)
        for sku in ("A", "B", "C"):
            inv.Reserve(pb.inv.ReserveRequest(sku=sku, qty=1), timeout=5)
        slow = inv.Ping.future(_empty(), metadata=(("x-sleep", "0.5"),))
        assert record.stop(sig) == 0
        slow.exception(timeout=5)
    finally:
        channel.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".rec.yaml")) == []
    rules = yaml.safe_load((tmp_path / "rec.yaml").read_text(encoding="utf-8"))["rules"]
    reserves = [r for r in rules if r["method"] == "shop.v1.Inventory/Reserve"]
    assert [r["when"]["request"]["sku"] for r in reserves] == ["A", "B", "C"]
    assert all(r["delay"].endswith("ms") for r in reserves)  # --keep-latency
    assert run_virtsvc("check", "--protos", str(PROTOS), "rec.yaml", cwd=tmp_path).returncode == 0


def _empty() -> Any:
    from google.protobuf import empty_pb2

    return empty_pb2.Empty()


def test_the_schema_comes_through_reflection(
    spawn: Any, upstream: Upstream, pb: SimpleNamespace, tmp_path: Path, catalog: Catalog
) -> None:
    """Without --protos or --descriptors, record learns the contracts through the upstream's reflection:
    v1alpha from a grpcio-reflection server, v1 from a server that has it."""
    with grpc.insecure_channel(upstream.address) as channel:
        file_set, path = fetch_file_set(channel, upstream.address)
    assert path == REFLECTION_PATHS[1]  # grpcio-reflection serves v1alpha only
    assert "shop/v1/inventory.proto" in [f.name for f in file_set.file]
    with VirtualServer(catalog, [], port=0) as virtual, grpc.insecure_channel(virtual.address) as channel:
        assert fetch_file_set(channel, virtual.address)[1] == REFLECTION_PATHS[0]
    record = spawn("record", "--upstream", upstream.address, "--out", "rec.yaml", "--port", "0")
    assert set(record.wait_serving()["services"]) == {
        "shop.v1.Inventory",
        "shop.v1.Orders",
        "shop.v1.Payments",
    }
    with grpc.insecure_channel(record.address) as channel:
        stream = pb.inv_grpc.InventoryStub(channel).Watch(pb.inv.WatchRequest(skus=["z"]), timeout=5)
        assert [e.sku for e in stream] == ["z"]
    assert record.stop() == 0
    assert run_virtsvc("check", "--protos", str(PROTOS), "rec.yaml", cwd=tmp_path).returncode == 0


def test_reflection_failure_is_one_clear_line(tmp_path: Path) -> None:
    """An upstream that cannot be reached for its schema: exit 1 and one line saying what to do."""
    done = run_virtsvc("record", "--upstream", "127.0.0.1:1", "--out", "rec.yaml", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "give --protos DIR or --descriptors FILE" in lines[0], done.stderr
    assert lines[0].startswith(
        "virtsvc: error: cannot learn the contracts of 127.0.0.1:1 through server reflection"
    )


def _record(spawn: Any, upstream: Upstream, pb: SimpleNamespace, *args: str, skus: tuple[str, ...]) -> Any:
    record = spawn("record", "--upstream", upstream.address, "--protos", str(PROTOS), "--out", "rec.yaml",
                   "--port", "0", *args)  # fmt: skip
    record.wait_serving()
    with grpc.insecure_channel(record.address) as channel:
        for sku in skus:
            pb.inv_grpc.InventoryStub(channel).Reserve(pb.inv.ReserveRequest(sku=sku, qty=1), timeout=5)
    assert record.stop() == 0
    return record


def _skus(tmp_path: Path) -> list[str]:
    rules = yaml.safe_load((tmp_path / "rec.yaml").read_text(encoding="utf-8"))["rules"]
    return [r["when"]["request"]["sku"] for r in rules]


def test_record_modes(spawn: Any, upstream: Upstream, pb: SimpleNamespace, tmp_path: Path) -> None:
    """once writes a new file and refuses an existing one at start-up (exit 1, one line); new_episodes
    keeps the file's rules and adds only calls it lacks; all records it anew."""
    _record(spawn, upstream, pb, skus=("A", "B"))
    assert _skus(tmp_path) == ["A", "B"]
    args = ["record", "--upstream", upstream.address, "--protos", str(PROTOS), "--out", "rec.yaml"]
    refused = run_virtsvc(*args, cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "virtsvc: error: rec.yaml exists: --mode once records a new file only; use --mode new_episodes to "
        "add to it or --mode all to record it anew"
    ]
    (tmp_path / "rec.yaml").write_text(
        (tmp_path / "rec.yaml").read_text(encoding="utf-8").replace("real-A-1", "edited-by-hand"),
        encoding="utf-8",
    )
    _record(spawn, upstream, pb, "--mode", "new_episodes", skus=("B", "C"))
    text = (tmp_path / "rec.yaml").read_text(encoding="utf-8")
    assert _skus(tmp_path) == ["A", "B", "C"] and "edited-by-hand" in text
    _record(spawn, upstream, pb, "--mode", "all", skus=("D",))
    assert _skus(tmp_path) == ["D"]


def test_rules_from_interactions_sequences_and_specificity() -> None:
    """Identical requests with different answers become a sequence; answers differing only in latency are
    one; a request with more fields gets its rule before a subset of it; an empty request matches last."""

    def call(request: dict[str, Any], reply: dict[str, Any], duration: float = 0.01) -> Interaction:
        return Interaction("shop.v1.Inventory/Reserve", "unary", [request], [reply], duration=duration)

    rules = to_rules(
        [
            call({}, {"reservationId": "any"}),
            call({"sku": "A"}, {"reservationId": "1"}),
            call({"sku": "A", "qty": 2}, {"reservationId": "2"}),
            call({"sku": "A"}, {"reservationId": "3"}),
            call({"sku": "B"}, {"reservationId": "b"}, 0.01),
            call({"sku": "B"}, {"reservationId": "b"}, 0.03),
        ],
        keep_latency=True,
        redaction=Redaction(),
    )
    assert [r.get("when", {}).get("request") for r in rules] == [
        {"sku": "A", "qty": 2},
        {"sku": "A"},
        {"sku": "B"},
        None,
    ]
    assert [s["reply"]["reservationId"] for s in rules[1]["sequence"]] == ["1", "3"]
    assert rules[2]["reply"] == {"reservationId": "b"} and rules[2]["delay"] == "10.0ms"


def test_the_writer_replaces_the_file_atomically(tmp_path: Path) -> None:
    """The scenario is written beside the file and swapped in: a reader sees the old or the new whole."""
    out = tmp_path / "s.yaml"
    write_scenario(out, "s", [{"method": "shop.v1.Inventory/Ping", "reply": {}}])
    inode = out.stat().st_ino
    write_scenario(out, "s", [])
    assert out.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert yaml.safe_load(out.read_text(encoding="utf-8")) == {"scenario": "s", "rules": []}
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]


def test_refresh_re_records_only_the_rules_whose_contract_changed(
    spawn: Any, upstream: Upstream, pb: SimpleNamespace, tmp_path: Path
) -> None:
    """After the upstream's proto changes, `check` names the stale rule at its file:line, and `record --mode
    refresh` replays only that rule's request against the new upstream and rewrites it; the others stay as
    they were, and `check` passes again."""
    record = spawn("record", "--upstream", upstream.address, "--protos", str(PROTOS), "--out", "rec.yaml",
                   "--port", "0")  # fmt: skip
    record.wait_serving()
    with grpc.insecure_channel(record.address) as channel:
        inv = pb.inv_grpc.InventoryStub(channel)
        inv.Reserve(pb.inv.ReserveRequest(sku="A", qty=1), timeout=5)
        inv.GetItem(pb.inv.GetItemRequest(sku="X"), timeout=5)
    assert record.stop() == 0
    before = yaml.safe_load((tmp_path / "rec.yaml").read_text(encoding="utf-8"))["rules"]
    new_protos = tmp_path / "protos"
    shutil.copytree(PROTOS, new_protos)
    inventory = new_protos / "shop" / "v1" / "inventory.proto"
    text = inventory.read_text(encoding="utf-8")
    changed = text.replace("  int32 qty_reserved = 3;\n}", "  int32 qty_reserved = 3;\n  string note = 4;\n}")
    assert changed != text
    inventory.write_text(changed, encoding="utf-8")
    checked = run_virtsvc("check", "--protos", str(new_protos), "rec.yaml", cwd=tmp_path)
    assert checked.returncode == 1
    stale = checked.stderr.strip().splitlines()
    assert len(stale) == 1 and stale[0].startswith(
        "rec.yaml:4: rule recorded against a contract that has since"
    )
    assert "shop.v1.Inventory/Reserve" in stale[0]
    release = start_upstream(pb, variant="v2")
    try:
        done = run_virtsvc("record", "--upstream", release.address, "--protos", str(new_protos), "--out",
                           "rec.yaml", "--mode", "refresh", cwd=tmp_path)  # fmt: skip
    finally:
        release.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refreshed 1 of 2 rules in rec.yaml"
    after = yaml.safe_load((tmp_path / "rec.yaml").read_text(encoding="utf-8"))["rules"]
    assert after[0]["reply"]["reservationId"] == "real2-A-1"
    assert after[0]["contract"] != before[0]["contract"]
    assert after[1] == before[1]  # GetItem's contract did not change: kept as it was
    assert run_virtsvc("check", "--protos", str(new_protos), "rec.yaml", cwd=tmp_path).returncode == 0


def test_journal_export_as_scenario(
    spawn: Any, upstream: Upstream, pb: SimpleNamespace, tmp_path: Path, catalog: Catalog
) -> None:
    """`virtsvc journal export --as-scenario` turns a session's journal on a running server (simulated and
    forwarded calls alike) into a scenario file that `check` passes and `serve` replays to the same answers;
    other sessions and calls no rule answered are left out."""
    from virtsvc.scenarios.loader import compile_text

    text = (
        "scenario: app\nrules:\n"
        "  - method: shop.v1.Inventory/Watch\n    passthrough: inventory\n"
        "  - method: shop.v1.Payments/Charge\n    sequence:\n"
        "      - status: {code: UNAVAILABLE, message: warming up}\n      - reply: {chargeId: c-2}\n"
        "  - method: shop.v1.Orders/GetOrder\n    when: {request: {orderId: known}}\n"
        "    reply: {orderId: known, state: SHIPPED}\n"
    )
    upstreams = {"inventory": upstream.address}
    scenarios = compile_text(text, catalog, origin="app.yaml", upstreams=upstreams)
    answers: list[Any] = []
    with VirtualServer(catalog, scenarios, port=0, upstreams=upstreams) as server:
        with grpc.insecure_channel(server.address) as channel:
            md = (("x-virtsvc-scenario", "app"), ("x-virtsvc-session", "t-exp"))
            pay = pb.pay_grpc.PaymentsStub(channel)
            orders = pb.orders_grpc.OrdersStub(channel)
            inv = pb.inv_grpc.InventoryStub(channel)
            with pytest.raises(grpc.RpcError):
                pay.Charge(pb.pay.ChargeRequest(account="a"), metadata=md, timeout=5)
            answers.append(pay.Charge(pb.pay.ChargeRequest(account="a"), metadata=md, timeout=5).charge_id)
            answers.append(orders.GetOrder(pb.orders.GetOrderRequest(order_id="known"), metadata=md).state)
            with pytest.raises(grpc.RpcError):  # no rule: a near miss, not an answer to keep
                orders.GetOrder(pb.orders.GetOrderRequest(order_id="other"), metadata=md, timeout=5)
            answers.append([e.sku for e in inv.Watch(pb.inv.WatchRequest(skus=["p", "q"]), metadata=md)])
            other = (("x-virtsvc-scenario", "app"), ("x-virtsvc-session", "someone-else"))
            with pytest.raises(grpc.RpcError):  # another session's first call: not in this export
                pay.Charge(pb.pay.ChargeRequest(account="zzz"), metadata=other, timeout=5)
        done = run_virtsvc("journal", "export", "--address", server.address, "--scenario", "app", "--session",
                           "t-exp", "--as-scenario", "--out", "exported.yaml", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load((tmp_path / "exported.yaml").read_text(encoding="utf-8"))
    assert doc["scenario"] == "exported"
    assert [r["method"] for r in doc["rules"]] == [
        "shop.v1.Payments/Charge", "shop.v1.Orders/GetOrder", "shop.v1.Inventory/Watch",
    ]  # fmt: skip
    assert "zzz" not in (tmp_path / "exported.yaml").read_text(encoding="utf-8")
    assert run_virtsvc("check", "--protos", str(PROTOS), "exported.yaml", cwd=tmp_path).returncode == 0
    serve = spawn("serve", "--protos", str(PROTOS), "--scenarios", "exported.yaml", "--default-scenario",
                  "exported", "--port", "0")  # fmt: skip
    serve.wait_serving()
    with grpc.insecure_channel(serve.address) as channel:
        pay = pb.pay_grpc.PaymentsStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            pay.Charge(pb.pay.ChargeRequest(account="a"), timeout=5)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, "warming up")
        replayed = [
            pay.Charge(pb.pay.ChargeRequest(account="a"), timeout=5).charge_id,
            pb.orders_grpc.OrdersStub(channel).GetOrder(pb.orders.GetOrderRequest(order_id="known")).state,
            [e.sku for e in pb.inv_grpc.InventoryStub(channel).Watch(pb.inv.WatchRequest(skus=["p", "q"]))],
        ]
    assert replayed == answers
    assert serve.stop() == 0
