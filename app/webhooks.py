"""Outgoing webhooks: target URL checks, Standard Webhooks signing, and delivery with retries.

Events are thin: ``{id, type, created_at, data: {job_id, status}}``. A receiver
fetches the job for details, so a leaked or replayed webhook reveals little.

Every request carries the Standard Webhooks headers:

* ``webhook-id``: the event id, identical on every retry, so receivers dedupe by it;
* ``webhook-timestamp``: Unix seconds at the attempt;
* ``webhook-signature``: ``v1,`` followed by base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).

A target URL is checked again before every attempt, because the DNS answer
can change between submission and delivery (DNS rebinding). The request then
goes to the address that passed the check, with the original host in the
``Host`` header and in TLS SNI, so a second lookup cannot redirect it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from app.core.ids import new_id

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Given a host name and a port, return the IP addresses it resolves to, as strings.
Resolver = Callable[[str, int], Sequence[str]]

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
MAX_URL_LENGTH = 2048
USER_AGENT = "subclone-webhooks/1"

# Instance metadata services. Most are link-local or private anyway; they are
# listed so that an allowlisted network or host name can never reach them.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)

# NAT64 (RFC 6052) embeds an IPv4 address in the last 32 bits.
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# RFC 6598 shared address space (carrier-grade NAT); Python's is_private is False for it.
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")


class WebhookURLRejected(ValueError):
    """A webhook URL is invalid or points at an address the service must not call.

    ``transient`` is True when the host name could not be resolved, which may
    succeed later; every other rejection is permanent.
    """

    def __init__(self, url: str, reason: str, *, transient: bool = False) -> None:
        super().__init__(f"webhook URL {redact_url(url)!r} rejected: {reason}")
        self.url = url
        self.reason = reason
        self.transient = transient


class WebhookVerificationError(Exception):
    """A received webhook has missing headers, a stale timestamp or no matching signature."""


# -- URL checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowlist:
    """Operator exceptions to the address checks: exact host names and IP networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        """Parse entries such as ``hooks.internal``, ``10.0.0.5`` or ``10.20.0.0/16``."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks))

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


@dataclass(frozen=True)
class ValidatedURL:
    """A webhook URL that passed the checks, with the addresses its host resolved to."""

    url: str
    scheme: str
    host: str
    port: int
    target: str
    addresses: tuple[IPAddress, ...]

    def pinned_url(self, address: IPAddress) -> str:
        """Return the URL with its host replaced by ``address``, so the connection skips DNS."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{literal}:{self.port}{self.target}"

    @property
    def host_header(self) -> str:
        default_port = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default_port else f"{host}:{self.port}"


