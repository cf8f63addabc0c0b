"""The dashboard end to end in a real headless browser: Debian's chromium, driven by Playwright.

Traffic from real grpc clients appears on the open page without a reload; a click shows the call's record;
a screenshot of the page is saved under the test's tmp dir (and copied to ``$VIRTSVC_DASHBOARD_SCREENSHOT``
when that is set: ``docs/dashboard.png`` is made that way). Without chromium or Playwright the tests are
skipped with the reason, never passed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from test_dashboard import make_history

from virtsvc.contracts import Catalog
from virtsvc.scenarios.loader import load_scenarios
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-token"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install -e '.[test]')"
)
if not CHROMIUM.exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.problems = problems
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def server(catalog: Catalog, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[VirtualServer]:
    """The example scenarios as `virtsvc serve` in the repository loads them (at scenarios/FILE:LINE), with
    a run history of six CI runs."""
    history = make_history(tmp_path / "history.sqlite")
    monkeypatch.chdir(ROOT)
    scenarios = load_scenarios([Path("scenarios")], catalog)
    with VirtualServer(catalog, scenarios, port=0, dashboard_port=0, history=history) as vs:
        yield vs


def _until(page: Any, expression: str, timeout: float = 10.0) -> None:
    """Waits for ``expression`` to hold in the page. (Playwright's wait_for_function evaluates its text
    inside the page, which the dashboard's content security policy forbids, rightly.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {expression}")
        time.sleep(0.05)


def _md(scenario: str, session: str, **extra: str) -> list[tuple[str, str]]:
    return [("x-virtsvc-scenario", scenario), ("x-virtsvc-session", session), *extra.items()]


def _traffic(address: str, pb: SimpleNamespace) -> None:
    """A morning's worth of calls: answered, delayed, failed, streamed and unmatched."""
    with grpc.insecure_channel(address) as channel:
        inv = pb.inv_grpc.InventoryStub(channel)
        pay = pb.pay_grpc.PaymentsStub(channel)
        for i in range(12):
            inv.Reserve(
                pb.inv.ReserveRequest(sku="ABC-1", qty=3), metadata=_md("checkout-happy", f"cart-{i % 3}")
            )
        for i in range(8):
            inv.Reserve(pb.inv.ReserveRequest(sku="ABC-9", qty=1), metadata=_md("latency", f"perf-{i % 2}"))
            pay.Charge(pb.pay.ChargeRequest(account="acct-1"), metadata=_md("latency", f"perf-{i % 2}"))
        for i in range(4):
            with pytest.raises(grpc.RpcError):
                pay.Charge(
                    pb.pay.ChargeRequest(account="acct-2"), metadata=_md("payments-retry", f"retry-{i}")
                )
            pay.Charge(pb.pay.ChargeRequest(account="acct-2"), metadata=_md("payments-retry", f"retry-{i}"))
        list(inv.Watch(pb.inv.WatchRequest(skus=["ABC-1"]), metadata=_md("inventory-watch", "watch-1")))
        with pytest.raises(grpc.RpcError):
            inv.Reserve(pb.inv.ReserveRequest(sku="XYZ", qty=3), metadata=_md("matching", "t-42"))


def test_live_calls_details_and_charts(
    page: Any, server: VirtualServer, pb: SimpleNamespace, tmp_path: Path
) -> None:
    """Calls sent after the page loaded show up in it without a reload; a click opens the call's record."""
    assert server.dashboard is not None
    page.goto(server.dashboard.url)
    page.wait_for_selector("#live.on")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloaded
    assert page.locator("#tail tbody tr").count() == 0

    _traffic(server.address, pb)
    calls = len(server.journal)
    _until(page, f"document.querySelectorAll('#tail tbody tr').length === {calls}")
    assert page.evaluate("window.loadedOnce") is True
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    _until(page, f"document.querySelector('#counts').textContent === '{calls} calls seen'")  # figures: 2/s

    # A click on one Reserve of checkout-happy: its request, reply, metadata, headers, trailers and rule.
    row = page.locator("#tail tbody tr", has_text="cart-1").first
    row.click()
    page.wait_for_selector("#details-request")
    assert '"sku": "ABC-1"' in page.inner_text("#details-request")
    reply = page.inner_text("#details-reply")
    assert '"reservationId": "r-ABC-1-3"' in reply and '"qtyReserved": 3' in reply
    details = page.inner_text("#details")
    assert "x-virtsvc-session\ncart-1" in details or "x-virtsvc-session\tcart-1" in details
    assert "x-served-by" in details and "x-trace-id" in details
    rule = "scenarios/checkout-happy.yaml:7"
    assert page.inner_text("#details-rule") == f"{rule} (reply)"
    assert "Inventory/Reserve" in row.inner_text() and "selected" in (row.get_attribute("class") or "")

    # The unmatched call: listed with its near-miss text, and its details say why no rule answered.
    near_miss = page.inner_text("#unmatched pre")
    assert near_miss.startswith(
        'no rule matched shop.v1.Inventory/Reserve in scenario "matching", session "t-42"'
    )
    assert "closest: rule at scenarios/matching.yaml:" in near_miss
    page.locator("#tail tbody tr", has_text="t-42").click()
    page.wait_for_selector("#details-near-miss")
    assert page.inner_text("#details-near-miss") == near_miss

    # Charts per method: a histogram whose bars add up to the calls, and the error rate.
    charge = page.locator('.chart[data-method="shop.v1.Payments/Charge"]')
    assert charge.locator("rect.bar").count() >= 1
    assert "16 calls" in charge.inner_text() and "errors 4 (25.0%)" in charge.inner_text()
    assert "12 calls" not in charge.inner_text()

    # Rules with their uses (a scenario's rules open with a click when many scenarios are loaded).
    page.click("details.scenario[data-name='checkout-happy'] summary")
    uses = page.locator("details.scenario[data-name='checkout-happy'] tr", has_text=rule).locator("td.uses")
    assert uses.inner_text() == "12"

    # The filter narrows the tail to one session (and says so in the address).
    page.select_option("#f-scenario", "payments-retry")
    page.select_option("#f-session", "retry-2")
    # The page redraws on its next animation frame, not within the change event.
    _until(page, "document.querySelectorAll('#tail tbody tr').length === 2")
    assert set(page.locator("#tail tbody tr td:nth-child(5)").all_inner_texts()) == {"UNAVAILABLE", "OK"}
    assert "scenario=payments-retry&session=retry-2" in page.url
    page.select_option("#f-scenario", "")
    page.select_option("#f-session", "")

    # More traffic while the page is open: it keeps following.
    with grpc.insecure_channel(server.address) as channel:
        pb.inv_grpc.InventoryStub(channel).Reserve(
            pb.inv.ReserveRequest(sku="ABC-1", qty=5), metadata=_md("checkout-happy", "late-arrival")
        )
    page.wait_for_selector("#tail tbody tr:first-child >> text=late-arrival")
    _until(page, f"document.querySelector('#counts').textContent.startsWith('{calls + 1} calls')")

    # The history's trends: the flaky test first, then a sparkline per test and per method.
    page.wait_for_selector("#trends-flaky")
    flaky = page.inner_text("#trends-flaky")
    assert "tests/test_checkout.py::test_pay · changed 5 times · runs 5 → 6" in flaky
    assert "- shop.v1.Payments/Charge UNAVAILABLE scenarios/checkout-happy.yaml:25" in flaky
    rows = page.locator("#trends table.trends").first.locator("tbody tr")
    assert rows.all_inner_texts()[0].startswith("tests/test_checkout.py::test_pay flaky")
    assert rows.nth(0).locator("polyline.err").count() == 1 and rows.count() == 2
    assert "6 runs, 2026-12-01T06:00:00Z to 2026-12-06T06:00:00Z" in page.inner_text("#trends")

    page.locator("#tail tbody tr", has_text="cart-1").first.click()
    page.wait_for_selector("#details-request")
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
    wanted = os.environ.get("VIRTSVC_DASHBOARD_SCREENSHOT")
    if wanted:
        shutil.copyfile(shot, wanted)
    assert page.problems == []


def test_call_data_is_shown_as_text_never_as_markup(
    page: Any, server: VirtualServer, pb: SimpleNamespace
) -> None:
    """Metadata carrying HTML is displayed literally: nothing a caller sends runs in the page."""
    assert server.dashboard is not None
    page.goto(server.dashboard.url)
    page.wait_for_selector("#live.on")
    payload = '<img src=x onerror="window.pwned=1">'
    with grpc.insecure_channel(server.address) as channel:
        pb.inv_grpc.InventoryStub(channel).Reserve(
            pb.inv.ReserveRequest(sku="ABC-1", qty=1),
            metadata=_md("checkout-happy", "xss", **{"x-note": payload}),
        )
    page.locator("#tail tbody tr", has_text="xss").click()
    page.wait_for_selector("#details-request")
    assert payload in page.inner_text("#details")
    assert page.locator("#details img").count() == 0
    assert page.evaluate("window.pwned") is None
    assert page.problems == []


def test_with_a_token_the_page_asks_for_it(browser: Any, catalog: Catalog) -> None:
    """A server with an admin token shows the login form; the right token opens the live page."""
    scenarios = load_scenarios([SCENARIOS / "checkout-happy.yaml"], catalog)
    with VirtualServer(catalog, scenarios, port=0, dashboard_port=0, admin_token=TOKEN) as vs:
        assert vs.dashboard is not None
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(vs.dashboard.url)
            assert page.locator("input[name=token]").count() == 1
            page.fill("input[name=token]", "not-it")
            page.click("button[type=submit]")
            assert page.inner_text(".problem") == "That is not the admin token."
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("#live.on")
            assert "checkout-happy" in page.inner_text("#scenarios")
        finally:
            context.close()
