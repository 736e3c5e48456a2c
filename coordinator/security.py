"""The fleet's identities: a private CA, the coordinator's and the nodes' certificates, enrollment tokens
and API keys.

Certificates (EC P-256, SHA-256) are made with the `cryptography` package. `init_ca` writes, into the
coordinator's --tls-dir, ca.pem/ca.key and coordinator.pem/coordinator.key (SubjectAltNames for the hosts
nodes dial, plus COORDINATOR_NAME); `issue_node_cert` writes a directory with node.pem, node.key and
ca.pem that an operator copies to the device as its --tls-dir. Every leaf certificate is good for both
client and server use: nodes dial the coordinator, and the coordinator dials a node's rank 0. Private
keys are written 0600 and never overwritten without force.

Enrollment tokens, user API keys and admin keys are random secrets shown once; only their SHA-256 is
stored (secrets.json in the coordinator's state directory) and a presented secret is compared in
constant time. A secret reads `<prefix>.<id>.<random>`: the id (not secret) finds its record, lists and
revokes it. The same file records revoked node names: certificates issued for such a name before its
revocation are refused by the coordinator (SecretStore.certificate_revoked), since gRPC has no CRLs.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edge_node.model.errors import EdgefedError
from edge_node.tls import (
    CA_CERT,
    COORDINATOR_NAME,
    NODE_CERT,
    NODE_KEY,
    TARGET_NAME_OPTION,
    TLSBundle,
    channel_credentials_for,
    common_name,
    load_bundle,
    server_credentials_for,
)

CA_KEY = "ca.key"
COORDINATOR_CERT = "coordinator.pem"
COORDINATOR_KEY = "coordinator.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365  # leaf certificates
DEFAULT_CA_DAYS = 3650
_SKEW = dt.timedelta(minutes=5)  # not-before is backdated by this much, for clocks a little behind
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*")


class SecurityError(EdgefedError):
    """A CA, certificate, token or key operation cannot be done (missing CA, existing files, a bad name)."""


@dataclass(frozen=True)
class CertFiles:
    """Where one party's PEM files were written."""

    dir: Path
    cert: Path
    key: Path
    ca: Path
    name: str
    not_after: dt.datetime


# ---------------------------------------------------------------- certificates


def check_node_name(name: str) -> str:
    """A node name usable as a certificate CN and DNS SubjectAltName: lowercase letters, digits, '-' and
    '.', at most 64 characters, not the coordinator's reserved name."""
    if not isinstance(name, str) or len(name) > 64 or not _NAME.fullmatch(name):
        raise SecurityError(f"node name {name!r} is not valid: use 1-64 lowercase letters, digits, '-' and '.', "
                            f"starting and ending with a letter or digit (e.g. 'pi4-kitchen')")
    if name == COORDINATOR_NAME:
        raise SecurityError(f"node name {name!r} is reserved for the coordinator's certificate")
    return name


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host) or len(host) > 253:
        raise SecurityError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temporary file + rename) with `mode` from the start (a key is never world-readable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _days(days: float, what: str) -> dt.timedelta:
    if not isinstance(days, int | float) or not 0 < days <= 36500:
        raise SecurityError(f"{what} must be between 0 and 36500 days, got {days!r}")
    return dt.timedelta(days=days)


def _builder(subject_cn: str, issuer, public_key, not_after: dt.datetime, now: dt.datetime):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - _SKEW).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _make_ca(days: float, now: dt.datetime):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    b = _builder("edgefed fleet CA", None, key.public_key(), now + _days(days, "the CA's lifetime"), now)
    b = b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                      content_commitment=False, key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    return b.sign(key, hashes.SHA256()), key


def _make_leaf(ca_cert, ca_key, cn: str, sans: list, days: float, now: dt.datetime):
    """A certificate for `cn` signed by the CA, for TLS server and client use; not valid past the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    not_after = min(now + _days(days, "--days"), ca_cert.not_valid_after_utc)
    b = _builder(cn, ca_cert.subject, key.public_key(), not_after, now)
    b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                      content_commitment=False, key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False)
    b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _load_ca(tls_dir: Path):
    """The CA certificate and key in a coordinator's --tls-dir (checked: present, valid, matching)."""
    from cryptography.hazmat.primitives import serialization

    if not (tls_dir / CA_CERT).is_file() or not (tls_dir / CA_KEY).is_file():
        raise SecurityError(f"{tls_dir}: no CA here ({CA_CERT} and {CA_KEY}); create one with "
                            f"`edgefed certs init --tls-dir {tls_dir}`")
    bundle = load_bundle(tls_dir, CA_CERT, CA_KEY)  # checks validity and that key and certificate match
    from cryptography import x509

    return x509.load_pem_x509_certificate(bundle.ca), serialization.load_pem_private_key(bundle.key, None)


