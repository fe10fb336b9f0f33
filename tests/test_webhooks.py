"""Tests of webhook signing, URL checks and delivery against a receiver on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.webhooks import (
    SECRET_PREFIX,
    WebhookURLRejected,
    WebhookVerificationError,
    build_event,
    deliver,
    encode_event,
    generate_secret,
    redact_url,
    sign,
    signature_headers,
    validate_webhook_url,
    verify_signature,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PUBLIC_V4 = "93.184.215.14"


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"resolver called for {host!r}; numeric hosts must not reach DNS")


def fake_dns(table: dict[str, list[str]]):
    """Return a resolver that looks names up in ``table`` and fails like getaddrinfo otherwise."""

    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


# -- signing -----------------------------------------------------------------------------


def test_sign_matches_spec_vector() -> None:
    # The test vector published with the Standard Webhooks specification.
    signature = sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')

    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_secret_without_prefix_signs_same() -> None:
    body = b"{}"
    bare = SECRET.removeprefix(SECRET_PREFIX)

    assert sign(bare, "msg_1", 1, body) == sign(SECRET, "msg_1", 1, body)


def test_signature_round_trip() -> None:
    event = build_event("job_abc", "succeeded")
    body = encode_event(event)
    headers = signature_headers(SECRET, event["id"], body, timestamp=int(time.time()))

    verify_signature(SECRET, headers, body)
    assert headers["webhook-id"] == event["id"]
    assert headers["webhook-signature"].startswith("v1,")


@pytest.mark.parametrize("tampered", ["body", "id", "timestamp", "secret"])
def test_tampering_detected(tampered: str) -> None:
    body = encode_event(build_event("job_abc", "succeeded", event_id="evt_1"))
    now = 1_700_000_000
    headers = signature_headers(SECRET, "evt_1", body, timestamp=now)
    secret = SECRET

    if tampered == "body":
        body = body.replace(b"succeeded", b"failed")
    elif tampered == "id":
        headers["webhook-id"] = "evt_2"
    elif tampered == "timestamp":
        headers["webhook-timestamp"] = str(now + 1)
    else:
        secret = generate_secret()

    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify_signature(secret, headers, body, now=now)


def test_verify_rejects_stale_timestamp() -> None:
    body = b"{}"
    headers = signature_headers(SECRET, "evt_1", body, timestamp=1_700_000_000)

    with pytest.raises(WebhookVerificationError, match="away from now"):
        verify_signature(SECRET, headers, body, now=1_700_000_000 + 301)
    verify_signature(SECRET, headers, body, now=1_700_000_000 + 299)


def test_verify_rejects_missing_header() -> None:
    body = b"{}"
    headers = signature_headers(SECRET, "evt_1", body, timestamp=1_700_000_000)
    del headers["webhook-signature"]

    with pytest.raises(WebhookVerificationError, match="missing header webhook-signature"):
        verify_signature(SECRET, headers, body, now=1_700_000_000)


def test_verify_headers_case_insensitive() -> None:
    body = b"{}"
    headers = signature_headers(SECRET, "evt_1", body, timestamp=1_700_000_000)
    upper = {key.title(): value for key, value in headers.items()}

    verify_signature(SECRET, upper, body, now=1_700_000_000)


def test_verify_accepts_rotated_signatures() -> None:
    body = b"{}"
    old_secret = generate_secret()
    headers = signature_headers(SECRET, "evt_1", body, timestamp=1_700_000_000)
    old_signature = sign(old_secret, "evt_1", 1_700_000_000, body)
    headers["webhook-signature"] = f"{old_signature} {headers['webhook-signature']}"

    verify_signature(SECRET, headers, body, now=1_700_000_000)
    verify_signature(old_secret, headers, body, now=1_700_000_000)


def test_generate_secret_format() -> None:
    secret = generate_secret()

    assert secret.startswith(SECRET_PREFIX)
    assert len(base64.b64decode(secret.removeprefix(SECRET_PREFIX))) == 32
    assert generate_secret() != secret


def test_invalid_secret_rejected() -> None:
    with pytest.raises(ValueError, match="not valid base64"):
        sign("whsec_not base64!", "evt_1", 1, b"{}")
    with pytest.raises(ValueError, match="empty"):
        sign(SECRET_PREFIX, "evt_1", 1, b"{}")


def test_event_is_thin() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    event = build_event("job_abc", "failed", created_at=created)

    assert set(event) == {"id", "type", "created_at", "data"}
    assert event["id"].startswith("evt_")
    assert event["type"] == "job.failed"
    assert event["created_at"] == "2026-01-02T03:04:05Z"
    assert event["data"] == {"job_id": "job_abc", "status": "failed"}
    assert json.loads(encode_event(event)) == event


# -- URL checks --------------------------------------------------------------------------

REJECTED_URLS = [
    ("", "empty"),
    ("ftp://example.com/hook", "scheme 'ftp'"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("javascript:alert(1)", "scheme"),
    ("http://user:pass@example.com/hook", "credentials"),
    ("http://token@example.com/hook", "credentials"),
    ("http:///hook", "no host"),
    ("http://exa mple.com/", "whitespace"),
    ("http://example.com:99999/", "port"),
    ("http://example.com:0/", "port 0"),
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.5.6.7:8080/hook", "loopback"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://169.254.10.10/", "link-local"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://169.254.170.2/v2/credentials", "metadata"),
    ("http://100.100.100.200/", "metadata"),
    ("http://192.0.0.192/", "metadata"),
    ("http://100.64.0.1/", "shared"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://[::1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[fec0::1]/", "site-local"),
    ("http://[::ffff:127.0.0.1]/", "loopback (embedded in IPv6)"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://[2002:7f00:1::]/", "loopback (embedded in IPv6)"),
    ("http://[64:ff9b::a00:1]/", "private (embedded in IPv6)"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://[not-v6::zz]/", "invalid"),
    # Shorthand numeric forms that inet_aton, and so many HTTP clients, accept.
    ("http://2130706433/", "127.0.0.1, a loopback"),
    ("http://0x7f000001/", "127.0.0.1, a loopback"),
    ("http://017700000001/", "127.0.0.1, a loopback"),
    ("http://0177.0.0.1/", "127.0.0.1, a loopback"),
    ("http://127.1/", "127.0.0.1, a loopback"),
    ("http://0x7f.1/", "127.0.0.1, a loopback"),
    ("http://3232235777/", "192.168.1.1, a private"),
    ("http://2852039166/", "169.254.169.254"),
    ("http://0xA9FEA9FE/", "169.254.169.254"),
    ("http://256.1.1.1/", "not a valid IPv4"),
    ("http://1.2.3.4.5/", "not a valid IPv4"),
    ("http://08.1.1.1/", "not a valid IPv4"),
]


@pytest.mark.parametrize(("url", "reason"), REJECTED_URLS)
def test_literal_urls_rejected(url: str, reason: str) -> None:
    with pytest.raises(WebhookURLRejected) as info:
        validate_webhook_url(url, resolve=no_dns)

    assert reason in str(info.value)
    assert not info.value.transient


@pytest.mark.parametrize(
    ("host", "addresses", "reason"),
    [
        ("localhost", ["127.0.0.1", "::1"], "loopback"),
        ("rebind.test", ["127.0.0.1"], "loopback"),
        ("mixed.test", [PUBLIC_V4, "10.0.0.5"], "10.0.0.5, a private"),
        ("internal.test", ["fd12:3456::1"], "private"),
        ("meta.test", ["169.254.169.254"], "metadata"),
        ("garbage.test", ["not-an-ip"], "invalid address"),
    ],
)
def test_resolved_hosts_rejected(host: str, addresses: list[str], reason: str) -> None:
    with pytest.raises(WebhookURLRejected) as info:
        validate_webhook_url(f"https://{host}/hook", resolve=fake_dns({host: addresses}))

    assert reason in str(info.value)


def test_unresolvable_host_is_transient() -> None:
    with pytest.raises(WebhookURLRejected) as info:
        validate_webhook_url("https://nowhere.test/hook", resolve=fake_dns({}))

    assert info.value.transient
    assert "resolving nowhere.test failed" in str(info.value)


def test_public_urls_accepted() -> None:
    resolve = fake_dns({"hooks.example.com": [PUBLIC_V4, "2606:4700::1111"]})

    validated = validate_webhook_url("https://Hooks.Example.com./in?x=1", resolve=resolve)

    assert validated.host == "hooks.example.com"
    assert validated.port == 443
    assert validated.target == "/in?x=1"
    assert [str(a) for a in validated.addresses] == [PUBLIC_V4, "2606:4700::1111"]
    assert validated.pinned_url(validated.addresses[1]) == "https://[2606:4700::1111]:443/in?x=1"
    assert validated.host_header == "hooks.example.com"


def test_public_ipv6_literal_accepted() -> None:
    validated = validate_webhook_url("http://[2606:4700::1111]:8080/", resolve=no_dns)

    assert validated.host_header == "[2606:4700::1111]:8080"


@pytest.mark.parametrize(
    ("url", "allowlist", "addresses"),
    [
        ("http://127.0.0.1:8080/hook", ["127.0.0.1"], None),
        ("http://[::1]:8080/hook", ["::1"], None),
        ("http://localhost:8080/hook", ["localhost"], ["127.0.0.1"]),
        ("http://LOCALHOST.:8080/hook", ["localhost"], ["127.0.0.1"]),
        ("http://10.1.2.3/hook", ["10.0.0.0/8"], None),
        ("http://hooks.internal/hook", ["192.168.0.0/16"], ["192.168.4.2"]),
    ],
)
def test_allowlisted_urls_accepted(
    url: str, allowlist: list[str], addresses: list[str] | None
) -> None:
    host = url.split("//")[1].split(":")[0].split("/")[0].lower().rstrip(".")
    resolve = fake_dns({host: addresses}) if addresses else no_dns

    validated = validate_webhook_url(url, allowlist, resolve=resolve)

    assert validated.addresses


@pytest.mark.parametrize("allowlist", [["169.254.169.254"], ["169.254.0.0/16"], ["meta.test"]])
def test_allowlist_never_allows_metadata(allowlist: list[str]) -> None:
    resolve = fake_dns({"meta.test": ["169.254.169.254"]})

    with pytest.raises(WebhookURLRejected, match="metadata"):
        validate_webhook_url("http://meta.test/", allowlist, resolve=resolve)
    with pytest.raises(WebhookURLRejected, match="metadata"):
        validate_webhook_url("http://169.254.169.254/", allowlist, resolve=no_dns)


def test_allowlist_host_is_exact() -> None:
    resolve = fake_dns({"evil-localhost": ["127.0.0.1"], "localhost.evil.test": ["127.0.0.1"]})

    for url in ("http://evil-localhost/", "http://localhost.evil.test/"):
        with pytest.raises(WebhookURLRejected, match="loopback"):
            validate_webhook_url(url, ["localhost"], resolve=resolve)


def test_redact_url_drops_query() -> None:
    assert (
        redact_url("https://hooks.example.com:8443/in?token=abc#frag")
        == "https://hooks.example.com:8443/in"
    )
    assert redact_url("http://[::1]/x?y") == "http://[::1]/x"


# -- delivery against a receiver on 127.0.0.1 --------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that replies with queued statuses and records each request."""

    port: int
    statuses: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            state.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            status, extra_headers = state.statuses.pop(0) if state.statuses else (200, {})
            self.send_response(status)
            for name, value in extra_headers.items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature fixed by the base class
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class SleepRecorder:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def test_deliver_retries_after_500(receiver: Receiver) -> None:
    receiver.statuses = [(500, {}), (200, {})]
    event = build_event("job_abc", "succeeded")
    sleep = SleepRecorder()

    result = deliver(
        receiver.url(), SECRET, event, allowlist=["127.0.0.1"], resolve=no_dns, sleep=sleep
    )

    assert result.delivered
    assert result.status_code == 200
    assert [a.status_code for a in result.attempts] == [500, 200]
    assert len(receiver.requests) == 2
    assert len(sleep.delays) == 1
    assert 0.5 <= sleep.delays[0] <= 1.0

    ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    assert ids == {event["id"]}
    for headers, body in receiver.requests:
        assert body == encode_event(event)
        assert headers["content-type"] == "application/json"
        verify_signature(SECRET, headers, body)


