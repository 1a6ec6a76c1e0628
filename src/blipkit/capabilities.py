"""Which named checkpoints can do what: the shipped models and the Salesforce presets, asked through their families'
capability tables (`BlipConfig.unable`, `Blip2Config.unable`), so refusals name only checkpoints that really can.

    from blipkit.capabilities import capability_table, checkpoints_with
    checkpoints_with("caption")     # ['scenes-blip', 'scenes-blip2-opt', 'blip-image-captioning-base', ...]
    capability_table()["blip-vqa-base"]   # frozenset({'vqa', 'rank_answers', 'attention'})
"""

from __future__ import annotations

import functools
import json

from .blip2_config import PRESETS as BLIP2_PRESETS
from .blip2_config import Blip2Config
from .checkpoint import shipped_models
from .config import PRESETS, BlipConfig, check_capability
from .errors import BlipkitError


def _shipped_configs() -> dict[str, BlipConfig | Blip2Config]:
    """Configs of the models installed with the package (a model whose config does not read is left out)."""
    out: dict[str, BlipConfig | Blip2Config] = {}
    for name, directory in shipped_models().items():
        path = directory / "config.json"
        try:
            raw = json.loads(path.read_text())
            family = Blip2Config if raw.get("model_type") == "blip-2" else BlipConfig
            out[name] = family.from_hf(raw, source=str(path))
        except (OSError, ValueError, AttributeError, BlipkitError):  # a broken install must not break a message
            continue
    return out


@functools.cache
def known_checkpoints() -> dict[str, BlipConfig | Blip2Config]:
    """Every named checkpoint with its architecture config: shipped models first, then the BLIP and BLIP-2 presets."""
    presets = {name: cfg for name, (_, cfg) in {**PRESETS, **BLIP2_PRESETS}.items()}
    return {**_shipped_configs(), **presets}


def family(config: BlipConfig | Blip2Config) -> str:
    """"BLIP" or "BLIP-2", as the models' `family` says it."""
    return "BLIP-2" if isinstance(config, Blip2Config) else "BLIP"


def checkpoints_with(capability: str, first: str | None = None) -> list[str]:
    """Names of the known checkpoints that have `capability`, those of family `first` ("BLIP" / "BLIP-2") first."""
    check_capability(capability)
    known = known_checkpoints()
    names = [name for name, cfg in known.items() if cfg.unable(capability) is None]
    return sorted(names, key=lambda n: family(known[n]) != first) if first else names


def capability_table() -> dict[str, frozenset[str]]:
    """Each known checkpoint's capabilities."""
    return {name: cfg.capabilities for name, cfg in known_checkpoints().items()}
