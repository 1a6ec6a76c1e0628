"""Devices and dtypes named by the caller, checked once at the door (the API and the CLI share these)."""

from __future__ import annotations

import torch

from .errors import InputError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: object, name: str = "device") -> torch.device | None:
    """A device name or `torch.device` -> `torch.device` that exists here (None stays None); `name` is the option."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise InputError(f"{name} is a {type(device).__name__}: pass a device name such as 'cpu' or 'cuda:0'")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"{name} {device!r:.40} is not a device: use cpu, cuda, cuda:1, mps ...") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{name} {device}: no CUDA device is available here; use cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"{name} {device}: there are only {torch.cuda.device_count()} CUDA devices here")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{name} {device}: no MPS device is available here; use cpu")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{name} {device}: blipkit runs on cpu, cuda or mps")
    return resolved


def resolve_dtype(dtype: object, name: str = "dtype") -> torch.dtype | None:
    """A dtype name (float32 / bfloat16 / float16 and their short forms) or floating `torch.dtype`; None stays None.

    Integer and other non-float dtypes are refused here, before any model is built or loaded.
    """
    if dtype is None:
        return None
    allowed = ", ".join(DTYPES)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"{name} {dtype} is not a floating-point dtype blipkit runs in: use one of {allowed}")
        return dtype
    if not isinstance(dtype, str):
        raise InputError(f"{name} is a {type(dtype).__name__}: pass a name ({allowed}) or a torch dtype")
    key = dtype.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise InputError(f"unknown {name} {dtype!r:.40}: use one of {allowed}")
    return DTYPES[key]