def test_deliver_pins_resolved_address(receiver: Receiver) -> None:
    resolve = fake_dns({"receiver.test": ["127.0.0.1"]})

    result = deliver(
        receiver.url("receiver.test"),
        SECRET,
        build_event("job_abc", "failed"),
        allowlist=["receiver.test"],
        resolve=resolve,
        sleep=SleepRecorder(),
    )

    assert result.delivered
    headers, _ = receiver.requests[0]
    assert headers["host"] == f"receiver.test:{receiver.port}"


def test_deliver_revalidates_each_attempt(receiver: Receiver) -> None:
    # The first lookup returns the receiver; the second returns a private address,
    # as a DNS rebinding attack would. The retry must not connect to it.
    answers = [["127.0.0.1"], ["10.0.0.7"]]
    lookups: list[str] = []

    def rebinding_dns(host: str, port: int) -> list[str]:
        lookups.append(host)
        return answers[min(len(lookups), len(answers)) - 1]

    receiver.statuses = [(503, {})]
    result = deliver(
        receiver.url("flip.test"),
        SECRET,
        build_event("job_abc", "succeeded"),
        allowlist=["127.0.0.1/32"],
        resolve=rebinding_dns,
        sleep=SleepRecorder(),
    )

    assert not result.delivered
    assert not result.retryable
    assert len(lookups) == 2
    assert len(receiver.requests) == 1
    assert result.error is not None
    assert "10.0.0.7, a private" in result.error


