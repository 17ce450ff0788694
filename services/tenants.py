"""Tenants: who an API key belongs to, what that tenant may do, and how much of it.

lmstack is shared by several teams. A key names a **tenant** (a team, a customer) with a **role**
and **quotas**; everything a tenant creates (datasets, fine-tuning jobs, their checkpoints and the
models they publish) belongs to it.

**The keys file** (``--api-keys-file``, ``LMSTACK_API_KEYS_FILE``; YAML, or JSON which is YAML too)
maps the *sha256* of each key to its tenant. lmstack never stores a plaintext key: ``lmstack keys
create`` prints a new key once and appends only its hash::

    keys:
      9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08:
        tenant: team-a
        role: member                  # or admin
        quotas:                       # 0 or absent: unlimited
          concurrent_requests: 4      # generation requests in flight at once (Complete*, FewShot, Score, Inspect)
          tokens_per_minute: 20000    # prompt + completion tokens over the last 60 s
          active_jobs: 2              # fine-tuning jobs queued or running
          dataset_bytes: 50000000     # bytes of stored datasets
          published_models: 5         # fine-tuned models in the store (and jobs that will publish one)

A tenant with several keys has one role and one set of quotas (its counters are shared): keys of
the same tenant that disagree are a configuration error. ``--api-keys k1,k2`` stays as a shorthand
for one admin tenant named ``admin``. With no key configured at all, every caller is the admin
tenant ``default`` (no isolation), which ``services.tls.check_exposure`` allows only on loopback.

**Roles.** A *member* sees and acts on its own datasets, jobs and fine-tuned models only; another
tenant's are ``NOT_FOUND``, never ``PERMISSION_DENIED`` (existence is not leaked). An *admin* sees
everything, and acts *for* a tenant by sending ``lmstack-tenant: <name>`` metadata (gRPC) or an
``LMSTACK-Tenant`` header (HTTP): the call then runs as that tenant, with its ownership and quotas.

**One owner.** The auth interceptor (``services.server.ApiKeyAuth``) resolves the caller once per
RPC and sets it with :func:`use`; handlers ask :func:`current`. Other transports do the same.
Key comparison is constant-time: the presented key's sha256 is compared with every stored hash
through ``hmac.compare_digest``.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path

ROLES = ("admin", "member")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
ACT_FOR_METADATA = "lmstack-tenant"  # gRPC metadata (lower case); HTTP: the LMSTACK-Tenant header
KEY_PREFIX = "lmsk-"


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; 0 means unlimited. Names are what ``RESOURCE_EXHAUSTED`` messages say."""

    concurrent_requests: int = 0
    tokens_per_minute: int = 0
    active_jobs: int = 0
    dataset_bytes: int = 0
    published_models: int = 0

    @classmethod
    def from_dict(cls, d: dict | None, where: str) -> Quotas:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{where}: unknown quota(s) {sorted(unknown)}; known: {sorted(known)}")
        for k, v in d.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{where}: quota {k} must be a non-negative integer, got {v!r}")
        return cls(**d)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


@dataclass(frozen=True)
class Tenant:
    name: str
    role: str = "member"
    quotas: Quotas = field(default_factory=Quotas)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def owns(self, owner: str) -> bool:
        """May this tenant use a model owned by ``owner``? Admins use all; ``""`` is the platform's
        (configured base models, a model copied into the store by hand): everyone uses those."""
        return self.is_admin or owner == self.name or owner == ""

    def owns_record(self, owner: str) -> bool:
        """May this tenant see a dataset or job owned by ``owner``? Its own; an admin's: all (records
        from before tenants, with no owner, are the admins' alone)."""
        return self.is_admin or owner == self.name


ANONYMOUS = Tenant("default", "admin")  # no keys configured: one trusted tenant (loopback only)
SHORTHAND_TENANT = "admin"  # the tenant of --api-keys

_current: contextvars.ContextVar[Tenant] = contextvars.ContextVar("lmstack_tenant", default=ANONYMOUS)


def current() -> Tenant:
    """The tenant of the request being handled (set by the transport's auth)."""
    return _current.get()


def set_current(tenant: Tenant) -> None:
    """Set the caller for the rest of this task (a gRPC RPC runs in its own task)."""
    _current.set(tenant)


