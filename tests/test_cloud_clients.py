"""A real cloud client library pointed at a virtualised service: google-cloud-pubsub's PublisherClient
against a virtual Pub/Sub built from the .proto files its own wheel ships."""

from __future__ import annotations

import importlib.metadata
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtsvc import VirtualServer
from virtsvc.contracts import Catalog
from virtsvc.scenarios import load_scenarios

pubsub_v1 = pytest.importorskip("google.cloud.pubsub_v1")

SCENARIO = """
scenario: pubsub
rules:
  - method: google.pubsub.v1.Publisher/CreateTopic
    reply: {name: "{{ request.name }}", labels: {created-by: virtsvc}}
  - method: google.pubsub.v1.Publisher/Publish
    when: {request: {topic: {$regex: "/topics/flaky$"}}}
    sequence:
      - status: {code: UNAVAILABLE, message: backend warming up}
      - reply: {messageIds: ["m-after-retry"]}
  - method: google.pubsub.v1.Publisher/Publish
    reply: {messageIds: "{{ request.messages | map(attribute='attributes') | map(attribute='n') | list }}"}
"""


@pytest.fixture(scope="module")
def pubsub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualServer]:
    tree = tmp_path_factory.mktemp("pubsub-protos")
    for file in importlib.metadata.files("google-cloud-pubsub") or ():
        if (
            file.suffix == ".proto"
        ):  # shipped under google/cloud/pubsub_v1/proto/, imported as google/pubsub/v1/
            (tree / "google/pubsub/v1").mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(str(file.locate())), tree / "google/pubsub/v1" / file.name)
    catalog = Catalog.from_protos(tree, cache_dir=tmp_path_factory.mktemp("cache"))
    scenario = tree / "pubsub.yaml"
    scenario.write_text(SCENARIO)
    with VirtualServer(catalog, load_scenarios([scenario], catalog), default_scenario="pubsub") as server:
        yield server


@pytest.fixture
def publisher(pubsub_server: VirtualServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    # The emulator variable is the client's own way to talk plaintext to a local endpoint.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_server.address)
    client = pubsub_v1.PublisherClient()
    yield client
    client.transport.close()


def test_create_topic_and_publish(publisher: object, pubsub_server: VirtualServer) -> None:
    """The unmodified client library gets scenario answers for admin and data-plane calls."""
    topic = publisher.topic_path("demo-project", "orders")
    created = publisher.create_topic(name=topic)
    assert created.name == topic and created.labels["created-by"] == "virtsvc"
    futures = [publisher.publish(topic, b"payload", n=str(i)) for i in range(3)]
    ids = sorted(f.result(timeout=10) for f in futures)
    assert set(ids) <= {"0", "1", "2"} and ids
    published = [e for e in pubsub_server.journal.entries(method="google.pubsub.v1.Publisher/Publish")]
    assert sum(len(e.requests()[0]["messages"]) for e in published) == 3


def test_client_retries_a_transient_error(publisher: object, pubsub_server: VirtualServer) -> None:
    """UNAVAILABLE from the scenario is retried by the library's own policy, then the retry succeeds."""
    topic = publisher.topic_path("demo-project", "flaky")
    assert publisher.publish(topic, b"x", n="0").result(timeout=30) == "m-after-retry"
    calls = [
        e.code.name
        for e in pubsub_server.journal.entries(method="google.pubsub.v1.Publisher/Publish")
        if e.requests()[0]["topic"] == topic
    ]
    assert calls == ["UNAVAILABLE", "OK"]
