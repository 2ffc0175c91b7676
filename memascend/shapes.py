"""Parameter shapes of a model, computed from its Hugging Face ``config.json`` alone.

Sizing swap buffers, estimating a footprint or replaying an allocation trace needs only the
list of parameter tensors (name and shape, in module order), not the weights and not
transformers. This module reads a ``config.json``-style dict (from a file, or a preset under
``configs/models/`` named by its file stem) and derives that list for ``LlamaForCausalLM``,
with the shapes ``transformers`` gives its ``nn.Linear`` weights: ``(out_features,
in_features)``. Other architectures can add their own ``*_parameter_shapes`` next to it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Where the model presets live: ``memascend/presets/<name>.json``, package data (installed
#: with the package; ``configs/models`` in the source tree links here).
PRESET_DIR = Path(__file__).resolve().parent / "presets"

_LLAMA_INT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "vocab_size")


def available_presets() -> list[str]:
    """Names of the model presets (file stems under ``configs/models/``), sorted."""
    if not PRESET_DIR.is_dir():
        return []
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_model_config(path_or_preset: str | Path) -> dict[str, Any]:
    """Load a model config: a path to a ``config.json``-style file, or a preset name.

    Parameters
    ----------
    path_or_preset:
        A path (anything ending in ``.json`` or containing a path separator, or an existing
        file), or the name of a preset, i.e. the stem of a file under ``configs/models/``
        (e.g. ``"llama2-7b"``).

    Returns
    -------
    dict
        The parsed JSON object.

    Raises
    ------
    ConfigError
        The file or preset does not exist, cannot be read, is not valid JSON or is not a JSON
        object. The error's ``key`` is the path or preset name; a missing preset's message lists
        the available presets.
    """
    text = str(path_or_preset)
    as_path = Path(text)
    is_path = (isinstance(path_or_preset, Path) or text.endswith(".json") or "/" in text
               or as_path.is_file())
    if is_path:
        file, key = as_path, text
        if not file.is_file():
            raise ConfigError(key, f"model config file {text!r} does not exist")
    else:
        file, key = PRESET_DIR / f"{text}.json", text
        if not file.is_file():
            names = ", ".join(available_presets()) or f"none found in {PRESET_DIR}"
            raise ConfigError(key, f"unknown model preset {text!r}; available presets: {names}")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(key, f"cannot read model config {str(file)!r}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(key, f"model config {str(file)!r} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(key, f"model config {str(file)!r} must hold a JSON object, "
                               f"got {type(cfg).__name__}")
    return cfg


def _positive_int(cfg: dict[str, Any], key: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(key, "missing from the model config")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, f"must be a positive integer, got {value!r}")
    return value


def llama_parameter_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter tensor of a ``LlamaForCausalLM``, in module (``named_parameters``) order.

    The order is ``model.embed_tokens``; per layer ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` (each followed by its bias when
    ``attention_bias`` / ``mlp_bias`` is set), ``input_layernorm``,
    ``post_attention_layernorm``; ``model.norm``; ``lm_head`` unless the embeddings are tied.
    Linear weights are ``(out_features, in_features)``; ``k_proj`` / ``v_proj`` have
    ``num_key_value_heads × head_dim`` outputs (grouped-query attention).

    Parameters
    ----------
    cfg:
        A config dict as returned by :func:`load_model_config`. ``head_dim`` defaults to
        ``hidden_size // num_attention_heads``; ``num_key_value_heads`` to
        ``num_attention_heads``.

    Returns
    -------
    list of (name, shape)
        Parameter names as ``transformers`` spells them, with their shapes.

    Raises
    ------
    ConfigError
        A required key is missing or not a positive integer, ``model_type`` is not ``"llama"``,
        or the head counts do not divide evenly.
    """
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError("model_type", f"only 'llama' shapes are known, got {model_type!r}")
    h, inter, layers, heads, vocab = (_positive_int(cfg, k) for k in _LLAMA_INT_KEYS)
    kv = _positive_int(cfg, "num_key_value_heads", heads)
    if heads % kv:
        raise ConfigError("num_key_value_heads",
                          f"{kv} does not divide num_attention_heads={heads}")
    if cfg.get("head_dim") is None and h % heads:
        raise ConfigError("num_attention_heads", f"{heads} does not divide hidden_size={h}")
    head_dim = _positive_int(cfg, "head_dim", h // heads)
    attn_bias, mlp_bias = bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias"))

    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]

    def linear(name: str, out_f: int, in_f: int, bias: bool) -> None:
        shapes.append((f"{name}.weight", (out_f, in_f)))
        if bias:
            shapes.append((f"{name}.bias", (out_f,)))

    for i in range(layers):
        p = f"model.layers.{i}"
        linear(f"{p}.self_attn.q_proj", heads * head_dim, h, attn_bias)
        linear(f"{p}.self_attn.k_proj", kv * head_dim, h, attn_bias)
        linear(f"{p}.self_attn.v_proj", kv * head_dim, h, attn_bias)
        linear(f"{p}.self_attn.o_proj", h, heads * head_dim, attn_bias)
        linear(f"{p}.mlp.gate_proj", inter, h, mlp_bias)
        linear(f"{p}.mlp.up_proj", inter, h, mlp_bias)
        linear(f"{p}.mlp.down_proj", h, inter, mlp_bias)
        shapes.append((f"{p}.input_layernorm.weight", (h,)))
        shapes.append((f"{p}.post_attention_layernorm.weight", (h,)))
    shapes.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, h)))
    return shapes


def parameter_count(cfg: dict[str, Any]) -> int:
    """Total number of parameter elements of the model described by ``cfg``.

    Parameters
    ----------
    cfg:
        A config dict (see :func:`llama_parameter_shapes`).

    Returns
    -------
    int
        The sum of the numels of all parameter tensors (tied weights counted once).

    Raises
    ------
    ConfigError
        As :func:`llama_parameter_shapes`.
    """
    return sum(math.prod(shape) for _name, shape in llama_parameter_shapes(cfg))
