"""Finding, reading and writing checkpoints in the Hugging Face Hub layout, strictly.

A checkpoint is a directory with `config.json` and weights (`model.safetensors`, sharded safetensors with an
index, or `pytorch_model.bin`), plus tokenizer files and optionally `preprocessor_config.json`. Loading builds
the model without allocating weights (meta device) and then assigns each tensor as it is read from the
memory-mapped file, converted to the target dtype, so peak memory is about one copy of the weights.
Every checkpoint tensor must be used, every parameter filled, every shape equal; errors name the key and file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CheckpointError, InputError
from .fields import read_json, require

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Buffers older checkpoints stored that blipkit derives instead.
DERIVED_SUFFIXES = (".position_ids",)
MODELS_DIR = Path(__file__).parent / "models"


def shipped_models() -> dict[str, Path]:
    """Models trained by this project and installed with the package: name -> directory."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "config.json").is_file()}


def read_config(directory: Path) -> dict:
    """The checkpoint's `config.json` as a dict (CheckpointError naming the file when absent or invalid)."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json; a checkpoint directory needs config.json and weights")
    return read_json(path)


def _weight_files(directory: Path) -> tuple[list[Path], Path | None, dict[str, Path]]:
    """(weight files, the index or None, the shard each tensor is in by the index)."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            if name.endswith(".index.json"):
                listed = _index(path, directory)
                return sorted(set(listed.values())), path, listed
            return [path], None, {}
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def _index(path: Path, directory: Path) -> dict[str, Path]:
    """Tensor name -> shard file, as a weight index lists them: each a file name inside `directory` that exists."""
    weight_map = read_json(path).get("weight_map")
    require(isinstance(weight_map, dict) and bool(weight_map), path, "weight_map",
            f"is {weight_map!r:.60}, not an object mapping tensor names to shard files")
    listed = {}
    for key, name in weight_map.items():
        where = f"weight_map.{key}"
        require(isinstance(name, str) and bool(name), path, where, f"is {name!r:.60}, not a file name")
        require(not Path(name).is_absolute() and ".." not in Path(name).parts, path, where,
                f"is {name!r:.60}, outside the checkpoint directory; shards are named relative to it")
        shard = directory / name
        if not shard.is_file():
            raise CheckpointError(f"{path}: '{where}' names {name!r:.60}, which is missing from {directory}; "
                                  "download every shard the index lists")
        listed[key] = shard
    return listed


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
    except (OSError, ValueError, RecursionError) as e:  # unreadable, or not a safetensors file
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    header.pop("__metadata__", None)
    page = mmap.PAGESIZE
    for key, src, shape, start, end in _entries(header, path, 8 + n, size):
        count = (end - start) // src.itemsize
        view = torch.frombuffer(mm, dtype=src, count=count, offset=start) if count else torch.empty(0, dtype=src)
        view = view.view(shape)
        target = dtype_for(key, src)
        if target == src:
            yield key, view
            continue
        yield key, view.to(target)
        del view
        if count and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, start - start % page, end - start + start % page)


def _naturals(value: object) -> bool:
    """Whether `value` is a JSON list of non-negative integers."""
    return isinstance(value, list) and all(type(i) is int and i >= 0 for i in value)


