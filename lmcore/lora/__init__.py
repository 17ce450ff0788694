"""The LoRA layer: adapters trained and saved one at a time (``adapter``), and the bank that serves
many of them in one batch (``bank``). Imports the model layer only."""

from .adapter import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    is_adapter_dir,
    load_adapter_model,
    merge_lora,
    read_adapter_config,
    save_adapter,
)
from .bank import LoRABank

__all__ = ["LoRABank", "LoRAConfig", "LoRALinear", "apply_lora", "is_adapter_dir", "load_adapter_model", "merge_lora",
           "read_adapter_config", "save_adapter"]
