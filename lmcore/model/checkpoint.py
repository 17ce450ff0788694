"""Hugging Face GPT-2 checkpoints in and out, as state dicts: ``read_checkpoint`` and ``write_checkpoint``.

This module knows files and tensor names, not the model class: :func:`lmcore.model.gpt.load_model`
and :func:`~lmcore.model.gpt.save_pretrained` build a ``GPT`` from what it reads (so the import
runs one way, gpt -> checkpoint).

A model directory holds ``config.json`` (GPT2Config field names) and either ``model.safetensors``
or ``pytorch_model.bin``, plus the tokenizer's files when it has one (``tokenizer.json`` or
``vocab.json`` + ``merges.txt``). Three quirks of the Hugging Face layout are handled here:

* OpenAI wrote GPT-2 with a ``Conv1D`` module whose weight is stored ``(in, out)``, the transpose
  of ``nn.Linear``'s ``(out, in)``: the four projection matrices per block are transposed on the
  way in and out (``_CONV1D`` below).
* Keys may carry a ``transformer.`` prefix (``GPT2LMHeadModel``) or not (``GPT2Model``, and the
  original ``gpt2`` upload); ``lm_head.weight`` is usually absent because it is tied to ``wte``.
* Older files carry the causal mask as buffers (``attn.bias``, ``attn.masked_bias``): not weights,
  skipped.

Every tensor is checked by name and shape before anything is copied, so a bad file fails with a
message naming the file and the tensor, never with a bare ``KeyError`` or a half-loaded model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lmcore._io import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, atomic_path, atomic_write

from .config import GPTConfig

# Conv1D weights (stored (in, out)) that become nn.Linear weights (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-persistent mask buffers some transformers versions saved.
_MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


def _expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face names and shapes (Conv1D layout) of every tensor a GPT-2 checkpoint holds."""
    C, V = config.n_embd, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (V, C),
        "wpe.weight": (config.block_size, C),
        "ln_f.weight": (C,),
        "ln_f.bias": (C,),
    }
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (C,),
            p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C),
            p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C),
            p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,),
            p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C),
            p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C),
            p + "mlp.c_proj.bias": (C,),
        }
    return shapes


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (EOFError, RuntimeError, UnpicklingError)
        raise ValueError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return obj


def _find_weights(path: Path) -> Path:
    for name in (SAFETENSORS_FILE, BIN_FILE):
        if (path / name).is_file():
            return path / name
    raise ValueError(f"{path}: no weights found (expected {SAFETENSORS_FILE} or {BIN_FILE})")


def hf_to_lmcore_state_dict(
    tensors: dict[str, torch.Tensor], config: GPTConfig, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map Hugging Face GPT-2 tensors to lmcore's names (and Linear layout), checking every shape."""
    # Strip the GPT2LMHeadModel prefix; drop mask buffers and the tied head.
    stripped: dict[str, torch.Tensor] = {}
    head = None
    for key, t in tensors.items():
        if key == "lm_head.weight":
            head = t
            continue
        name = key.removeprefix("transformer.")
        if _MASK_BUFFER.search(name):
            continue
        stripped[name] = t
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(stripped))
    unexpected = sorted(set(stripped) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ValueError(
            f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"(is config.json's n_layer={config.n_layer} right?)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        t = stripped[name]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shape}"
            )
        if name.endswith(_CONV1D):
            t = t.t()
        out["transformer." + name] = t
    if head is not None and tuple(head.shape) != expected["wte.weight"]:
        raise ValueError(f"{source}: tensor 'lm_head.weight' has shape {tuple(head.shape)}, expected "
                         f"{expected['wte.weight']}")
    if head is not None and not torch.equal(head, stripped["wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight; lmcore ties them (GPT-2 does)")
    if not config.bias:
        # lmcore's bias-free variant is saved with zero biases so transformers can load it.
        for name in [k for k in out if k.endswith(".bias")]:
            if torch.count_nonzero(out[name]):
                raise ValueError(f"{source}: config says bias=false but {name!r} is not zero")
            del out[name]
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def lmcore_to_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """lmcore's state dict in Hugging Face's GPT-2 layout (Conv1D transposes, zero biases if bias=False)."""
    dtype = state["transformer.wte.weight"].dtype
    out: dict[str, torch.Tensor] = {}
    for name, shape in _expected_shapes(config).items():
        key = "transformer." + name
        if key in state:
            t = state[key]
            if name.endswith(_CONV1D):
                t = t.t()
        else:  # a bias of a bias=False model
            t = torch.zeros(shape, dtype=dtype)
        out[key] = t.detach().to("cpu").contiguous()
    return out


def read_checkpoint(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A checkpoint directory's config and its tensors under lmcore's names, every shape checked."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: model directory not found")
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path}: missing {CONFIG_FILE}")
    config = GPTConfig.from_json_file(path / CONFIG_FILE)
    weights = _find_weights(path)
    return config, hf_to_lmcore_state_dict(_read_tensors(weights), config, source=str(weights))


def write_checkpoint(path: str | Path, config: GPTConfig, state: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads.

    Each file is written atomically (:func:`lmcore._io.atomic_path`), so a crash never leaves a
    half-written file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(state["transformer.wte.weight"].dtype).removeprefix("torch.")
    with atomic_path(path / SAFETENSORS_FILE) as tmp:
        save_file(lmcore_to_hf_state_dict(state, config), str(tmp), metadata={"format": "pt"})
    atomic_write(path / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")
