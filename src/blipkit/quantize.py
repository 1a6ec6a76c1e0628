"""Weight-only quantization of a loaded model's linear layers: int8 (per-output-channel scales) or bfloat16.

Decoding one token reads every decoder weight once, so on a CPU it is bound by memory bandwidth, not arithmetic:
int8 weights are a quarter of the float32 bytes. `Int8Linear` stores the weight as int8 with one scale per output
channel; up to `Int8Linear.max_rows` rows (decoding steps) it multiplies with bfloat16 activations on one of two
kernels (see `kernel`):
- torch's `_weight_int8pack_mm`, vectorized for AVX-512 only (a scalar loop on AVX2 CPUs);
- on AVX2 CPUs, inductor's int8-weight GEMM template (AVX2 micro-kernels): each layer's product is compiled once
  per rows bucket (`BUCKETS`) on first use, ~0.4 s a layer (~45 s for BLIP-base's decoder at one row).
Above `max_rows` rows (the prompt pass, large batches) the weight is dequantized to float32 for one GEMM.
`BF16Linear` keeps a bfloat16 copy of the weight and computes in bfloat16, around float32 activations.

Only the parts that pay are quantized by default (see `DEFAULT_PARTS`): the BLIP text decoder and the BLIP-2
language model. Everything outside the quantized linears (embeddings, norms, attention) keeps the model's dtype
(`BF16_CROSS_CACHE` opts an int8 text decoder's cross-attention cache into bfloat16).
A quantized model runs every method as before; `blipkit.save` refuses it (the int8 weights are not a format
`transformers` reads; save the float model and quantize after loading).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError

MODES = ("int8", "bf16")
#: the top-level parts quantized when none are named, per model family
DEFAULT_PARTS = {"BLIP": ("text_decoder",), "BLIP-2": ("language_model",)}


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (N, K) times a bfloat16 scale per output channel."""

    #: up to this many rows use an int8 kernel; more dequantize the weight to float32 for one GEMM
    max_rows = 24

    #: rows of the exact (float) weight recomputed per output row of a vocabulary head, at the int8 top scores
    refine_top = 64

    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None, exact: Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) bfloat16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # a vocabulary head keeps its float weight (tied to the token embedding, so no copy): see `_refine`
        self.exact = exact
        self._compiled: dict[int, object] = {}  # rows bucket -> compiled matrix product (built on first use)

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_exact: bool = False) -> Int8Linear:
        """Quantize a linear layer: symmetric per-output-channel int8 (scale = max |w| / 127, rounded to bf16).

        `keep_exact` keeps a reference to the float weight to recompute the top scores exactly (vocabulary heads).
        """
        w = linear.weight.detach().float()
        # the kernel takes bfloat16 scales: round them first, then quantize against the rounded scale
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias, linear.weight.detach() if keep_exact else None)

    def dequantized(self) -> Tensor:
        """The weight as float32 (N, K): what the int8 values and scales stand for (exactly: 8 x 8 mantissa bits)."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        rows = x2.shape[0]
        # the kernels read K in blocks of 16 (other widths give wrong numbers): those layers take the float path
        if rows <= self.max_rows and self.in_features % 16 == 0:
            y = self._matvec(x2).to(x.dtype)
        else:  # many rows (prompt pass, large batches): one float GEMM amortizes the dequantization
            y = F.linear(x2, self.dequantized().to(x.dtype))
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        if self.exact is not None:
            y = self._refine(x2, y)
        return y.view(*shape[:-1], self.out_features)

    def _matvec(self, x: Tensor) -> Tensor:
        """x (M, K) times the int8 weight, plus the bias, in float32: torch's kernel, or inductor's compiled one."""
        if _use_compiled(x, self.in_features * self.out_features):
            rows = x.shape[0]
            bucket = next(b for b in BUCKETS if b >= rows)
            padded = x if bucket == rows else F.pad(x, (0, 0, 0, bucket - rows))
            try:
                fn = self._compiled.get(bucket)
                if fn is None:  # compiled on first use of this many rows
                    for hook in _hooks:
                        hook(bucket, False)
                    fn = self._compiled[bucket] = _compile(self.weight, self.scales, self.bias,
                                                           padded.float().contiguous())
                    for hook in _hooks:
                        hook(bucket, True)
                return fn(padded.float().contiguous())[:rows]
            except Exception as e:  # no C++ compiler, an inductor without the template: torch's kernel from now on
                _failed.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
                warnings.warn(f"int8 weights: inductor's kernel did not compile ({_failed[0]}); using torch's "
                              "_weight_int8pack_mm, which is slow on CPUs without AVX-512", stacklevel=2)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight, self.scales)
        # bfloat16 + float32 bias promotes to float32 in one op (no separate conversion)
        return y.float() if self.bias is None else y + self.bias.float()

    def _refine(self, x: Tensor, y: Tensor, chunk: int = 64) -> Tensor:
        """Recompute the `refine_top` highest scores of each row (M, N) with the float weight and float inputs.

        The int8 product comes back in bfloat16, whose rounding (1/8 at a logit of 16) flips near-ties between the
        best tokens; greedy and beam search only look at the top scores, so those are made exact.
        """
        k = min(self.refine_top, self.out_features)
        for s in range(0, y.shape[0], chunk):
            idx = y[s : s + chunk].topk(k, dim=-1).indices  # (m, k)
            rows = self.exact[idx].to(x.dtype)  # (m, k, K)
            exact = torch.bmm(rows, x[s : s + chunk, :, None]).squeeze(-1)  # (m, k)
            if self.bias is not None:
                exact = exact + self.bias.to(x.dtype)[idx]
            y[s : s + chunk].scatter_(1, idx, exact)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, bf16 scales"


class BF16Linear(nn.Module):
    """y = x W^T + b computed in bfloat16 with a bfloat16 weight; input and output keep the caller's dtype."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # (N, K) bfloat16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        """A bfloat16 copy of a linear layer's weight (the bias stays as it is)."""
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.weight.detach().to(torch.bfloat16), bias)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


#: set True before quantizing to keep an int8 text decoder's cross-attention keys/values in bfloat16: 8 % faster
#: BLIP-base decoding, but scenes-blip's captions moved (98 / 100 identical, CIDEr -1.35 against +0.03), so off
BF16_CROSS_CACHE = False
#: rows are padded up to one of these for the compiled kernel: one compiled graph per layer and bucket
BUCKETS = (1, 2, 4, 8, 16, 24)
#: layers with fewer weights than this keep torch's kernel (compiling them costs more than it saves)
MIN_COMPILED = 1 << 18
#: "auto" (inductor's kernel on AVX2 CPUs, torch's elsewhere), "torch" or "inductor"; env BLIPKIT_INT8_KERNEL
KERNEL = os.environ.get("BLIPKIT_INT8_KERNEL", "auto")
#: inductor settings that select its vectorized int8-weight GEMM template: the weight must be a frozen constant
#: (set around the first call, when the graph compiles: `torch.compile(options=...)` does not apply freezing).
#: No FX graph cache: with freezing it hands a layer the graph of another layer of the same shape, weights included
_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP", "fx_graph_cache": False}
_failed: list[str] = []  # the reason inductor could not compile, once it failed: torch's kernel from then on
_hooks: list[Callable[[int, bool], None]] = []  # called (bucket, done) around each compilation (`compile_progress`)


def kernel() -> str:
    """The int8 matrix product in use on the CPU: "inductor" or "torch" (see `KERNEL`)."""
    if KERNEL not in ("auto", "torch", "inductor"):
        raise InputError(f"BLIPKIT_INT8_KERNEL is {KERNEL!r}: use auto, torch or inductor")
    if KERNEL != "auto":
        return KERNEL
    # torch's `_weight_int8pack_mm` is vectorized for AVX-512 only (a scalar loop elsewhere); inductor's template
    # has AVX2 and AVX-512 micro-kernels
    return "inductor" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "torch"


@contextmanager
def compile_progress() -> Iterator[None]:
    """While inside, a progress bar on stderr counts the int8 products compiled on first use, one bar per rows bucket.

    On inductor's kernel the first call that needs a rows bucket compiles every layer's product for it (~0.4 s a
    layer, ~45 s for BLIP-base's decoder) inside that call; the command line runs each command in this, so the wait
    is not silent. Nothing shows when nothing compiles (torch's kernel, small layers, buckets already compiled).
    """
    from tqdm import tqdm

    bars: dict[int, tqdm] = {}

    def hook(bucket: int, done: bool) -> None:
        # no total: which layers a call reaches with few rows depends on the call (cross-attention keys/values
        # over an image have too many rows to compile, over a short question few enough)
        if bucket not in bars:  # first compilation for this bucket
            for bar in bars.values():
                bar.close()
            bars.clear()
            rows = f"{bucket} row{'s' if bucket > 1 else ''}"
            bars[bucket] = tqdm(desc=f"compiling int8 kernels for {rows} (first use, ~0.4 s a layer; later calls "
                                f"reuse them)", unit=" layers", file=sys.stderr, leave=False, mininterval=0)
        if done:
            bars[bucket].update(1)

    _hooks.append(hook)
    try:
        yield
    finally:
        _hooks.remove(hook)
        for bar in bars.values():
            bar.close()


def _use_compiled(x: Tensor, weights: int) -> bool:
    return (weights >= MIN_COMPILED and x.device.type == "cpu" and not torch.is_grad_enabled() and not _failed
            and kernel() == "inductor")


class _Int8Matmul(nn.Module):
    """The int8 product and the bias as a module of their own, so that inductor sees the weight as a buffer it may
    freeze (the bias and the conversion to float32 run inside the compiled call, not as two more ops)."""

    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales).float()
        return y if self.bias is None else y + self.bias


def _compile(weight: Tensor, scales: Tensor, bias: Tensor | None, example: Tensor):
    """x (rows, K) float -> x W^T + b (rows, N) float32 through inductor's int8-weight GEMM template, for `example`'s
    shape only. The graph goes to inductor directly (`compile_fx`), not through `torch.compile`: dynamo's guards
    cost more per call (~0.1 ms) than the product itself at one row, and it keeps one cache per code object."""
    from torch._inductor.compile_fx import compile_fx

    graph = torch.fx.symbolic_trace(_Int8Matmul(weight, scales, bias).eval())
    with torch._inductor.config.patch(_INDUCTOR):
        return compile_fx(graph, [example])


def check_mode(mode: str | None) -> str | None:
    """`mode` if it is None or a known quantization mode, else InputError naming the choices."""
    if mode is not None and mode not in MODES:
        raise InputError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)} (or None for none)")
    return mode


def check_device(device: torch.device) -> None:
    """Raise InputError unless the int8 kernel runs on `device` (it is probed with a tiny product)."""
    if device.type == "meta":
        raise InputError("cannot quantize a model on the meta device: load its weights first (blipkit.load)")
    try:
        _probe_int8(device)
    except (RuntimeError, NotImplementedError) as e:
        raise InputError(
            f"int8 weights are not supported on device '{device}' by this torch build ({str(e).splitlines()[0]}); "
            f"load the model on cpu, or use dtype='bfloat16' / quantize='bf16' there"
        ) from None


def _probe_int8(device: torch.device) -> None:
    """One tiny int8 product on `device`: raises RuntimeError / NotImplementedError where the kernel is missing."""
    x = torch.ones(1, 32, dtype=torch.bfloat16, device=device)
    w = torch.ones(8, 32, dtype=torch.int8, device=device)
    torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(8, dtype=torch.bfloat16, device=device))


def quantize(model: nn.Module, mode: str = "int8", parts: tuple[str, ...] | list[str] | None = None) -> nn.Module:
    """Replace the nn.Linear layers of `parts` of `model` (in place) by int8 or bfloat16 weight-only ones.

    Args:
        model: a loaded BLIP or BLIP-2 model (`blipkit.load`).
        mode: "int8" (per-output-channel scales) or "bf16".
        parts: top-level parts to quantize, e.g. ("text_decoder", "vision_model"); default `DEFAULT_PARTS`.
    Returns:
        The same model, with `model.quantized` set to `(mode, parts quantized so far)`; another call may quantize
        other parts (e.g. an int8 decoder and a bf16 vision encoder), not the same part twice.
    """
    check_mode(mode)
    family = getattr(model, "family", "BLIP")
    names = tuple(parts) if parts is not None else tuple(p for p in DEFAULT_PARTS[family] if model.has(p))
    done = getattr(model, "quantized", None) or (None, ())
    again = [n for n in names if n in done[1]]
    if again:
        part = getattr(model, again[0])
        was = "int8" if any(isinstance(m, Int8Linear) for m in part.modules()) else "bf16"
        raise InputError(f"{model.name_or_path}: {again[0]} is already quantized ({was}): load the model again "
                         "to change it")
    for name in names:
        if not model.has(name):
            have = [n for n, m in model.named_children() if any(isinstance(x, nn.Linear) for x in m.modules())]
            raise InputError(f"{model.name_or_path} has no part '{name}' to quantize; its parts with linear layers: "
                             f"{', '.join(have)}")
    if mode == "int8":
        check_device(model.device)
    convert = Int8Linear.from_linear if mode == "int8" else BF16Linear.from_linear
    for name in names:
        part = getattr(model, name)
        head = _vocab_head(part)
        linear = getattr(*head) if head else None
        if mode == "int8" and BF16_CROSS_CACHE:
            _bf16_cross_cache(part)
        _swap(part, convert)
        if head is not None and mode == "int8":
            setattr(*head, Int8Linear.from_linear(linear, keep_exact=True))
    # several calls may quantize different parts (int8 decoder, bf16 vision): the first mode names the model
    model.quantized = (done[0] or mode, done[1] + names)
    return model


def _bf16_cross_cache(part: nn.Module) -> None:
    """Keep the cross-attention keys/values of a float32 text stack in bfloat16: with int8 weights they are the next
    largest read of a decoding step (BLIP-base: 12 layers x 577 image tokens, 42 MB per token in float32)."""
    for layer in part.modules():  # text.TextLayer (by its attributes: the text stack sits above this module)
        if getattr(layer, "has_cross", False):
            qkv = layer.crossattention.qkv
            if qkv.key.weight.dtype == torch.float32:
                qkv.kv_dtype = torch.bfloat16


def _vocab_head(part: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent module, attribute) of the vocabulary projection of a decoding part, if it has one."""
    for parent_name, attr in (("cls.predictions", "decoder"), ("", "lm_head")):
        try:
            parent = part.get_submodule(parent_name)
        except AttributeError:
            continue
        if isinstance(getattr(parent, attr, None), nn.Linear):
            return parent, attr
    return None


def _swap(module: nn.Module, convert) -> None:
    """Replace every nn.Linear under `module` by `convert(linear)`, children first."""
    for child_name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, child_name, convert(child))
        else:
            _swap(child, convert)