def resolve_host(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the system resolver and return its distinct addresses."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def validate_webhook_url(
    url: str,
    allowlist: Iterable[str] | Allowlist = (),
    *,
    resolve: Resolver = resolve_host,
) -> ValidatedURL:
    """Check that ``url`` may receive webhooks and return it with its resolved addresses.

    Rejected: schemes other than http and https, user names or passwords in the
    URL, and hosts of which any address is loopback, private, link-local,
    shared (100.64.0.0/10), multicast, reserved, unspecified or otherwise not
    globally routable. IPv4 addresses embedded in IPv6 (mapped, 6to4, Teredo,
    NAT64) are checked as IPv4. Numeric hosts in the shorthand forms that
    ``inet_aton`` accepts (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) are read
    as the address they denote. A host name in ``allowlist``, or an address in
    an allowlisted network, skips the checks, except that instance metadata
    addresses are always rejected.

    Never connects anywhere. ``resolve`` is called only for host names, not
    for IP literals.

    Raises:
        WebhookURLRejected: with ``transient=True`` when the host did not resolve.
    """
    rules = allowlist if isinstance(allowlist, Allowlist) else Allowlist.parse(allowlist)
    parsed = _parse_url(url)
    scheme, host, port, target = parsed

    literal = _parse_ip_literal(url, host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        addresses = _resolve(url, host, port, resolve)

    host_allowed = host in rules.hosts
    for address in addresses:
        if literal is None:
            subject = f"{host} resolves to {address},"
        elif host == str(address) or ":" in host:
            subject = f"{host} is"
        else:
            subject = f"{host} is {address},"  # a shorthand numeric form such as 2130706433
        if address in METADATA_ADDRESSES or _embedded_ipv4(address) in METADATA_ADDRESSES:
            raise WebhookURLRejected(
                url, f"{subject} a cloud metadata address, which is never allowed"
            )
        if host_allowed or rules.allows_address(address):
            continue
        reason = _blocked_reason(address)
        if reason is not None:
            raise WebhookURLRejected(
                url,
                f"{subject} a {reason} address; an operator can allowlist the host or its network",
            )

    return ValidatedURL(url, scheme, host, port, target, tuple(addresses))


def _parse_url(url: str) -> tuple[str, str, int, str]:
    if not isinstance(url, str) or not url:
        raise WebhookURLRejected(str(url), "the URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookURLRejected(
            url[:64], f"the URL has {len(url)} characters, the maximum is {MAX_URL_LENGTH}"
        )
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise WebhookURLRejected(url, "the URL contains whitespace or control characters")

    try:
        parts = urlsplit(url)
    except ValueError as exc:  # for example an invalid IPv6 literal in brackets
        raise WebhookURLRejected(url, f"the URL is invalid: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookURLRejected(url, f"scheme {parts.scheme!r} is not allowed, use http or https")
    if "@" in parts.netloc:
        raise WebhookURLRejected(
            url, "credentials in the URL are not allowed; receivers verify the signature instead"
        )
    if not parts.hostname:
        raise WebhookURLRejected(url, "the URL has no host")
    try:
        port = parts.port
    except ValueError:
        raise WebhookURLRejected(url, "the port must be a number from 1 to 65535") from None
    if port == 0:
        raise WebhookURLRejected(url, "port 0 is not allowed, use a port from 1 to 65535")

    host = parts.hostname.rstrip(".")
    if not host:
        raise WebhookURLRejected(url, "the URL has no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise WebhookURLRejected(
                url, f"host {host!r} is not a valid internationalized domain name"
            ) from None

    target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return scheme, host.lower(), port or (443 if scheme == "https" else 80), target


def _parse_ip_literal(url: str, host: str) -> IPAddress | None:
    """Return the address a numeric host denotes, or None for a host name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host:
        raise WebhookURLRejected(url, f"host {host!r} is not a valid IPv6 address")

    # As in the WHATWG URL standard, a host whose last label is a number is an IPv4
    # address in one of the forms inet_aton accepts. Such a host never goes to DNS.
    labels = host.split(".")
    if not _is_ipv4_number(labels[-1]):
        return None
    try:
        numbers = [_parse_ipv4_number(label) for label in labels]
    except ValueError:
        raise WebhookURLRejected(url, f"host {host!r} is not a valid IPv4 address") from None
    if (
        len(numbers) > 4
        or any(n > 255 for n in numbers[:-1])
        or numbers[-1] >= 256 ** (5 - len(numbers))
    ):
        raise WebhookURLRejected(url, f"host {host!r} is not a valid IPv4 address")
    value = numbers[-1]
    for index, number in enumerate(numbers[:-1]):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _is_ipv4_number(label: str) -> bool:
    if label.isdigit():
        return True
    return label[:2] in ("0x", "0X") and all(ch in "0123456789abcdefABCDEF" for ch in label[2:])


def _parse_ipv4_number(label: str) -> int:
    if label[:2] in ("0x", "0X"):
        return int(label[2:], 16) if label[2:] else 0
    if len(label) > 1 and label.startswith("0"):
        return int(label[1:], 8)
    return int(label, 10)


def _resolve(url: str, host: str, port: int, resolve: Resolver) -> list[IPAddress]:
    try:
        raw_addresses = list(resolve(host, port))
    except OSError as exc:
        raise WebhookURLRejected(url, f"resolving {host} failed: {exc}", transient=True) from exc
    if not raw_addresses:
        raise WebhookURLRejected(url, f"{host} resolves to no address", transient=True)

    addresses = []
    for raw in raw_addresses:
        try:
            addresses.append(ipaddress.ip_address(raw))
        except ValueError:
            raise WebhookURLRejected(
                url, f"{host} resolves to an invalid address {raw!r}"
            ) from None
    return addresses


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address inside an IPv4-mapped, 6to4, Teredo or NAT64 IPv6 address."""
    if address.version == 4:
        return None
    assert isinstance(address, ipaddress.IPv6Address)
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client address; the server is a public relay
    if address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _blocked_reason(address: IPAddress) -> str | None:
    """Name the kind of a non-public address, or return None for a globally routable one."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = _blocked_reason(embedded)
        return f"{reason} (embedded in IPv6)" if reason else None

    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address in _SHARED_ADDRESS_SPACE:
        return "shared (carrier-grade NAT)"
    if address.version == 6 and address.is_site_local:
        return "site-local"
    # Before is_private, because Python counts 240.0.0.0/4 as private too.
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "non-global"
    return None


def redact_url(url: str) -> str:
    """Return ``url`` without user info, query and fragment, which may carry tokens, for logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))