def init_ca(tls_dir: str | Path, coordinator_hosts: Iterable[str] | None = None, *, days: float = DEFAULT_DAYS,
            ca_days: float = DEFAULT_CA_DAYS, force: bool = False) -> CertFiles:
    """Create the fleet's CA and the coordinator's certificate in `tls_dir`; returns the coordinator's files.

    The coordinator certificate's SubjectAltNames are `coordinator_hosts` (IP addresses or DNS names nodes
    dial; default 127.0.0.1 and localhost) and COORDINATOR_NAME. An existing CA is kept unless `force`
    (replacing it invalidates every node certificate it signed).
    """
    d = Path(tls_dir)
    hosts = list(coordinator_hosts or DEFAULT_HOSTS)
    sans = [_san(h) for h in hosts]
    if not force and ((d / CA_CERT).exists() or (d / CA_KEY).exists()):
        raise SecurityError(f"{d}: a CA already exists ({CA_CERT}); replacing it invalidates every node certificate "
                            f"it signed: pass --force to do it anyway, or `edgefed certs node` to use it")
    _days(days, "--days")
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = _make_ca(ca_days, now)
    _write(d / CA_KEY, _pem_key(ca_key), 0o600)
    _write(d / CA_CERT, _pem_cert(ca_cert), 0o644)
    return _issue_coordinator(d, ca_cert, ca_key, sans, days, now)


def _issue_coordinator(d: Path, ca_cert, ca_key, sans: list, days: float, now: dt.datetime) -> CertFiles:
    from cryptography import x509

    sans = [*sans, x509.DNSName(COORDINATOR_NAME)]
    cert, key = _make_leaf(ca_cert, ca_key, COORDINATOR_NAME, list(dict.fromkeys(sans)), days, now)
    _write(d / COORDINATOR_KEY, _pem_key(key), 0o600)
    _write(d / COORDINATOR_CERT, _pem_cert(cert), 0o644)
    return CertFiles(d, d / COORDINATOR_CERT, d / COORDINATOR_KEY, d / CA_CERT, COORDINATOR_NAME,
                     cert.not_valid_after_utc)


def issue_coordinator_cert(tls_dir: str | Path, coordinator_hosts: Iterable[str] | None = None, *,
                           days: float = DEFAULT_DAYS) -> CertFiles:
    """A new coordinator certificate from the existing CA (other hosts, or renewal); node certificates stay valid."""
    d = Path(tls_dir)
    ca_cert, ca_key = _load_ca(d)
    sans = [_san(h) for h in (coordinator_hosts or DEFAULT_HOSTS)]
    return _issue_coordinator(d, ca_cert, ca_key, sans, days, dt.datetime.now(dt.UTC))


def issue_node_cert(tls_dir: str | Path, name: str, out_dir: str | Path | None = None, *,
                    days: float = DEFAULT_DAYS, force: bool = False, now: dt.datetime | None = None) -> CertFiles:
    """A certificate for node `name` (CN and DNS SubjectAltName = name) signed by the CA in `tls_dir`.

    Writes node.pem, node.key and ca.pem into `out_dir` (default: <tls_dir>/nodes/<name>): the directory a
    node operator copies to the device and passes as its --tls-dir.
    """
    from cryptography import x509

    check_node_name(name)
    d = Path(tls_dir)
    out = Path(out_dir) if out_dir is not None else d / "nodes" / name
    ca_cert, ca_key = _load_ca(d)
    if not force and ((out / NODE_KEY).exists() or (out / NODE_CERT).exists()):
        raise SecurityError(f"{out}: already holds a node certificate; pass --force to replace it")
    now = now or dt.datetime.now(dt.UTC)  # an explicit time: tests of expiry and revocation
    cert, key = _make_leaf(ca_cert, ca_key, name, [x509.DNSName(name)], days, now)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / NODE_KEY, _pem_key(key), 0o600)
    _write(out / NODE_CERT, _pem_cert(cert), 0o644)
    _write(out / CA_CERT, _pem_cert(ca_cert), 0o644)
    return CertFiles(out, out / NODE_CERT, out / NODE_KEY, out / CA_CERT, name, cert.not_valid_after_utc)


