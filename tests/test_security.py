"""Security over real sockets: the admin API's exposure and token, the template sandbox, where Python may
come from, and TLS / mutual TLS on the serving port (with certificates generated here)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from test_reliability import (
    RESERVE,
    decode,
    encode,
    healthy,
    refused,
    run_cli,
    serve_process,
)

from virtsvc.admin import AdminClient
from virtsvc.contracts import Catalog
from virtsvc.errors import ConfigError, ScenarioError
from virtsvc.scenarios import compile_text
from virtsvc.server import VirtualServer, tls_credentials

TOKEN = "tok-7f3a9c1e-do-not-log"  # distinctive, so that a grep for it finds any leak

GOOD = """\
scenario: sec
rules:
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: sec}
"""

# --------------------------------------------------------------------------------------------- admin API


def admin_list(address: str, token: str | None = None) -> list[str]:
    with grpc.insecure_channel(address) as ch:
        return [s.name for s in AdminClient(ch, token=token).call("ListScenarios").scenarios]


def admin_refusal(
    address: str, token: str | None = None, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.RpcError:
    from virtsvc.admin import ADMIN_SERVICE, messages

    with grpc.insecure_channel(address) as ch:
        stub = ch.unary_unary(
            f"/{ADMIN_SERVICE}/ListScenarios",
            request_serializer=messages.ListScenariosRequest.SerializeToString,
            response_deserializer=messages.ListScenariosResponse.FromString,
        )
        md = metadata or ((("authorization", f"Bearer {token}"),) if token else ())
        return refused(lambda: stub(messages.ListScenariosRequest(), metadata=md, timeout=5))


def test_admin_closed_off_loopback_without_a_token(catalog: Catalog) -> None:
    """Bound to 0.0.0.0 without --admin-token: every admin call is PERMISSION_DENIED (even from 127.0.0.1),
    with a message saying how to open it; the virtual services answer as usual."""
    scenarios = compile_text(GOOD, catalog, origin="sec.yaml")
    with VirtualServer(catalog, scenarios, host="0.0.0.0", port=0, default_scenario="sec") as srv:
        local = f"127.0.0.1:{srv.port}"
        for token in (None, "anything"):
            error = admin_refusal(local, token)
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED
            assert error.details() == (
                "the admin API is closed: this server listens on 0.0.0.0, reachable from other machines; "
                "start it with --admin-token (or VIRTSVC_ADMIN_TOKEN) to open it"
            )
        with grpc.insecure_channel(local) as ch:
            put = refused(lambda: AdminClient(ch).call("PutScenario", text=GOOD.replace("sec}", "evil}")))
            assert put.code() is grpc.StatusCode.PERMISSION_DENIED
            assert decode(catalog, RESERVE, ch.unary_unary(RESERVE)(b"", timeout=5)).reservation_id == "sec"


def test_admin_off_loopback_needs_the_bearer_token(catalog: Catalog) -> None:
    """Bound to 0.0.0.0 with a token: no token or a wrong one (also a prefix of it, or another scheme) is
    UNAUTHENTICATED; ``authorization: Bearer <token>`` opens it."""
    with VirtualServer(catalog, [], host="0.0.0.0", port=0, admin_token=TOKEN) as srv:
        local = f"127.0.0.1:{srv.port}"
        wrong = [
            (),
            (("authorization", "Bearer wrong"),),
            (("authorization", f"Bearer {TOKEN[:-1]}"),),
            (("authorization", f"Bearer {TOKEN}x"),),
            (("authorization", f"Basic {TOKEN}"),),
            (("authorization", TOKEN),),
            (("x-admin-token", TOKEN),),
        ]
        for md in wrong:
            error = admin_refusal(local, metadata=md) if md else admin_refusal(local)
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED, md
            assert error.details() == "admin calls need authorization: Bearer <token>"
            assert TOKEN not in error.details()
        assert admin_list(local, TOKEN) == []


def test_the_token_is_never_logged(generated: Path, tmp_path: Path) -> None:
    """`virtsvc serve --admin-token T` off loopback (and VIRTSVC_ADMIN_TOKEN): refused calls, accepted calls,
    a failed PutScenario and the shutdown are all logged, and T appears nowhere in the output."""
    descriptors = str(generated / "descriptors.binpb")
    runs = [
        (["--descriptors", descriptors, "--host", "0.0.0.0", "--admin-token", TOKEN], None),
        (["--descriptors", descriptors, "--host", "0.0.0.0"], {"VIRTSVC_ADMIN_TOKEN": TOKEN}),
    ]
    for args, env in runs:
        with serve_process(args, env=env) as served:
            for md in ((("authorization", f"Bearer {TOKEN}x"),), (("authorization", f"Bearer {TOKEN[:8]}"),)):
                assert admin_refusal(served.address, metadata=md).code() is grpc.StatusCode.UNAUTHENTICATED
            with grpc.insecure_channel(served.address) as ch:
                client = AdminClient(ch, token=TOKEN)
                client.call("PutScenario", text=GOOD)
                bad = refused(lambda c=client: c.call("PutScenario", text=f"scenario: {TOKEN}\nrules: 5\n"))
                assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT
                client.call("GetJournal")
                assert "sec" in [s.name for s in client.call("ListScenarios").scenarios]
        output = served.output()
        events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
        assert {"serving", "admin.unauthenticated", "admin.scenario.put", "stopped"} <= set(events), events
        # The scenario name in the bad text held the token: the refusal log names the text's problem, and
        # must not echo it either.
        assert TOKEN not in output.replace(f"scenario: {TOKEN}", ""), "the admin token was logged"
        assert TOKEN[:12] not in output.replace(f"scenario: {TOKEN}", "")


def test_python_never_comes_through_the_admin_api(catalog: Catalog, tmp_path: Path) -> None:
    """PutScenario and PutSessionRules take YAML/JSON only: Python text is INVALID_ARGUMENT and never runs; a
    ``handler:`` key in text is refused; the loaded scenario stays."""
    marker = tmp_path / "ran"
    python_texts = [
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "from virtsvc import Scenario\nscenario = Scenario('evil')\n",
        f"from virtsvc import Scenario\nscenario = Scenario('sec')\nopen({str(marker)!r}, 'w')\n",
        "scenario: sec\nrules:\n  - method: shop.v1.Inventory/Reserve\n"
        f"    handler: \"open({str(marker)!r}, 'w')\"\n",
        "scenario: sec\nrules:\n  - method: shop.v1.Inventory/Reserve\n"
        "    handler: !!python/name:os.system\n",
        f"scenario: !!python/object/apply:os.system ['touch {marker}']\nrules: []\n",
    ]
    scenarios = compile_text(GOOD, catalog, origin="sec.yaml")
    with (
        VirtualServer(catalog, scenarios, default_scenario="sec") as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        client = AdminClient(ch)
        for text in python_texts:
            error = refused(lambda t=text: client.call("PutScenario", text=t))
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, text
            assert all(re.match(r"<admin>(:\d+)?: ", line) for line in error.details().splitlines()), (
                error.details()
            )
            rules = text.split("rules:\n", 1)[-1] if "rules:\n" in text else text
            error = refused(
                lambda r=rules: client.call("PutSessionRules", scenario="sec", session="s", text=r)
            )
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, rules
        assert not marker.exists(), "Python from the admin API ran"
        assert [s.name for s in client.call("ListScenarios").scenarios] == ["sec"]
        assert decode(catalog, RESERVE, ch.unary_unary(RESERVE)(b"", timeout=5)).reservation_id == "sec"


# ------------------------------------------------------------------------------------ template sandbox

ESCAPES = [
    "{{ request.__class__ }}",
    "{{ request.sku.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ ().__class__.__bases__[0].__subclasses__() }}",
    "{{ request.__init__.__globals__ }}",
    "{{ request.get.__self__ }}",
    "{{ range.__globals__['os'] }}",
    "{{ uuid.__globals__ }}",
    "{{ randint.__code__ }}",
    "{{ now.__globals__['_dt'] }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ request | attr('__class__') }}",
    "{{ metadata.__class__.__mro__ }}",
    "{{ session.__class__ }}",
    "{{ (request.items() | list)[0].__class__ }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(request) }}",
    "{{ '{x.sku.__class__}'.format_map({'x': request}) }}",
    "{{ '%s' | format(request.__class__) }}",
    "{{ ('{0.' ~ '__class__}').format(request) }}",
    "{% set f = request.__class__ %}{{ f }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ config.__class__ }}",
    "{{ request.sku.translate({}) }}",
    "{{ __import__('os').system('true') }}",
]

REFUSAL_WORDS = re.compile(r"unsafe|unknown name|not available|undefined|has no attribute|template error")


def _escape_scenario(template: str, name: str = "esc") -> str:
    return json.dumps(
        {
            "scenario": name,
            "rules": [{"method": "shop.v1.Inventory/Reserve", "reply": {"reservationId": template}}],
        }
    )


@pytest.fixture(scope="module")
def sandbox_server(catalog: Catalog) -> Iterator[VirtualServer]:
    with VirtualServer(catalog, []) as srv:
        yield srv


@pytest.mark.parametrize("template", ESCAPES)
def test_template_escapes_are_refused(
    template: str, catalog: Catalog, sandbox_server: VirtualServer, tmp_path: Path, generated: Path
) -> None:
    """Known sandbox escapes (dunder walks to classes, globals, builtins and os; format-string tricks; removed
    globals) are refused with a clear error: at load (`virtsvc check`: a located template error) or over the
    wire (INTERNAL with the template error), never answered."""
    text = _escape_scenario(template)
    try:
        compiled = compile_text(text, catalog, origin="esc.json")
    except ScenarioError as exc:
        path = tmp_path / "esc.json"
        path.write_text(text)
        rc, output = run_cli("check", "--descriptors", str(generated / "descriptors.binpb"), str(path))
        assert rc == 1
        assert re.fullmatch(
            rf"{re.escape(str(path))}:\d+: reply\.reservationId: template error: .+\n", output
        ), output
        assert str(exc).replace("esc.json", str(path)) + "\n" == output
        return
    sandbox_server.registry.put(compiled[0])
    with grpc.insecure_channel(sandbox_server.address) as ch:
        md = (("x-virtsvc-scenario", "esc"),)
        error = refused(
            lambda: ch.unary_unary(RESERVE)(encode(catalog, RESERVE, sku="a"), metadata=md, timeout=10)
        )
        assert error.code() is grpc.StatusCode.INTERNAL, error.details()
        assert error.details().startswith("the reply template of the rule at esc.json:"), error.details()
        assert REFUSAL_WORDS.search(error.details()), error.details()
        assert "<class" not in error.details() and "<module" not in error.details()


BOUNDS = [
    # (template, words of the error): loops, recursion, big strings, lists, integers
    # a million steps take well under the 1 s clock on an idle machine, not on a loaded one: either bound
    (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "too expensive|too slow",
    ),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion|too expensive"),
    ("{{ 'x' * 1000000000 }}", "longer than"),
    ("{{ ('x' * 1000000) ~ ('x' * 1000000) }}", "longer than"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "longer than|too expensive"),
    ("{{ request.sku.ljust(1000000000) }}", "longer than"),
    ("{{ ('x' * 1000) | center(1000000000) }}", "longer than"),
    ("{{ ('x' * 100000).replace('x', 'xxxxxxxxxxxxxxxxxxxxxxx') }}", "longer than"),
    ("{{ range(1000000000) | list | length }}", "range"),
    ("{{ [1] * 1000000000 }}", "longer than"),
    ("{{ 2 ** 1000000000 }}", "integer result larger"),
    ("{{ '%0999999999d' % 1 }}", "longer than"),
    ("{{ '{:>999999999}'.format(1) }}", "longer than"),
]


@pytest.mark.parametrize(("template", "words"), BOUNDS)
def test_templates_cannot_loop_forever_or_build_huge_values(
    template: str, words: str, catalog: Catalog, sandbox_server: VirtualServer
) -> None:
    """Endless loops, recursion and huge strings/lists/integers end within seconds with INTERNAL naming the
    bound; the server keeps serving."""
    name = f"bound-{BOUNDS.index((template, words))}"
    compiled = compile_text(_escape_scenario(template, name), catalog, origin="bound.json")
    sandbox_server.registry.put(compiled[0])
    with grpc.insecure_channel(sandbox_server.address) as ch:
        md = (("x-virtsvc-scenario", name),)
        t0 = time.monotonic()
        error = refused(
            lambda: ch.unary_unary(RESERVE)(encode(catalog, RESERVE, sku="a"), metadata=md, timeout=30)
        )
        assert time.monotonic() - t0 < 15
        assert error.code() is grpc.StatusCode.INTERNAL, error.details()
        assert re.search(words, error.details()), error.details()
        assert healthy(sandbox_server.address)


SLOW_TEMPLATE = "{% for i in range(100) %}{{ ('ab' * 500000) | list | sort | length }}{% endfor %}"


def test_template_render_time_is_bounded(generated: Path, tmp_path: Path, catalog: Catalog) -> None:
    """A template whose every step is cheap to count but expensive to run is stopped by a time bound:
    INTERNAL within seconds, not the client's deadline. In a `virtsvc serve` subprocess (killed at the
    end), because the runaway render would outlive the test otherwise."""
    path = tmp_path / "slow.json"
    path.write_text(_escape_scenario(SLOW_TEMPLATE))
    args = [
        "--descriptors",
        str(generated / "descriptors.binpb"),
        "--scenarios",
        str(path),
        "--default-scenario",
        "esc",
        "--grace",
        "0",
    ]
    with serve_process(args) as served, grpc.insecure_channel(served.address) as ch:
        error = refused(lambda: ch.unary_unary(RESERVE)(encode(catalog, RESERVE, sku="a"), timeout=15))
        assert error.code() is grpc.StatusCode.INTERNAL, error.details()


# ----------------------------------------------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path

    def read(self, name: str) -> bytes:
        return getattr(self, name).read_bytes()  # type: ignore[no-any-return]


def _key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key,
    issuer: str,
    issuer_key,
    *,
    ca: bool = False,  # type: ignore[no-untyped-def]
    san: list[str] | None = None,
    client: bool = False,
):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if san:
        names: list[x509.GeneralName] = []
        for item in san:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(item)))
            except ValueError:
                names.append(x509.DNSName(item))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost (SAN), a client certificate from the same CA, and
    a client certificate from a rogue CA."""
    from cryptography.hazmat.primitives import serialization

    out = tmp_path_factory.mktemp("pki")

    def write(name: str, cert, key=None) -> tuple[Path, Path | None]:  # type: ignore[no-untyped-def]
        cert_path = out / f"{name}.crt"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = None
        if key is not None:
            key_path = out / f"{name}.key"
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return cert_path, key_path

    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("virtsvc test CA", ca_key, "virtsvc test CA", ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _cert("localhost", server_key, "virtsvc test CA", ca_key, san=["localhost", "127.0.0.1"])
    client = _cert("test-client", client_key, "virtsvc test CA", ca_key, client=True)
    rogue = _cert("rogue-client", rogue_key, "rogue CA", rogue_ca_key, client=True)
    ca_path, _ = write("ca", ca)
    server_cert, server_key_path = write("server", server, server_key)
    client_cert, client_key_path = write("client", client, client_key)
    rogue_cert, rogue_key_path = write("rogue", rogue, rogue_key)
    assert server_key_path and client_key_path and rogue_key_path
    return Pki(
        ca_path, server_cert, server_key_path, client_cert, client_key_path, rogue_cert, rogue_key_path
    )


def _tls_channel(address: str, pki: Pki, *, cert: str | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.read("ca"),
        private_key=pki.read(f"{cert}_key") if cert else None,
        certificate_chain=pki.read(f"{cert}_cert") if cert else None,
    )
    return grpc.secure_channel(address, creds)


def _call(catalog: Catalog, channel: grpc.Channel) -> str:
    raw = channel.unary_unary(RESERVE)(b"", metadata=(("x-virtsvc-scenario", "sec"),), timeout=5)
    return decode(catalog, RESERVE, raw).reservation_id  # type: ignore[no-any-return]


def test_tls(catalog: Catalog, pki: Pki) -> None:
    """TLS on the serving port: a client trusting the CA is served (unary and admin, over 127.0.0.1 and
    localhost); a plaintext client is refused."""
    creds = tls_credentials(pki.server_cert, pki.server_key)
    with VirtualServer(catalog, compile_text(GOOD, catalog, origin="sec.yaml"), credentials=creds) as srv:
        for host in ("127.0.0.1", "localhost"):
            with _tls_channel(f"{host}:{srv.port}", pki) as ch:
                assert _call(catalog, ch) == "sec"
                assert [s.name for s in AdminClient(ch).call("ListScenarios").scenarios] == ["sec"]
        with grpc.insecure_channel(srv.address) as plain:
            assert refused(lambda: _call(catalog, plain)).code() is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(catalog: Catalog, pki: Pki) -> None:
    """Mutual TLS: only clients presenting a certificate signed by the client CA are served; none, or one
    from another CA, is refused in the handshake, and the server keeps serving good clients."""
    creds = tls_credentials(pki.server_cert, pki.server_key, pki.ca)
    with VirtualServer(catalog, compile_text(GOOD, catalog, origin="sec.yaml"), credentials=creds) as srv:
        with _tls_channel(srv.address, pki, cert="client") as ch:
            assert _call(catalog, ch) == "sec"
        for bad in (None, "rogue"):
            with _tls_channel(srv.address, pki, cert=bad) as ch:
                assert refused(lambda c=ch: _call(catalog, c)).code() is grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(srv.address) as plain:
            assert refused(lambda: _call(catalog, plain)).code() is grpc.StatusCode.UNAVAILABLE
        with _tls_channel(srv.address, pki, cert="client") as ch:
            assert _call(catalog, ch) == "sec"


def test_serve_with_mutual_tls(generated: Path, tmp_path: Path, catalog: Catalog, pki: Pki) -> None:
    """virtsvc serve --tls-cert --tls-key --tls-client-ca: mutual TLS on the one port (virtual services,
    health, admin); its serving event says so."""
    path = tmp_path / "sec.yaml"
    path.write_text(GOOD)
    args = [
        "--descriptors",
        str(generated / "descriptors.binpb"),
        "--scenarios",
        str(path),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
    ]
    with serve_process(args) as served:
        serving = json.loads(next(line for line in served.lines if '"serving"' in line))
        assert serving["tls"] == "mutual"
        with _tls_channel(served.address, pki, cert="client") as ch:
            assert _call(catalog, ch) == "sec"
            assert [s.name for s in AdminClient(ch).call("ListScenarios").scenarios] == ["sec"]
        client_creds = grpc.ssl_channel_credentials(
            pki.read("ca"), pki.read("client_key"), pki.read("client_cert")
        )
        assert healthy(served.address, credentials=client_creds)
        for bad in (None, "rogue"):
            with _tls_channel(served.address, pki, cert=bad) as ch:
                assert refused(lambda c=ch: _call(catalog, c)).code() is grpc.StatusCode.UNAVAILABLE


def _bad_tls_cases(pki: Pki, tmp: Path) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    text = tmp / "text.pem"
    text.write_text("hello\n")
    missing = tmp / "missing.pem"
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca)
    return [
        (
            ["--tls-cert", str(missing), "--tls-key", key],
            rf"--tls-cert {re.escape(str(missing))}: cannot read: ",
        ),
        (
            ["--tls-cert", cert, "--tls-key", str(missing)],
            rf"--tls-key {re.escape(str(missing))}: cannot read: ",
        ),
        (["--tls-cert", str(text), "--tls-key", key], r"--tls-cert .*text\.pem: not a PEM file"),
        (
            ["--tls-cert", str(garbage), "--tls-key", key],
            r"--tls-cert .*garbage\.pem / --tls-key .*: not a usable",
        ),
        (
            ["--tls-cert", cert, "--tls-key", str(pki.client_key)],
            r"not a usable certificate and matching private key",
        ),
        (
            ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(garbage)],
            r"--tls-client-ca .*garbage\.pem: not a usable CA certificate",
        ),
        (
            ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(tmp)],
            r"--tls-client-ca .*: cannot read: ",
        ),
        (["--tls-cert", cert], r"--tls-cert and --tls-key go together"),
        (["--tls-key", key], r"--tls-cert and --tls-key go together"),
        (["--tls-client-ca", ca], r"--tls-client-ca needs --tls-cert and --tls-key"),
    ]