# -- signing -----------------------------------------------------------------------------


def generate_secret() -> str:
    """Return a new signing secret in the Standard Webhooks form ``whsec_`` + base64(32 random bytes)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _secret_key(secret: str | bytes) -> bytes:
    """Return the HMAC key: raw for bytes, base64-decoded for strings, with or without ``whsec_``.

    Decoding strings with or without the prefix matches the Standard Webhooks
    libraries, so a receiver using them verifies with the same secret text.
    """
    if isinstance(secret, bytes):
        key = secret
    else:
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise ValueError(
                "webhook secret is not valid base64; expected whsec_ followed by base64, "
                "as generate_secret() returns"
            ) from None
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(secret: str | bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` value for one message: ``v1,`` + base64 HMAC-SHA256."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_headers(
    secret: str | bytes, webhook_id: str, body: bytes, *, timestamp: int
) -> dict[str, str]:
    """Return the three Standard Webhooks headers for ``body``."""
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


def verify_signature(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a received webhook's signature and timestamp; for receivers and tests.

    ``headers`` is looked up case-insensitively. ``webhook-signature`` may list
    several space-separated signatures (during a secret rotation), and one
    match is enough. Raises WebhookVerificationError when a header is missing,
    the timestamp is more than ``tolerance_s`` seconds away from ``now``, or no
    signature matches.
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    try:
        webhook_id = lowered["webhook-id"]
        timestamp_text = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from None

    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookVerificationError(f"invalid webhook-timestamp {timestamp_text!r}") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp {timestamp} is more than {tolerance_s} s away from now ({int(current)})"
        )

    expected = sign(secret, webhook_id, timestamp, body).encode()
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected):
            return
    raise WebhookVerificationError("no webhook-signature matches the body")


# -- events and delivery -----------------------------------------------------------------


def build_event(
    job_id: str,
    status: str,
    *,
    event_type: str | None = None,
    event_id: str | None = None,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """Return a thin job event; ``type`` defaults to ``job.<status>`` and ``id`` to a new ``evt_`` id."""
    timestamp = (created_at or datetime.now(UTC)).astimezone(UTC)
    return {
        "id": event_id or new_id("evt"),
        "type": event_type or f"job.{status}",
        "created_at": timestamp.isoformat().replace("+00:00", "Z"),
        "data": {"job_id": job_id, "status": status},
    }


def encode_event(event: Mapping[str, Any]) -> bytes:
    """Serialize an event to the exact bytes that are signed and sent."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode("utf-8")