def describe_certificate(path: str | Path) -> dict:
    """A certificate's name, SubjectAltNames, issuer, validity and SHA-256 fingerprint: `path` is a PEM file or
    a TLS directory (its node.pem, else coordinator.pem, else ca.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    p = Path(path)
    if p.is_dir():
        p = next((p / f for f in (NODE_CERT, COORDINATOR_CERT, CA_CERT) if (p / f).is_file()), p / NODE_CERT)
    try:
        cert = x509.load_pem_x509_certificate(p.read_bytes())
    except FileNotFoundError:
        raise SecurityError(f"{p}: not found") from None
    except (OSError, ValueError) as e:
        raise SecurityError(f"{p}: not a readable PEM certificate ({e})") from None
    try:
        sans = [str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.GeneralName)]
    except x509.ExtensionNotFound:
        sans = []
    return {"file": str(p), "name": common_name(cert), "subject_alt_names": sans,
            "issuer": cert.issuer.rfc4514_string(), "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
            "sha256": cert.fingerprint(hashes.SHA256()).hex()}


def coordinator_bundle(tls_dir: str | Path) -> TLSBundle:
    """The coordinator's checked PEM material (coordinator.pem/.key and ca.pem in its --tls-dir)."""
    return load_bundle(tls_dir, COORDINATOR_CERT, COORDINATOR_KEY)


def server_credentials(tls_dir: str | Path):
    """The coordinator's gRPC server credentials: coordinator.pem, and a client certificate signed by the
    fleet's CA required from every caller. Which certificate (node) it is: edge_node.tls.peer_name."""
    return server_credentials_for(coordinator_bundle(tls_dir))


def node_channel_credentials(tls_dir: str | Path):
    """Credentials for the coordinator to dial a node's rank-0 server, presenting coordinator.pem."""
    return channel_credentials_for(coordinator_bundle(tls_dir))


def node_channel_options(node_name: str) -> list[tuple[str, str]]:
    """Channel options that verify the dialled node by its name (the node certificate's SAN), whatever the
    address: pass with node_channel_credentials to grpc.secure_channel."""
    return [(TARGET_NAME_OPTION, check_node_name(node_name))]


# ---------------------------------------------------------------- enrollment tokens and API keys

KINDS = {"enroll": "efe", "api": "efk", "admin": "efa"}  # kind -> the prefix its secrets carry
SECRETS_FILE = "secrets.json"


