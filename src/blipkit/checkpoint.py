"""Finding, reading and writing checkpoints in the Hugging Face Hub layout, strictly.

A checkpoint is a directory with `config.json` and weights (`model.safetensors`, sharded safetensors with an
index, or `pytorch_model.bin`), plus tokenizer files and optionally `preprocessor_config.json`. Loading builds
the model without allocating weights (meta device) and then assigns each tensor as it is read from the
memory-mapped file, converted to the target dtype, so peak memory is about one copy of the weights.
Every checkpoint tensor must be used, every parameter filled, every shape equal; errors name the key and file.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CheckpointError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Buffers older checkpoints stored that blipkit derives instead.
DERIVED_SUFFIXES = (".position_ids",)


def read_config(directory: Path) -> dict:
    """The checkpoint's `config.json` as a dict (CheckpointError naming the file when absent or invalid)."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json; a checkpoint directory needs config.json and weights")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _weight_files(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            if name.endswith(".index.json"):
                index = json.loads(path.read_text())
                return sorted({directory / f for f in index["weight_map"].values()})
            return [path]
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DtypeFor = Callable[[str, torch.dtype], torch.dtype]


def _read_safetensors(path: Path, dtype_for: DtypeFor) -> Iterator[tuple[str, Tensor]]:
    """Tensors of a safetensors file, memory-mapped: zero-copy when the dtype is kept, else converted.

    The map is private (copy-on-write), so the tensors are writable and the file is never changed. The pages of a
    converted tensor are released right after conversion, so loading float32 weights as bfloat16 peaks at about
    the bfloat16 size rather than the file size plus it.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    except (OSError, ValueError) as e:  # unreadable, or not a safetensors file
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    header.pop("__metadata__", None)
    page = mmap.PAGESIZE
    try:
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e!r})") from None
    for key, info in entries:
        src = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if src is None:
            raise CheckpointError(f"{path}: tensor '{key}' has dtype {info.get('dtype')}, which blipkit does not load")
        start, end = (8 + n + o for o in info["data_offsets"])
        if end > size:
            raise CheckpointError(f"{path}: truncated file ('{key}' ends at byte {end}, the file has {size})")
        count = (end - start) // src.itemsize
        try:
            view = torch.frombuffer(mm, dtype=src, count=count, offset=start) if count else torch.empty(0, dtype=src)
            view = view.view(info["shape"])
        except (RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: tensor '{key}' does not fit its shape {info.get('shape')} ({e})") from None
        target = dtype_for(key, src)
        if target == src:
            yield key, view
            continue
        yield key, view.to(target)
        del view
        if count and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, start - start % page, end - start + start % page)


def iter_tensors(directory: Path, dtype_for: DtypeFor | None = None) -> Iterator[tuple[str, Tensor, Path]]:
    """Yield (key, tensor, file) for every tensor of the checkpoint, read lazily from memory-mapped files.

    `dtype_for(key, stored_dtype)` gives the dtype to yield each tensor in (default: as stored).
    """
    dtype_for = dtype_for or (lambda key, stored: stored)
    for path in _weight_files(directory):
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the weight index but missing")
        if path.suffix == ".safetensors":
            yield from ((k, v, path) for k, v in _read_safetensors(path, dtype_for))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds here; all mean "unreadable"
                raise CheckpointError(f"{path}: cannot read PyTorch weights ({e})") from None
            yield from ((k, v.to(dtype_for(k, v.dtype)), path) for k, v in state.items())


def _set(model: nn.Module, name: str, value: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name) if module_name else model, attr, value)


def load_weights(
    model: nn.Module,
    directory: Path,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    keep_float32: Callable[[str], bool] = lambda name: False,
) -> None:
    """Fill `model`'s parameters (possibly on the meta device) from `directory`, strictly.

    Tied parameters (one tensor under several names) are filled once from the canonical (first) name. A file that
    also stores a tied copy under another name is honoured as the reference does: equal, it stays tied; different,
    that name gets its own parameter. `model.unused_checkpoint_keys` (if any) are skipped.
    `keep_float32(name)` marks parameters that stay in float32 whatever `dtype` is.
    """
    aliases: dict[int, list[str]] = {}
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[name] = p
    unused = set(getattr(model, "unused_checkpoint_keys", ()))

    def dtype_for(key: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored
        return torch.float32 if keep_float32(key) else (dtype or stored)

    def convert(key: str, tensor: Tensor, p: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(tensor.to(device) if device is not None else tensor, requires_grad=p.requires_grad)

    filled: dict[int, nn.Parameter] = {}
    copies: dict[str, nn.Parameter] = {}  # tied names the file stores separately
    for key, tensor, path in iter_tensors(directory, dtype_for):
        if key not in params:
            if key.endswith(DERIVED_SUFFIXES) or key in unused:
                continue
            raise CheckpointError(
                f"{path}: unexpected key '{key}' — the checkpoint has a tensor this {type(model).__name__} "
                f"does not (wrong architecture or config.json?)"
            )
        p = params[key]
        if tuple(tensor.shape) != tuple(p.shape):
            raise CheckpointError(
                f"{path}: shape mismatch for '{key}': checkpoint {tuple(tensor.shape)}, model {tuple(p.shape)}"
            )
        if key != aliases[id(p)][0]:
            copies[key] = convert(key, tensor, p)
            continue
        new = convert(key, tensor, p)
        for name in aliases[id(p)]:
            _set(model, name, new)
        filled[id(p)] = new
    for key, copy in copies.items():
        pid = id(params[key])
        if pid not in filled:  # only the tied copy is stored: it fills every name
            for name in aliases[pid]:
                _set(model, name, copy)
            filled[pid] = copy
        elif not torch.equal(filled[pid], copy):
            _set(model, key, copy)
    missing = [names[0] for pid, names in aliases.items() if pid not in filled]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: missing {len(missing)} tensor(s) the model needs: {shown}")


def state_dict_for_saving(model: nn.Module) -> dict[str, Tensor]:
    """Parameters under their first (canonical) name only; tied aliases are left for the loader to re-tie."""
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().contiguous().cpu()
    return out


def write_safetensors(tensors: dict[str, Tensor], path: Path) -> Path:
    """Write `tensors` to `path` atomically, with the file mode any new file gets here.

    Written then renamed, so a model loaded from this very file keeps reading the old one (its weights are mapped);
    safetensors creates its files private (0600), so the mode is set from the umask.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    return path