@dataclass(frozen=True)
class DeliveryAttempt:
    """One HTTP attempt: its number from 1, the response status or the error, and its duration."""

    number: int
    status_code: int | None
    error: str | None
    elapsed_s: float


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of ``deliver``; ``retryable`` is True when a later delivery could still succeed."""

    webhook_id: str
    url: str
    delivered: bool
    status_code: int | None
    error: str | None
    retryable: bool
    attempts: tuple[DeliveryAttempt, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        """Return the result as plain data for structured logs; ``url`` carries no query string."""
        return asdict(self)


def _is_retryable_status(status_code: int) -> bool:
    return status_code >= 500 or status_code in (408, 425, 429)


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def deliver(
    url: str,
    secret: str | bytes,
    event: Mapping[str, Any],
    *,
    allowlist: Iterable[str] | Allowlist = (),
    resolve: Resolver = resolve_host,
    max_attempts: int = 5,
    timeout_s: float = 10.0,
    backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> DeliveryResult:
    """POST a signed event to ``url``, retrying failures with exponential backoff.

    The URL is validated before every attempt. These failures are retried: a
    connection error, a timeout, an unresolvable host, and the statuses 5xx,
    408, 425 and 429. After failed attempt ``n`` the wait is ``backoff_s *
    2**(n-1)`` seconds, capped at ``max_backoff_s`` and scaled by a random
    factor in [0.5, 1]. A numeric ``Retry-After`` can lengthen it up to the cap.

    A rejected URL, a redirect or another 4xx ends delivery at once, because
    retrying cannot change them. Redirects are not followed, since their target
    was never validated. Returns a DeliveryResult and never raises for
    delivery errors.

    ``event["id"]`` is the ``webhook-id`` on every attempt, so receivers can
    dedupe. Each attempt gets a fresh ``webhook-timestamp`` and signature.
    A ``client`` passed in must have ``trust_env=False`` and no proxy, because
    a proxy resolves the host again and could reach an unvalidated address.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts={max_attempts} is invalid: at least 1 attempt is required")
    webhook_id = str(event["id"])
    body = encode_event(event)
    rules = allowlist if isinstance(allowlist, Allowlist) else Allowlist.parse(allowlist)
    safe_url = redact_url(url)

    own_client = client is None
    # trust_env=False ignores HTTP_PROXY and HTTPS_PROXY, because a proxy would resolve the host again.
    http = client or httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False)
    attempts: list[DeliveryAttempt] = []
    try:
        for number in range(1, max_attempts + 1):
            status_code, error, retryable, retry_after = _attempt(
                http,
                url,
                rules,
                resolve,
                secret,
                webhook_id,
                body,
                timeout_s,
                clock,
                attempts,
                number,
            )
            if status_code is not None and 200 <= status_code < 300:
                logger.info(
                    "webhook %s delivered to %s on attempt %d", webhook_id, safe_url, number
                )
                return DeliveryResult(
                    webhook_id, safe_url, True, status_code, None, False, tuple(attempts)
                )

            logger.warning(
                "webhook %s to %s failed on attempt %d of %d: %s",
                webhook_id,
                safe_url,
                number,
                max_attempts,
                error or f"HTTP {status_code}",
            )
            if not retryable or number == max_attempts:
                return DeliveryResult(
                    webhook_id, safe_url, False, status_code, error, retryable, tuple(attempts)
                )

            delay = min(max_backoff_s, backoff_s * 2 ** (number - 1)) * random.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, min(retry_after, max_backoff_s))
            sleep(delay)
    finally:
        if own_client:
            http.close()
    raise AssertionError("unreachable: the loop returns on its last attempt")


def _attempt(
    http: httpx.Client,
    url: str,
    rules: Allowlist,
    resolve: Resolver,
    secret: str | bytes,
    webhook_id: str,
    body: bytes,
    timeout_s: float,
    clock: Callable[[], float],
    attempts: list[DeliveryAttempt],
    number: int,
) -> tuple[int | None, str | None, bool, float | None]:
    """Run one attempt, append it to ``attempts`` and return (status, error, retryable, retry_after)."""
    started = time.monotonic()

    def record(status_code: int | None, error: str | None) -> None:
        attempts.append(
            DeliveryAttempt(number, status_code, error, round(time.monotonic() - started, 3))
        )

    try:
        validated = validate_webhook_url(url, rules, resolve=resolve)
    except WebhookURLRejected as exc:
        record(None, str(exc))
        return None, str(exc), exc.transient, None

    headers = signature_headers(secret, webhook_id, body, timestamp=int(clock()))
    headers.update(
        {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": validated.host_header,
        }
    )
    # Connect to the address that passed validation. The original host name still
    # goes in the Host header and in TLS SNI, and the certificate is checked against it.
    # NOTE: the tests deliver over plain HTTP only; the https path with a pinned
    # address and sni_hostname (httpcore's request extension) has no test yet.
    extensions = {"sni_hostname": validated.host} if validated.scheme == "https" else {}
    request = http.build_request(
        "POST",
        validated.pinned_url(validated.addresses[0]),
        content=body,
        headers=headers,
        timeout=timeout_s,
        extensions=extensions,
    )
    try:
        # stream=True and an immediate close: the response body is never read.
        response = http.send(request, stream=True, follow_redirects=False)
        response.close()
    except httpx.TransportError as exc:
        transport_error = f"{type(exc).__name__}: {exc}"
        record(None, transport_error)
        return None, transport_error, True, None

    status_code = response.status_code
    error = None if 200 <= status_code < 300 else f"HTTP {status_code}"
    record(status_code, error)
    return status_code, error, _is_retryable_status(status_code), _retry_after_s(response)