def _entries(header: dict, path: Path, base: int, size: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """A safetensors header's tensors as (key, dtype, shape, start, end) in file order, each checked to fit the file."""
    out = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: malformed safetensors header (entry '{key}' is not an object)")
        name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        src = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
        if src is None:
            raise CheckpointError(f"{path}: tensor '{key}' has dtype {name!r:.40}, which blipkit does not load")
        if not (_naturals(shape) and _naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: malformed safetensors header (tensor '{key}': shape {shape!r:.40}, "
                                  f"data_offsets {offsets!r:.40})")
        start, end = base + offsets[0], base + offsets[1]
        if end > size:
            raise CheckpointError(f"{path}: truncated file ('{key}' ends at byte {end}, the file has {size})")
        if math.prod(shape) * src.itemsize != end - start:
            raise CheckpointError(f"{path}: tensor '{key}' does not fit its shape {shape} ({end - start} bytes)")
        out.append((key, src, shape, start, end))
    return sorted(out, key=lambda entry: entry[3])


def iter_tensors(directory: Path, dtype_for: DtypeFor | None = None) -> Iterator[tuple[str, Tensor, Path]]:
    """Yield (key, tensor, file) for every tensor of the checkpoint, read lazily from memory-mapped files.

    `dtype_for(key, stored_dtype)` gives the dtype to yield each tensor in (default: as stored).
    """
    dtype_for = dtype_for or (lambda key, stored: stored)
    files, index, listed = _weight_files(directory)
    seen: set[str] = set()
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the weight index but missing")
        if path.suffix == ".safetensors":
            tensors = _read_safetensors(path, dtype_for)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds here; all mean "unreadable"
                raise CheckpointError(f"{path}: cannot read PyTorch weights ({e})") from None
            tensors = ((k, v.to(dtype_for(k, v.dtype))) for k, v in state.items())
        for key, tensor in tensors:
            seen.add(key)
            yield key, tensor, path
    absent = next((key for key in listed if key not in seen), None)
    if absent is not None:
        raise CheckpointError(f"{index}: 'weight_map.{absent}' names {listed[absent].name}, which holds no tensor "
                              f"'{absent}'; restore the index (or the shard) from the checkpoint")


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
    aliases: dict[int, list[str]] = {}  # parameter id -> its names, canonical first
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[name] = p

    def dtype_for(key: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored
        return torch.float32 if keep_float32(key) else (dtype or stored)

    filled: dict[int, nn.Parameter] = {}
    copies: dict[str, nn.Parameter] = {}  # tied names the file stores separately
    skip = set(getattr(model, "unused_checkpoint_keys", ()))
    for key, tensor, path in iter_tensors(directory, dtype_for):
        p = _checked_param(model, params, key, tensor, path, skip)
        if p is None:
            continue
        new = nn.Parameter(tensor.to(device) if device is not None else tensor, requires_grad=p.requires_grad)
        if key != aliases[id(p)][0]:
            copies[key] = new
            continue
        for name in aliases[id(p)]:
            _set(model, name, new)
        filled[id(p)] = new
    _retie(model, params, aliases, filled, copies)
    missing = [names[0] for pid, names in aliases.items() if pid not in filled]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: missing {len(missing)} tensor(s) the model needs: {shown}")


def _checked_param(
    model: nn.Module, params: dict[str, nn.Parameter], key: str, tensor: Tensor, path: Path, skip: set[str]
) -> nn.Parameter | None:
    """The parameter a checkpoint tensor fills (None for keys blipkit derives or skips), its shape checked."""
    if key not in params:
        if key.endswith(DERIVED_SUFFIXES) or key in skip:
            return None
        raise CheckpointError(
            f"{path}: unexpected key '{key}' — the checkpoint has a tensor this {type(model).__name__} "
            f"does not (wrong architecture or config.json?)"
        )
    p = params[key]
    if tuple(tensor.shape) != tuple(p.shape):
        raise CheckpointError(
            f"{path}: shape mismatch for '{key}': checkpoint {tuple(tensor.shape)}, model {tuple(p.shape)}"
        )
    if tensor.is_floating_point() != p.is_floating_point():
        raise CheckpointError(f"{path}: tensor '{key}' is {str(tensor.dtype).removeprefix('torch.')}, where the "
                              f"model has a {'floating-point' if p.is_floating_point() else 'integer'} parameter; "
                              "restore the weights from the checkpoint")
    return p


def _retie(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    aliases: dict[int, list[str]],
    filled: dict[int, nn.Parameter],
    copies: dict[str, nn.Parameter],
) -> None:
    """Place the tied copies a file stored under non-canonical names: the only copy fills every name; a copy equal
    to the canonical tensor stays tied; a different one becomes that name's own parameter."""
    for key, copy in copies.items():
        pid = id(params[key])
        if pid not in filled:
            for name in aliases[pid]:
                _set(model, name, copy)
            filled[pid] = copy
        elif not torch.equal(filled[pid], copy):
            _set(model, key, copy)


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


def write_directory(directory: Path, write: Callable[[Path], None]) -> Path:
    """Write a checkpoint into `directory` all or nothing: `write(staging)` fills a fresh staging folder inside it,
    then each file is renamed into place (config.json last), replacing files of the same names.

    A failure while writing (disk full, a bad value) removes the staging folder and leaves `directory` as it was.
    Files of other names already there stay. Target problems (a file, a path under a file, no permission) are one
    InputError naming the path.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"cannot save to '{directory}': it is a file; pass a directory (new or existing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=directory))
    except OSError as e:
        raise InputError(f"cannot save to '{directory}' ({e.strerror or e}): pass a directory you can write") from None
    try:
        try:
            write(staging)
        except OSError as e:
            raise InputError(f"cannot save to '{directory}' ({e.strerror or e}); it was left as it was") from None
        try:
            for name in sorted((p.name for p in staging.iterdir()), key=lambda name: name == "config.json"):
                os.replace(staging / name, directory / name)
        except OSError as e:
            raise InputError(f"cannot move saved files into '{directory}' ({e.strerror or e}); save again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


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
