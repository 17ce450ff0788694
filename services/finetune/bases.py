"""Base models by name: the configured ``--models`` plus full fine-tunes already in the model store.

The API server needs only a base's tokenizer and context length (to validate datasets), the worker
its weights; neither keeps models it does not need. An adapter in the store cannot be a base
(fine-tune its base instead, or merge it first).
"""

from __future__ import annotations

import threading
from pathlib import Path

from lmcore._io import CONFIG_FILE
from lmcore.lora import is_adapter_dir
from lmcore.model import GPTConfig
from services.errors import InvalidArgument, NotFound
from services.limits import check_name
from services.models import parse_model_specs


class BaseModels:
    def __init__(self, models: list[str], store: str | Path = "", default: str = ""):
        self.specs = {s.name: s.path for s in parse_model_specs(models)}
        self.store = Path(store) if store else None
        self.default = default or next(iter(self.specs), "")
        self._info: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        names = list(self.specs)
        if self.store is not None and self.store.is_dir():
            names += sorted(d.name for d in self.store.iterdir()
                            if d.name.startswith("ft:") and (d / CONFIG_FILE).is_file())
        return names

    def path(self, name: str) -> Path:
        """The directory of base model ``name`` (empty: the default); NotFound lists the choices."""
        name = check_name(name or self.default, "base model")
        if not name:
            raise InvalidArgument("no base model given and the server has no default model")
        if name in self.specs:
            return self.specs[name]
        if self.store is not None and "/" not in name and name not in (".", ".."):
            candidate = self.store / name
            if candidate.is_dir():
                if is_adapter_dir(candidate):
                    raise InvalidArgument(f"{name!r} is a LoRA adapter; fine-tune its base model instead")
                if (candidate / CONFIG_FILE).is_file():
                    return candidate
        raise NotFound(f"base model {name!r} not found; available: {self.names()}")

    def info(self, name: str):
        """``(tokenizer, block_size)`` of a base, cached (tokenizer + config only, no weights)."""
        from lmcore.tokenizer import Tokenizer

        name = name or self.default
        path = self.path(name)
        with self._lock:
            if name not in self._info:
                config = GPTConfig.from_json_file(path / CONFIG_FILE)
                try:
                    tokenizer = Tokenizer.from_file(path)
                except ValueError as e:
                    raise InvalidArgument(f"base model {name!r} has no usable tokenizer: {e}") from None
                self._info[name] = (tokenizer, config.block_size)
            return self._info[name]
