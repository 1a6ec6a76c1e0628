"""Model facts: parameters per named array, per part and in total, counts of layer types, a config summary.

    from blipkit.tasks import model_facts, format_facts
    facts = model_facts(model)       # a JSON-ready dict
    print(format_facts(facts))
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from ..base import BlipBase


def _plain(x: Any) -> Any:
    """Config values made JSON-ready (dataclasses to dicts, tuples to lists)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def _tower(cfg: Any) -> dict[str, Any]:
    """The headline numbers of a tower config (whichever of them it has)."""
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
            "vocab_size", "max_position_embeddings", "cross_attention_frequency")
    out = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    if "image_size" in out and "patch_size" in out:
        out["grid"] = out["image_size"] // out["patch_size"]
    return out


def config_summary(model: BlipBase) -> dict[str, Any]:
    """Family, architecture, parts and the headline numbers of each tower config."""
    cfg = model.config
    out: dict[str, Any] = {"family": model.family, "class": type(model).__name__}
    for key in ("architecture", "parts", "image_text_hidden_size", "num_query_tokens"):
        if hasattr(cfg, key):
            out[key] = _plain(getattr(cfg, key))
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else []:
        value = getattr(cfg, f.name)
        if f.name.endswith("_config") and value is not None:
            out[f.name.removesuffix("_config")] = _tower(value)
    if model.processor is not None and hasattr(model.processor, "size"):
        out["input_size"] = list(model.processor.size)
    return out


def model_facts(model: BlipBase) -> dict[str, Any]:
    """Parameter counts (per named array, per top-level part, total), layer-type counts and the configuration.

    Tied arrays (the decoder's output projection shares the word embeddings) are counted once, under their first
    name; `tied` lists the other names.
    """
    arrays, seen, tied = [], {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.append({"name": name, "same_as": seen[id(p)]})
            continue
        seen[id(p)] = name
        dtype = str(p.dtype).removeprefix("torch.")
        arrays.append({"name": name, "shape": list(p.shape), "count": p.numel(), "dtype": dtype,
                       "trainable": p.requires_grad})
    parts: Counter[str] = Counter()
    for a in arrays:
        parts[a["name"].split(".")[0]] += a["count"]
    layer_types = Counter(type(m).__name__ for m in model.modules() if m is not model)
    leaf_types = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
    total = sum(a["count"] for a in arrays)
    size = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {
        "model": model.name_or_path,
        "total_parameters": total,
        "trainable_parameters": sum(a["count"] for a in arrays if a["trainable"]),
        "bytes": size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "parts": dict(parts),
        "layer_types": dict(sorted(layer_types.items())),
        "leaf_layer_types": dict(sorted(leaf_types.items())),
        "config": config_summary(model),
        "full_config": _plain(model.config),
        "arrays": arrays,
        "tied": tied,
    }


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_facts(facts: dict[str, Any], arrays: bool = False) -> str:
    """A readable report of `model_facts` (every named array too when `arrays`)."""
    cfg = facts["config"]
    lines = [
        f"model      {facts['model']}",
        f"family     {cfg.get('family')} ({cfg.get('class')}, {cfg.get('architecture', '-')})",
        f"parameters {facts['total_parameters']:,} ({human(facts['total_parameters'])}), "
        f"{human(facts['bytes'])}B in {facts['dtype']} on {facts['device']}",
    ]
    if "parts" in cfg:
        lines.append(f"heads      {', '.join(cfg['parts'])}")
    if "input_size" in cfg:
        lines.append(f"input      {cfg['input_size'][0]}x{cfg['input_size'][1]} pixels")
    for key, value in cfg.items():
        if isinstance(value, dict):
            lines.append(f"{key + ' ':<11}" + ", ".join(f"{k}={v}" for k, v in value.items()))
    width = max(len(k) for k in facts["parts"])
    lines.append("")
    lines.append("parameters per part")
    for part, count in sorted(facts["parts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {part:<{width}}  {count:>13,}  {100 * count / max(1, facts['total_parameters']):5.1f}%")
    lines.append("")
    lines.append("layers (leaf modules)")
    for name, count in sorted(facts["leaf_layer_types"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<{width}}  {count:>6}")
    if arrays:
        lines.append("")
        lines.append("named arrays")
        w = max(len(a["name"]) for a in facts["arrays"])
        for a in facts["arrays"]:
            lines.append(f"  {a['name']:<{w}}  {str(tuple(a['shape'])):<18} {a['count']:>12,}")
        for t in facts["tied"]:
            lines.append(f"  {t['name']:<{w}}  (same array as {t['same_as']})")
    return "\n".join(lines)

