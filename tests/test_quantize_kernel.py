"""The int8 product's kernels: inductor's compiled int8-weight GEMM (used on AVX2 CPUs) against torch's
`_weight_int8pack_mm`, which kernel is chosen when, and the fall-back when inductor cannot compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blipkit.quantize as q
from blipkit.errors import InputError
from blipkit.quantize import Int8Linear

needs_x86 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                               reason="inductor's int8-weight GEMM template has AVX2 / AVX-512 micro-kernels only")


def _layers(n: int, k: int, out: int, seed: int) -> list[nn.Linear]:
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(k, out) for _ in range(n)]
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(torch.randn(out, k, generator=g))
    return layers


@pytest.fixture
def compiled_everywhere(monkeypatch):
    """Every int8 layer on inductor's kernel, however small; a fresh record of compile failures."""
    monkeypatch.setattr(q, "KERNEL", "inductor")
    monkeypatch.setattr(q, "MIN_COMPILED", 0)
    monkeypatch.setattr(q, "_failed", [])


@needs_x86
def test_inductor_kernel_equals_torch_kernel(compiled_everywhere, monkeypatch):
    """Two layers of one shape (inductor's FX graph cache would hand the second the first one's frozen weight), at
    row counts on and between buckets: the compiled product is torch's kernel's, to bfloat16 rounding."""
    layers = _layers(2, 64, 48, seed=0)
    int8 = [Int8Linear.from_linear(lin) for lin in layers]
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for rows in (1, 3):
            x = torch.randn(rows, 64, generator=g)
            got = [m(x) for m in int8]
            monkeypatch.setattr(q, "KERNEL", "torch")
            want = [m(x) for m in int8]
            monkeypatch.setattr(q, "KERNEL", "inductor")
            for a, b, lin in zip(got, want, int8, strict=True):
                assert a.shape == (rows, 48)
                scale = x.bfloat16().float().abs() @ lin.dequantized().abs().t() + 1e-3
                assert ((a - b).abs() <= scale * 2**-7).all()
    assert not q._failed
    assert all(sorted(m._compiled) == [1, 4] for m in int8)  # rows 3 ran padded to the bucket of 4
    assert not torch.equal(got[0], got[1])


@needs_x86
def test_compiled_only_without_grad(compiled_everywhere):
    """With autograd on (freezing the weight needs it off), the layer keeps torch's kernel and compiles nothing."""
    m = Int8Linear.from_linear(_layers(1, 32, 16, seed=2)[0])
    x = torch.randn(2, 32)
    y = m(x)
    assert y.shape == (2, 16) and not m._compiled


def test_compile_failure_falls_back_to_torch_kernel(compiled_everywhere, monkeypatch):
    """Where inductor cannot compile (no C++ compiler, say), a warning names why and torch's kernel takes over."""
    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

    monkeypatch.setattr(q, "_compile", broken)
    lin = _layers(1, 32, 16, seed=3)[0]
    m = Int8Linear.from_linear(lin)
    x = torch.randn(1, 32)
    with torch.inference_mode(), pytest.warns(UserWarning, match=r"inductor's kernel did not compile "
                                                                 r"\(InvalidCxxCompiler: No working C\+\+ compiler"):
        y = m(x)
    assert q._failed == ["InvalidCxxCompiler: No working C++ compiler found"]
    with torch.inference_mode():
        assert torch.equal(m(x), y)  # torch's kernel from then on, without another warning
    assert torch.allclose(y, lin(x), atol=0.1)


def test_kernel_choice(monkeypatch):
    monkeypatch.setattr(q, "KERNEL", "auto")
    avx2 = torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert q.kernel() == ("inductor" if avx2 else "torch")
    monkeypatch.setattr(q, "KERNEL", "torch")
    assert q.kernel() == "torch"
    monkeypatch.setattr(q, "KERNEL", "fast")
    with pytest.raises(InputError, match=r"^BLIPKIT_INT8_KERNEL is 'fast': use auto, torch or inductor$"):
        q.kernel()


def test_cli_shows_compilation(compiled_everywhere, monkeypatch, capsys):
    """The first int8 call compiles one product per layer and rows bucket: the command line shows a bar meanwhile."""
    from pathlib import Path

    from blipkit import cli

    compiled = []

    def stand_in(weight, scales, bias, example):  # inductor takes ~0.4 s a layer: torch's kernel stands in for it
        compiled.append(example.shape[0])
        return q._Int8Matmul(weight, scales, bias)

    monkeypatch.setattr(q, "_compile", stand_in)
    image = str(Path(__file__).parents[1] / "examples" / "red-circle-blue-square.png")
    assert cli.main(["caption", image, "--beams", "1", "--max-new-tokens", "3"]) == 0
    assert "compiling" not in capsys.readouterr().err and not compiled  # float weights: nothing to compile
    assert cli.main(["caption", image, "--beams", "1", "--max-new-tokens", "3", "--quantize", "int8"]) == 0
    err = capsys.readouterr().err
    assert 1 in compiled and "compiling int8 kernels for 1 row (first use, ~0.4 s a layer; later calls reuse " in err
    assert f": {compiled.count(1)} layers" in err  # the bar counted every layer compiled for that bucket
    assert not q._hooks  # the bar is gone with the command