def test_deliver_rejected_url_never_connects(receiver: Receiver) -> None:
    result = deliver(
        receiver.url(),
        SECRET,
        build_event("job_abc", "failed"),
        resolve=no_dns,
        sleep=SleepRecorder(),
    )

    assert not result.delivered
    assert not result.retryable
    assert len(result.attempts) == 1
    assert receiver.requests == []


def test_deliver_client_error_not_retried(receiver: Receiver) -> None:
    receiver.statuses = [(400, {})]
    sleep = SleepRecorder()

    result = deliver(
        receiver.url(),
        SECRET,
        build_event("job_abc", "failed"),
        allowlist=["127.0.0.1"],
        sleep=sleep,
    )

    assert not result.delivered
    assert result.status_code == 400
    assert not result.retryable
    assert len(receiver.requests) == 1
    assert sleep.delays == []


def test_deliver_redirect_not_followed(receiver: Receiver) -> None:
    receiver.statuses = [(302, {"location": receiver.url(path="/elsewhere")})]

    result = deliver(
        receiver.url(),
        SECRET,
        build_event("job_abc", "failed"),
        allowlist=["127.0.0.1"],
        sleep=SleepRecorder(),
    )

    assert not result.delivered
    assert result.status_code == 302
    assert len(receiver.requests) == 1