def hash_secret(secret: str) -> str:
    """What is stored for a secret: its SHA-256 (secrets are 256 random bits, so no slow KDF is needed)."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def verify_secret(secret: str, stored: str) -> bool:
    """Does `secret` hash to `stored`? Constant-time in the compared digests."""
    return hmac.compare_digest(hash_secret(secret).encode(), stored.encode())


def new_secret(kind: str) -> tuple[str, str]:
    """(id, secret) for a new secret of `kind`; the secret is `<prefix>.<id>.<random>`."""
    if kind not in KINDS:
        raise SecurityError(f"secret kind must be one of {', '.join(KINDS)}, got {kind!r}")
    sid = secrets.token_hex(6)
    return sid, f"{KINDS[kind]}.{sid}.{secrets.token_urlsafe(32)}"


def secret_id(secret: str) -> str | None:
    """The id part of a presented secret (None when it is not shaped like one)."""
    parts = secret.split(".") if isinstance(secret, str) else []
    if len(parts) != 3 or parts[0] not in KINDS.values() or not re.fullmatch(r"[0-9a-f]{12}", parts[1]):
        return None
    return parts[1]


@dataclass(frozen=True)
class SecretRecord:
    id: str
    kind: str  # "enroll" | "api" | "admin"
    hash: str
    label: str = ""
    created: float = 0.0  # unix seconds
    expires: float | None = None  # unix seconds; None: never
    uses_left: int | None = None  # enrollment tokens: registrations left; None: unlimited
    used: int = 0
    revoked: bool = False

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires is None or now < self.expires) and self.uses_left != 0

    def public(self) -> dict:
        """The record without its hash (what `edgefed certs list` shows)."""
        d = asdict(self)
        d.pop("hash")
        return d


@dataclass
class _Doc:
    """secrets.json as read (a working copy under the lock, or a cached snapshot)."""

    records: dict[str, SecretRecord]
    revoked_nodes: dict[str, float]  # node name -> when its certificates were revoked (unix seconds)

    def dump(self) -> bytes:
        return json.dumps({"secrets": [asdict(r) for r in self.records.values()],
                           "revoked_nodes": self.revoked_nodes}, indent=1).encode()


class SecretStore:
    """Enrollment tokens, API keys and node-certificate revocations in <state_dir>/secrets.json (secrets hashed).

    The file is re-read whenever it changed, so a key minted by `edgefed certs` while the coordinator runs is
    accepted at once; writers take an exclusive lock and replace the file atomically.
    """

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.path = self.dir / SECRETS_FILE
        self._cache: tuple[tuple[int, int, int], _Doc] | None = None

    @contextmanager
    def _locked(self) -> Iterator[_Doc]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / (SECRETS_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._cache = None  # under the lock: always the file as it is now
                doc = self._load()
                yield doc
                _write(self.path, doc.dump(), 0o600)
            finally:
                self._cache = None
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> _Doc:
        """A copy of the file's contents, parsed again only when the file changed (a write replaces it: new
        inode and mtime); this process's own writes drop the cache."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return _Doc({}, {})
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cache = self._cache
        if cache is None or cache[0] != stamp:
            try:
                raw = json.loads(self.path.read_text())
                revoked = {str(k): float(v) for k, v in (raw.get("revoked_nodes") or {}).items()}
                doc = _Doc({r["id"]: SecretRecord(**r) for r in raw["secrets"]}, revoked)
            except FileNotFoundError:
                return _Doc({}, {})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise SecurityError(f"{self.path}: not a valid secrets file ({e})") from None
            cache = self._cache = (stamp, doc)
        return _Doc(dict(cache[1].records), dict(cache[1].revoked_nodes))

    def create(self, kind: str, label: str = "", ttl_s: float | None = None, uses: int | None = None,
               now: float | None = None) -> tuple[SecretRecord, str]:
        """A new secret of `kind`; returns its record and the secret itself (shown once, never stored)."""
        if ttl_s is not None and not ttl_s > 0:
            raise SecurityError(f"a lifetime must be positive, got {ttl_s}")
        if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or uses < 1):
            raise SecurityError(f"uses must be a positive integer, got {uses!r}")
        now = time.time() if now is None else now
        sid, secret = new_secret(kind)
        rec = SecretRecord(sid, kind, hash_secret(secret), label, now, None if ttl_s is None else now + ttl_s, uses)
        with self._locked() as doc:
            doc.records[sid] = rec
        return rec, secret

    def list(self, kind: str | None = None) -> list[SecretRecord]:
        records = self._load().records.values()
        return sorted((r for r in records if kind is None or r.kind == kind), key=lambda r: r.created)

    def revoke(self, sid: str) -> SecretRecord:
        with self._locked() as doc:
            if sid not in doc.records:
                raise SecurityError(f"no token or key with id {sid!r} in {self.path}")
            doc.records[sid] = replace(doc.records[sid], revoked=True)
            return doc.records[sid]

    def check(self, secret: str, kinds: Iterable[str], now: float | None = None) -> SecretRecord | None:
        """The record of a valid (known, unrevoked, unexpired, not used up) secret of one of `kinds`, else None.
        E.g. user API calls: check(key, ("api", "admin")); admin calls: check(key, ("admin",))."""
        sid = secret_id(secret)
        rec = self._load().records.get(sid) if sid else None
        ok = rec is not None and verify_secret(secret, rec.hash)
        now = time.time() if now is None else now
        return rec if ok and rec.kind in tuple(kinds) and rec.usable(now) else None

    def consume(self, secret: str, kind: str = "enroll", now: float | None = None) -> SecretRecord | None:
        """Check an enrollment token and count one use (atomically); None when it is not valid."""
        now = time.time() if now is None else now
        sid = secret_id(secret)
        if sid is None:
            return None
        with self._locked() as doc:
            rec = doc.records.get(sid)
            if rec is None or not verify_secret(secret, rec.hash) or rec.kind != kind or not rec.usable(now):
                return None
            left = None if rec.uses_left is None else rec.uses_left - 1
            doc.records[sid] = replace(rec, uses_left=left, used=rec.used + 1)
            return doc.records[sid]

    def revoke_node(self, name: str, now: float | None = None) -> float:
        """Refuse every certificate of node `name` issued until now (a lost or retired device); one issued for
        the name in a later second (`edgefed certs node NAME --force`) is accepted (certificate times are
        whole seconds). Returns the time."""
        check_node_name(name)
        now = time.time() if now is None else now
        with self._locked() as doc:
            doc.revoked_nodes[name] = now
        return now

    def revoked_nodes(self) -> dict[str, float]:
        return self._load().revoked_nodes

    def certificate_revoked(self, cert) -> bool:
        """Is this peer certificate (edge_node.tls.peer_certificate) of a node whose certificates were revoked
        after it was issued? The coordinator asks on every call it authenticates by certificate."""
        revoked_at = self._load().revoked_nodes.get(common_name(cert))
        return revoked_at is not None and issued_at(cert) <= revoked_at


def issued_at(cert) -> float:
    """When `cert` was issued (unix seconds): its not-before plus the backdating this module applies."""
    return (cert.not_valid_before_utc + _SKEW).timestamp()
