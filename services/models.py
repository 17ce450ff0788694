"""The model registry: which models a server serves, by name, loaded once.

Models come from two places:

* **Configured** directories (``--models name=path,...``; a plain path is named after its directory
  or file stem). The first is the default unless ``--default-model`` names another.
* The **model store** (``--model-store``), where fine-tuning jobs publish their results as
  subdirectories named like ``ft:<base>:<suffix>:<id>``: either a full model directory
  (``config.json`` + weights + tokenizer) or a LoRA adapter directory (``adapter_config.json`` whose
  ``base_model`` names a served model or a path). Adapters are loaded through
  ``lmcore.lora.load_adapter_model`` when that module exists; the adapter shares the base's weights.

``refresh()`` rescans the store and loads entries it has not seen; the services call it on every
ListModels and whenever a request names an unknown model, so a freshly published fine-tune is
served on the next request without a restart. Rescans are rate-limited (at most one per
``refresh_interval_s`` unless the store directory changed, e.g. by a publish's rename; an unknown
name asked for again meanwhile is NOT_FOUND at once, a negative cache) and the directory scan runs in a worker thread, so a stream
of requests for unknown names costs the event loop nothing. Names are checked first
(``services.limits.check_name``): an over-long or path-like name is INVALID_ARGUMENT. Entries that fail to load are logged and retried
only when their directory changes. Loading runs in a worker thread, never on the event loop.
A registry built with ``autoload_store=False`` (a Ray Serve replica that multiplexes fine-tunes)
loads store entries only when asked (``load_store_entry``) and drops them when told (``unload``):
the replica's LRU of models decides what it holds, not the store's contents.
A store entry whose directory is gone is closed (``close_entry``: the inference service unloads
an adapter from its base's bank, or stops a model's engine) and forgotten; a close hook that
answers "busy" (requests still use it) keeps it served until a later refresh finds it idle.

**Lifecycle.** With ``max_loaded_store_models`` N (the inference service's ``--max-loaded-models``),
store full models are not loaded by a scan: each loads on its first request, and when N are
loaded the least recently used idle one is unloaded first (its engine stopped, its memory freed);
if all N are busy the request is RESOURCE_EXHAUSTED. Adapters are banked in their base's engine and
do not count. ``delete(spec)`` (DeleteModel) renames the directory away, unloads, removes it.
Store entries carry their ``owner`` (the tenant in ``finetune.json``); ``get(name, tenant)`` and
``names(tenant)`` answer only with what that tenant may use.

The registry is generic over what it loads: the inference service loads models with engines
(``services.inference.handler.load_served_model``), the tokenizer service only tokenizers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcore._io import ADAPTER_CONFIG_FILE, CONFIG_FILE

from .errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from .limits import check_name

log = logging.getLogger("lmstack.models")



@dataclass
class ModelSpec:
    """Where a served model comes from."""

    name: str
    path: Path
    source: str = "config"  # "config" or "store"
    base_model: str = ""  # for LoRA adapters: the base model's name (or path) from adapter_config.json
    owner: str = ""  # the tenant a store model belongs to (its finetune.json); "" = everyone's

    @property
    def is_adapter(self) -> bool:
        return (self.path / ADAPTER_CONFIG_FILE).is_file()


def parse_model_specs(items: list[str]) -> list[ModelSpec]:
    """``["small=/models/small", "/models/tiny"]`` -> specs named ``small`` and ``tiny``."""
    specs: list[ModelSpec] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path = name
            p = Path(path)
            name = p.stem if p.is_file() else p.name
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"bad model spec {item!r}: expected name=path or a path")
        if any(s.name == name for s in specs):
            raise ValueError(f"model name {name!r} given twice in --models")
        specs.append(ModelSpec(name, Path(path).expanduser()))
    return specs


def read_adapter_base(path: Path) -> str:
    """The base model an adapter directory names (``base_model``, or PEFT's ``base_model_name_or_path``).

    Lenient on purpose: the registry only needs the base's name to route the entry; the full check
    (rank, alpha, targets) is lmcore's ``read_adapter_config`` when the adapter is loaded."""
    f = path / ADAPTER_CONFIG_FILE
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: unreadable ({e})") from None
    base = meta.get("base_model") or meta.get("base_model_name_or_path") or ""
    if not base:
        raise ValueError(f"{f}: no base_model field")
    return str(base)


OWNER_FILE = "finetune.json"  # written by the fine-tuning worker beside the weights; names the tenant


def read_owner(path: Path) -> str:
    """The tenant that owns a store model directory ("" for none: a model copied in by hand)."""
    try:
        return str(json.loads((path / OWNER_FILE).read_text()).get("tenant", ""))
    except (OSError, json.JSONDecodeError, AttributeError):
        return ""


def owned_store_models(store: str | Path, tenant: str) -> int:
    """How many complete models in ``store`` belong to ``tenant`` (the published_models quota)."""
    root = Path(store).expanduser() if store else None
    if root is None or not root.is_dir():
        return 0
    return sum(1 for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _holds_model(d)
               and read_owner(d) == tenant)


@dataclass
class Entry:
    """A loaded model: ``obj`` is whatever the loader returned (a ServedModel, a Tokenizer, ...)."""

    spec: ModelSpec
    obj: Any
    is_default: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


# loader(spec, registry) -> obj. Runs in a worker thread. For adapters, registry.lookup(base) finds the base.
Loader = Callable[[ModelSpec, "ModelRegistry"], Any]


class ModelRegistry:
    """Name -> loaded model, with a default, a model store and ``refresh()``.

    ``start_entry(entry)`` and ``close_entry(entry, idle_only=False) -> bool`` are optional
    coroutines run on the event loop: after a load (start an engine's background task), and at
    ``close()`` or when a store entry's directory is gone. For a gone entry ``idle_only`` is True
    and a False answer means "busy, not closed": the entry stays until a later refresh.
    """

    def __init__(self, specs: list[ModelSpec], loader: Loader, default: str = "", store: str | Path = "",
                 start_entry=None, close_entry=None, refresh_interval_s: float = 2.0,
                 autoload_store: bool = True, max_loaded_store_models: int = 0):
        if not specs and not store:
            raise ValueError("no models configured: pass --models name=path (or LMSTACK_MODELS) "
                             "and/or --model-store")
        if default and specs and default not in {s.name for s in specs}:
            raise ValueError(f"--default-model {default!r} is not one of the configured models "
                             f"{[s.name for s in specs]}")
        self.specs = specs
        self.loader = loader
        self.default = default or (specs[0].name if specs else "")
        self.store = Path(store).expanduser() if store else None
        self.start_entry = start_entry
        self.close_entry = close_entry
        self.autoload_store = autoload_store
        self._entries: dict[str, Entry] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # store entry name -> (mtime, why) of its last failure
        self._lock = asyncio.Lock()
        self.loaded = False
        self.refresh_interval_s = refresh_interval_s
        self._last_scan = -float("inf")  # time.monotonic() of the last store scan
        self._last_store_mtime = None  # the store directory's mtime then
        # Lifecycle: with a limit, store full models load on first use and the least recently used
        # idle one is unloaded to make room (adapters live in their base's bank: not counted).
        self.max_loaded_store_models = max_loaded_store_models
        self._unloaded: dict[str, ModelSpec] = {}  # store full models found but not loaded

    # --- lookups --------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Loaded entries, the default first, then configured order, then store entries by name."""
        return sorted(self._entries.values(), key=lambda e: (not e.is_default, e.spec.source != "config",
                                                            e.spec.source != "config" and e.name))

    def names(self, tenant=None) -> list[str]:
        """Names of the models ``tenant`` (a ``services.tenants.Tenant``; None: all) may use."""
        return [e.name for e in self.entries() if tenant is None or tenant.owns(e.spec.owner)] + \
            [s.name for s in self.unloaded(tenant)]

    def lookup(self, name: str) -> Entry | None:
        """The loaded entry for ``name`` (empty: the default), or None. Never blocks."""
        entry = self._entries.get(name or self.default)
        if entry is not None:
            entry.extra["used"] = time.monotonic()  # the LRU order
        return entry

    def unloaded(self, tenant=None) -> list[ModelSpec]:
        """Store full models known but not loaded (they load on first use), that ``tenant`` may use."""
        return [s for n, s in sorted(self._unloaded.items()) if tenant is None or tenant.owns(s.owner)]

    async def get(self, name: str, tenant=None) -> Entry:
        """The entry for ``name``; an unknown name triggers a store rescan before ``NotFound``. With a
        ``tenant``, another tenant's model is ``NOT_FOUND`` too, and messages list only its own."""
        entry = self._entries.get(name or self.default)
        if entry is not None and (tenant is None or tenant.owns(entry.spec.owner)):
            return entry
        if entry is not None:
            raise NotFound(f"model {name!r} not found; served models: {self.names(tenant)}")
        check_name(name)
        if not self.loaded:
            raise Unavailable("models are still loading; retry shortly (health turns SERVING when ready)")
        if not name and not self.default:
            raise NotFound("no default model: this server serves only the model store; name a model "
                           f"(served: {self.names()})")
        await self.refresh(max_age_s=self.refresh_interval_s)
        entry = self._entries.get(name or self.default)
        if entry is None and name in self._unloaded and (tenant is None or tenant.owns(self._unloaded[name].owner)):
            entry = await self._load_on_demand(self._unloaded[name])
        if entry is None:
            if name in self._failed and (tenant is None or tenant.owns(read_owner(self.store / name))):
                raise NotFound(f"model {name!r} is in the model store but could not be loaded "
                               f"({self._failed[name][1]}); served models: {self.names(tenant)}")
            raise NotFound(f"model {name!r} not found; served models: {self.names(tenant)}")
        if tenant is not None and not tenant.owns(entry.spec.owner):
            raise NotFound(f"model {name!r} not found; served models: {self.names(tenant)}")
        return entry

    # --- loading --------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every configured model (failures are fatal: a misconfigured server must not start),
        then whatever the store holds (failures there are logged and skipped)."""
        async with self._lock:
            for spec in self.specs:
                await self._load(spec)
        self.loaded = True
        await self.refresh()

    async def _load(self, spec: ModelSpec) -> Entry:
        log.info("loading model %r from %s", spec.name, spec.path)
        obj = await asyncio.to_thread(self.loader, spec, self)
        entry = Entry(spec, obj, is_default=spec.name == self.default)
        if self.start_entry is not None:
            await self.start_entry(entry)
        self._entries[spec.name] = entry
        return entry

    def scan_store(self) -> list[ModelSpec]:
        """Store subdirectories that hold a complete model or adapter and are not yet loaded."""
        if self.store is None or not self.store.is_dir():
            return []
        found = []
        for d in sorted(self.store.iterdir()):
            if not d.is_dir() or d.name.startswith(".") or d.name.endswith((".tmp", ".partial")):
                continue
            if d.name in self._entries:
                continue
            if not _holds_model(d):
                continue  # still being written, or not a model
            found.append(ModelSpec(d.name, d, source="store", owner=read_owner(d)))
        return found

    async def refresh(self, max_age_s: float = 0.0) -> list[str]:
        """Close store entries whose directory is gone, then load those that appeared since the
        last scan; returns the names newly loaded. With ``max_age_s``, a scan younger than that
        is taken as fresh (nothing is rescanned)."""
        if self.store is None or not self.loaded:
            return []
        new: list[str] = []
        async with self._lock:
            # A burst of unknown names waits for one scan, then answers from it; a publish (a rename
            # into the store) changes the store's mtime, so it is seen at once all the same.
            store_mtime = _dir_mtime(self.store)
            if time.monotonic() - self._last_scan < max_age_s and store_mtime == self._last_store_mtime:
                return []
            self._last_scan, self._last_store_mtime = time.monotonic(), store_mtime
            await self._close_removed()
            if not self.autoload_store:
                return new
            # Full models first: an adapter may name a full model published in the same scan.
            scanned = await asyncio.to_thread(self._scan_with_mtimes)
            if self.max_loaded_store_models:  # full models wait for their first request
                self._unloaded = {s.name: s for s, m, adapter in scanned if not adapter
                                  and not (s.name in self._failed and self._failed[s.name][0] == m)}
                scanned = [x for x in scanned if x[2]]
            for spec, mtime, is_adapter in scanned:
                if spec.name in self._failed and self._failed[spec.name][0] == mtime:
                    continue
                try:
                    if is_adapter:
                        spec.base_model = read_adapter_base(spec.path)
                    await self._load(spec)
                    self._failed.pop(spec.name, None)
                    new.append(spec.name)
                except Exception as e:  # a bad store entry must not take the server down
                    self._failed[spec.name] = (mtime, str(e)[:300])
                    log.warning("model store entry %s not served: %s", spec.path, e)
        return new

    def _scan_with_mtimes(self) -> list[tuple[ModelSpec, float, bool]]:
        """The scan and what the refresh needs of each entry, all file system work (in a thread)."""
        specs = sorted(self.scan_store(), key=lambda s: s.is_adapter)
        return [(spec, _mtime(spec.path), spec.is_adapter) for spec in specs]

    async def load_store_entry(self, name: str) -> Entry:
        """Load the store entry ``name`` alone (loaded already: its entry). ``NotFound`` when the store
        has no such model or it cannot be loaded, with the reason."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        path = self.check_store_model(name)
        async with self._lock:
            if name in self._entries:
                return self._entries[name]
            spec = ModelSpec(name, path, source="store", owner=read_owner(path))
            try:
                if spec.is_adapter:
                    spec.base_model = read_adapter_base(path)
                return await self._load(spec)
            except Exception as e:
                log.warning("model store entry %s not served: %s", path, e)
                raise NotFound(f"model {name!r} is in the model store but could not be loaded ({str(e)[:300]})"
                               ) from None

    def check_store_model(self, name: str, tenant=None) -> Path:
        """The store directory of the model ``name``, which ``tenant`` (None: anyone) may use; else
        ``NotFound``, with the same message for another tenant's model as for a missing one (existence
        is not leaked). For a registry that loads store entries only when asked (``autoload_store=False``)."""
        check_name(name)
        if not self.loaded:
            raise Unavailable("models are still loading; retry shortly (health turns SERVING when ready)")
        path = self.store / name if self.store is not None and name and "/" not in name else None
        if path is None or name.startswith(".") or not _holds_model(path) or \
                (tenant is not None and not tenant.owns(read_owner(path))):
            raise NotFound(f"model {name!r} not found; served models: {[s.name for s in self.specs]}"
                           + (f", or a fine-tune in the model store {self.store}" if self.store else ""))
        return path

    async def unload(self, name: str) -> bool:
        """Close and forget the store entry ``name``; False (still served) while the close hook finds
        it busy or another entry is banked on it."""
        async with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return True
            if entry.spec.source != "store" or any(e.spec.base_model == name for e in self._entries.values()):
                return False
            del self._entries[name]  # no new lookup finds it while it closes
            if self.close_entry is not None and not await self.close_entry(entry, idle_only=True):
                self._entries[name] = entry
                return False
            log.info("model %r unloaded", name)
            return True

    async def _close_removed(self) -> list[str]:
        """Close and forget store entries whose directory no longer holds a model; returns their
        names. An entry another one names as its base (an adapter in its bank) waits for it, and
        an entry the close hook finds busy stays served until a later refresh."""
        for name in [n for n in self._failed if not _holds_model(self.store / n)]:
            del self._failed[name]  # a failed entry that is gone: nothing to report any more
        stored = [e for e in self._entries.values() if e.spec.source == "store"]
        held = await asyncio.to_thread(lambda: [_holds_model(e.spec.path) for e in stored])
        gone = [e for e, ok in zip(stored, held) if not ok]
        closed: list[str] = []
        progress = True
        while gone and progress:  # adapters first: their base may be gone too
            progress = False
            for entry in list(gone):
                if any(e.spec.base_model == entry.name for e in self._entries.values() if e is not entry):
                    continue
                gone.remove(entry)
                del self._entries[entry.name]  # no new lookup finds it while it closes
                if self.close_entry is not None and not await self.close_entry(entry, idle_only=True):
                    self._entries[entry.name] = entry  # busy: retried at the next refresh
                    continue
                log.info("model store entry %s is gone: %r no longer served", entry.spec.path, entry.name)
                closed.append(entry.name)
                progress = True
        return closed

    async def _load_on_demand(self, spec: ModelSpec) -> Entry:
        """Load a store full model, first unloading least recently used idle ones past the limit."""
        async with self._lock:
            if spec.name in self._entries:
                return self._entries[spec.name]
            loaded = sorted((e for e in self._entries.values() if e.spec.source == "store" and not e.spec.is_adapter
                             and not any(o.spec.base_model == e.name for o in self._entries.values())),
                            key=lambda e: e.extra.get("used", 0.0))
            while len(loaded) >= self.max_loaded_store_models:
                victim = None
                for e in loaded:
                    del self._entries[e.name]
                    if self.close_entry is None or await self.close_entry(e, idle_only=True):
                        victim = e
                        break
                    self._entries[e.name] = e  # busy: try the next least recently used
                if victim is None:
                    raise ResourceExhausted(
                        f"all {self.max_loaded_store_models} slots for fine-tuned models (--max-loaded-models) "
                        "are serving requests; retry shortly")
                loaded.remove(victim)
                self._unloaded[victim.name] = victim.spec
                log.info("unloaded %r (least recently used; at most %d store models loaded)", victim.name,
                         self.max_loaded_store_models)
            try:
                entry = await self._load(spec)
            except Exception as e:
                self._failed[spec.name] = (_mtime(spec.path), str(e)[:300])
                self._unloaded.pop(spec.name, None)
                log.warning("model store entry %s not served: %s", spec.path, e)
                return None
            self._unloaded.pop(spec.name, None)
            entry.extra["used"] = time.monotonic()
            return entry

    def store_spec(self, name: str, tenant=None) -> ModelSpec:
        """The store entry ``name`` if ``tenant`` may delete it: NOT_FOUND for unknown and others'
        models, FAILED_PRECONDITION for a configured one."""
        check_name(name)
        if any(s.name == name for s in self.specs):
            raise FailedPrecondition(f"model {name!r} is configured (--models), not a fine-tuned model in the store; "
                                     "only store models can be deleted")
        path = self.store / name if self.store is not None and name else None
        if path is None or name.startswith(".") or not _holds_model(path) or \
                (tenant is not None and not tenant.owns(read_owner(path))):
            raise NotFound(f"model {name!r} not found; served models: {self.names(tenant)}")
        entry = self._entries.get(name)
        return entry.spec if entry is not None else ModelSpec(name, path, source="store", owner=read_owner(path))

    async def delete(self, spec: ModelSpec) -> bool:
        """Take a store model out of the store and unload it (once no request uses it); True when it
        was loaded and is now unloaded. The directory is renamed away first (no scan sees half a
        deletion, no new request loads it), then removed."""
        import secrets
        import shutil

        trash = spec.path.with_name(f".deleted-{secrets.token_hex(4)}")
        await asyncio.to_thread(spec.path.rename, trash)
        was_loaded = spec.name in self._entries
        async with self._lock:
            self._unloaded.pop(spec.name, None)
            self._failed.pop(spec.name, None)
            await self._close_removed()
        await asyncio.to_thread(shutil.rmtree, trash, True)
        return was_loaded and spec.name not in self._entries

    async def close(self) -> None:
        for entry in list(self._entries.values()):
            if self.close_entry is not None:
                await self.close_entry(entry)
        self._entries.clear()


def _holds_model(path: Path) -> bool:
    """A complete model or adapter directory (its config file is written last)."""
    return (path / CONFIG_FILE).is_file() or (path / ADAPTER_CONFIG_FILE).is_file()


def _dir_mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _mtime(path: Path) -> float:
    try:
        return max([path.stat().st_mtime, *(f.stat().st_mtime for f in path.iterdir())])
    except OSError:
        return 0.0


def resolve_base(spec: ModelSpec, registry: ModelRegistry):
    """For an adapter spec: the loaded base entry if ``base_model`` names one (by name or path), else None."""
    base = spec.base_model
    entry = registry.lookup(base) if base else None
    if entry is not None:
        return entry
    for e in registry.entries():
        try:
            if Path(base).expanduser().resolve() == e.spec.path.resolve():
                return e
        except OSError:
            continue
    return None