def test_deliver_attempts_bounded(receiver: Receiver) -> None:
    receiver.statuses = [(503, {})] * 10
    sleep = SleepRecorder()

    result = deliver(
        receiver.url(),
        SECRET,
        build_event("job_abc", "failed"),
        allowlist=["127.0.0.1"],
        max_attempts=4,
        backoff_s=1.0,
        max_backoff_s=3.0,
        sleep=sleep,
    )

    assert not result.delivered
    assert result.retryable
    assert len(receiver.requests) == 4
    assert len(sleep.delays) == 3
    for number, delay in enumerate(sleep.delays, start=1):
        ceiling = min(3.0, 2 ** (number - 1))
        assert ceiling * 0.5 <= delay <= ceiling


def test_deliver_honors_retry_after(receiver: Receiver) -> None:
    receiver.statuses = [(429, {"retry-after": "7"}), (200, {})]
    sleep = SleepRecorder()

    result = deliver(
        receiver.url(),
        SECRET,
        build_event("job_abc", "failed"),
        allowlist=["127.0.0.1"],
        sleep=sleep,
    )

    assert result.delivered
    assert sleep.delays == [7.0]


def test_deliver_connection_refused_retried() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    sleep = SleepRecorder()

    result = deliver(
        f"http://127.0.0.1:{closed_port}/hook",
        SECRET,
        build_event("job_abc", "failed"),
        allowlist=["127.0.0.1"],
        max_attempts=3,
        timeout_s=2.0,
        sleep=sleep,
    )

    assert not result.delivered
    assert result.retryable
    assert len(result.attempts) == 3
    assert all(a.error and "ConnectError" in a.error for a in result.attempts)
    assert len(sleep.delays) == 2


def test_deliver_result_as_dict(receiver: Receiver) -> None:
    result = deliver(
        receiver.url(path="/hook?token=secret"),
        SECRET,
        build_event("job_abc", "succeeded"),
        allowlist=["127.0.0.1"],
        sleep=SleepRecorder(),
    )

    logged = result.as_dict()
    assert logged["delivered"] is True
    assert "token" not in logged["url"]
    assert logged["attempts"][0]["status_code"] == 200
