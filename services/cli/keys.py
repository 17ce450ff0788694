"""``lmstack keys``: API keys for tenants (``services.tenants``).

    lmstack keys create --tenant team-a [--role member] [--quota tokens_per_minute=20000 ...] [--file keys.yaml]
    lmstack keys list [--file keys.yaml]

``create`` prints the new key once, on stdout, and appends only its sha256 to the keys file
(created mode 0600; default ``$LMSTACK_API_KEYS_FILE``, else ``<data-dir>/api-keys.yaml``). Servers
read the file at start: restart them (or ``lmstack serve``) to pick up a new key. ``list`` shows
tenants, roles, quotas and how many keys each has: never a key.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_file() -> str:
    data = os.environ.get("LMSTACK_DATA_DIR", "data")
    return os.environ.get("LMSTACK_API_KEYS_FILE") or str(Path(data) / "api-keys.yaml")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    cr = sub.add_parser("create", help="create a key for a tenant (printed once) and store its hash")
    cr.add_argument("--tenant", required=True, help="tenant name (letters, digits, '_', '.', '-')")
    cr.add_argument("--role", choices=["member", "admin"], default=None,
                    help="default: the tenant's existing role, else member")
    cr.add_argument("--quota", action="append", default=None, metavar="NAME=N",
                    help="quota of the tenant (repeatable): concurrent_requests, tokens_per_minute, active_jobs, "
                         "dataset_bytes, published_models; 0 is unlimited")
    ls = sub.add_parser("list", help="tenants, roles, quotas and key counts (never the keys)")
    for q in (cr, ls):
        q.add_argument("--file", default=None, help="keys file (default $LMSTACK_API_KEYS_FILE or "
                                                    "<data-dir>/api-keys.yaml)")


def _quotas(items: list[str] | None) -> dict | None:
    if items is None:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--quota {item!r}: expected NAME=N with N a non-negative integer")
        out[name.strip()] = int(value)
    return out


def run(args) -> int:
    from services.tenants import append_key, load_keys_file

    path = args.file or default_file()
    try:
        if args.action == "create":
            key = append_key(path, args.tenant, args.role, _quotas(args.quota))
            print(key)
            print(f"lmstack keys: key for tenant {args.tenant!r} added to {path} (only its sha256 is stored; "
                  "this is the only time the key is shown). Restart the services to accept it.", file=sys.stderr)
            return 0
        if not Path(path).exists():
            print(f"lmstack keys list: {path} does not exist; create a key first", file=sys.stderr)
            return 1
        counts: dict = {}
        for tenant in load_keys_file(path).values():
            counts.setdefault(tenant, 0)
            counts[tenant] += 1
        for tenant, n in sorted(counts.items(), key=lambda kv: kv[0].name):
            quotas = ", ".join(f"{k}={v}" for k, v in tenant.quotas.as_dict().items()) or "no quotas"
            print(f"{tenant.name:<20} {tenant.role:<7} {n} key(s)  {quotas}")
        return 0
    except ValueError as e:
        print(f"lmstack keys {args.action}: {e}", file=sys.stderr)
        return 1