def save_weights(model: nn.Module, directory: Path) -> None:
    """Write `model.safetensors` (tied tensors once, under their canonical names)."""
    write_safetensors(state_dict_for_saving(model), directory / "model.safetensors")


def resolve(name_or_path: str | Path, shipped: dict[str, Path], presets: dict[str, str]) -> Path:
    """A shipped model name, local directory, preset name or Hub repo id -> local checkpoint directory."""
    key = str(name_or_path)
    if key in shipped:
        return shipped[key]
    path = Path(key).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the checkpoint directory that holds config.json")
    repo = presets.get(key, key)
    if repo.count("/") != 1 or key.startswith((".", "/", "~")):
        known = ", ".join(sorted(shipped) + sorted(presets))
        raise CheckpointError(f"'{key}': no such directory, and not a model name ({known}) or Hub repo id (org/name)")
    return _download(repo)


def _download(repo: str) -> Path:
    """Fetch a Hub repo's config, tokenizer and weights into the cache (safetensors preferred)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        path = Path(snapshot_download(repo, allow_patterns=patterns))
        if not any((path / f).is_file() for f in WEIGHT_FILES):  # older repos ship only pytorch_model.bin
            path = Path(snapshot_download(repo, allow_patterns=patterns + ["pytorch_model*.bin"]))
        return path
    except Exception as e:  # noqa: BLE001 - any hub failure means "not available here"
        raise CheckpointError(
            f"cannot fetch '{repo}' from the Hugging Face Hub ({type(e).__name__}: {e}). When offline, download it "
            f"elsewhere (huggingface-cli download {repo} --local-dir DIR) and pass the directory: blipkit.load('DIR')."
        ) from None