def test_serve_refuses_unusable_tls_files_in_one_line(generated: Path, tmp_path: Path, pki: Pki) -> None:
    """Unreadable or invalid certificate, key or CA files, a key that does not match, a flag missing its
    pair: one clear line naming the flag and file, exit 1, nothing served."""
    for flags, pattern in _bad_tls_cases(pki, tmp_path):
        rc, output = run_cli(
            "serve", "--descriptors", str(generated / "descriptors.binpb"), "--port", "0", *flags, timeout=60
        )
        assert rc == 1, (flags, output)
        lines = output.splitlines()
        assert len(lines) == 1, output
        assert re.match(rf"virtsvc: error: .*{pattern}", lines[0]), (pattern, lines[0])


def test_tls_credentials_helper_errors(pki: Pki, tmp_path: Path) -> None:
    """tls_credentials() raises ConfigError (one line) for the same problems."""
    with pytest.raises(ConfigError, match=r"^--tls-key .*: not a PEM file"):
        (tmp_path / "k.pem").write_text("nope")
        tls_credentials(pki.server_cert, tmp_path / "k.pem")
    with pytest.raises(ConfigError, match=r"not a usable certificate and matching private key"):
        tls_credentials(pki.client_cert, pki.server_key)
    assert isinstance(tls_credentials(pki.server_cert, pki.server_key, pki.ca), grpc.ServerCredentials)