@contextlib.contextmanager
def use(tenant: Tenant):
    """Run a block as ``tenant`` (tests, HTTP handlers, Ray Serve)."""
    token = _current.set(tenant)
    try:
        yield tenant
    finally:
        _current.reset(token)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits), prefixed so leaked keys are easy to grep for."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """sha256(key) -> Tenant, from the keys file and the ``--api-keys`` shorthand."""

    def __init__(self, entries: dict[str, Tenant] | None = None):
        self.entries = dict(entries or {})
        self._digests = [(bytes.fromhex(h), t) for h, t in self.entries.items()]
        self.tenants: dict[str, Tenant] = {}
        for t in self.entries.values():
            known = self.tenants.setdefault(t.name, t)
            if known != t:
                raise ValueError(f"tenant {t.name!r} has keys with different roles or quotas "
                                 f"({known.role} {known.quotas.as_dict()} vs {t.role} {t.quotas.as_dict()}); "
                                 "give every key of a tenant the same role and quotas")

    @classmethod
    def from_settings(cls, api_keys: list[str], api_keys_file: str = "") -> KeyRing:
        entries = load_keys_file(api_keys_file) if api_keys_file else {}
        admin = Tenant(SHORTHAND_TENANT, "admin")
        for key in api_keys:
            entries.setdefault(hash_key(key), admin)
        return cls(entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def authenticate(self, token: str) -> Tenant | None:
        """The tenant of ``token`` or None; compares the digest with every stored one (constant time)."""
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for stored, tenant in self._digests:
            if hmac.compare_digest(digest, stored):
                found = tenant
        return found

    def tenant(self, name: str) -> Tenant | None:
        return self.tenants.get(name)

    def resolve(self, metadata) -> tuple[Tenant | None, str]:
        """The caller of a request from its metadata (gRPC ``(key, value)`` pairs, or HTTP headers
        lower-cased): ``(tenant, "")``, or ``(None, why not)`` to answer UNAUTHENTICATED (401).
        Without keys every caller is ``ANONYMOUS``. Every transport calls this one rule."""
        if not self:
            return ANONYMOUS, ""
        md = {str(k).lower(): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in (metadata or ())}
        if "authorization" not in md:
            return None, "missing API key: send metadata 'authorization: Bearer <key>'"
        scheme, _, token = md["authorization"].partition(" ")
        tenant = self.authenticate(token) if scheme.lower() == "bearer" and token.strip() else None
        if tenant is None:
            return None, "invalid API key"
        acting = md.get(ACT_FOR_METADATA, "").strip()
        if acting and acting != tenant.name:
            target = self.tenant(acting)
            if not tenant.is_admin:  # a member learns nothing about other tenants
                return None, f"only an admin key may send '{ACT_FOR_METADATA}' metadata"
            if target is None:
                return None, f"unknown tenant {acting!r} in '{ACT_FOR_METADATA}' metadata"
            tenant = target
        return tenant, ""


def load_keys_file(path: str | Path) -> dict[str, Tenant]:
    """Parse a keys file (see the module docstring); a clear ``ValueError`` for every mistake."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"API keys file {p}: cannot read it ({e.strerror or e})") from None
    import yaml  # JSON is a subset of YAML: one parser for both

    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"API keys file {p}: not valid YAML or JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys", {}), dict):
        raise ValueError(f"API keys file {p}: expected a mapping with 'keys: {{<sha256>: {{tenant, role, quotas}}}}'")
    out: dict[str, Tenant] = {}
    for digest, entry in (doc.get("keys") or {}).items():
        digest = str(digest).lower()
        where = f"API keys file {p}, key {digest[:12]}..."
        if not SHA256_HEX.match(digest):
            raise ValueError(f"API keys file {p}: {str(digest)[:16]!r} is not a sha256 hex digest (64 hex "
                             "characters); store hashes, never keys: use `lmstack keys create`")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected {{tenant, role, quotas}}")
        name, role = str(entry.get("tenant", "")), str(entry.get("role", "member"))
        if not TENANT_NAME.match(name):
            raise ValueError(f"{where}: tenant {name!r} must be 1-64 letters, digits, '_', '.', '-'")
        if role not in ROLES:
            raise ValueError(f"{where}: role {role!r} must be one of {ROLES}")
        out[digest] = Tenant(name, role, Quotas.from_dict(entry.get("quotas"), where))
    return out


def append_key(path: str | Path, tenant: str, role: str | None = None, quotas: dict | None = None) -> str:
    """Create a key for ``tenant``, add its hash to the keys file (created 0600 if missing), return
    the plaintext key (shown once). A tenant that already has keys keeps its role and quotas unless
    new ones are given (then they must agree with the file: one role, one quota set per tenant)."""
    import yaml

    p = Path(path).expanduser()
    if not TENANT_NAME.match(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-64 letters, digits, '_', '.', '-'")
    existing = load_keys_file(p) if p.exists() else {}
    doc = (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}
    doc.setdefault("keys", {})
    doc["keys"] = doc["keys"] or {}
    same = next((t for t in existing.values() if t.name == tenant), None)
    chosen_role = role or (same.role if same else "member")
    chosen_quotas = Quotas.from_dict(quotas, "quotas") if quotas is not None else (same.quotas if same else Quotas())
    if same is not None and (same.role, same.quotas) != (chosen_role, chosen_quotas):
        raise ValueError(f"tenant {tenant!r} already has keys with role {same.role} and quotas "
                         f"{same.quotas.as_dict()}; edit {p} to change them for all its keys")
    key = new_key()
    entry: dict = {"tenant": tenant, "role": chosen_role}
    if chosen_quotas.as_dict():
        entry["quotas"] = chosen_quotas.as_dict()
    doc["keys"][hash_key(key)] = entry
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # hashes only, still nobody else's business
    with open(fd, "w") as f:
        if p.suffix == ".json":
            import json

            json.dump(doc, f, indent=2)
            f.write("\n")
        else:
            yaml.safe_dump(doc, f, sort_keys=False)
    tmp.replace(p)
    return key
