"""The few-rows linear kernel of the compiled decode step (mavis_lc.decoding.few_rows)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mavis_lc.decoding import few_rows
from mavis_lc.decoding.few_rows import (
    MAX_ROWS,
    FewRowsLinear,
    eligible,
    few_rows_linear,
    kernel_unavailable_reason,
)


def test_the_kernel_is_available_on_this_build() -> None:
    # The machines this project runs on have AVX-512 and a C++ compiler (inductor needs one too):
    # a kernel that silently stops building would otherwise only show as a slower benchmark.
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip("this CPU has no AVX-512")
    assert kernel_unavailable_reason() is None


needs_kernel = pytest.mark.skipif(
    kernel_unavailable_reason() is not None, reason=f"few-rows kernel unavailable: {kernel_unavailable_reason()}"
)


@needs_kernel
@pytest.mark.parametrize(
    ("rows", "inner", "outer"),
    [(1, 576, 1536), (3, 64, 10), (4, 48, 7), (5, 100, 9), (8, 1536, 576), (16, 33, 8), (2, 15, 3)],
)
def test_matches_f_linear_for_any_shape_including_tails(rows: int, inner: int, outer: int) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + inner)
    x = torch.randn(rows, inner, generator=generator)
    w = torch.randn(outer, inner, generator=generator)
    b = torch.randn(outer, generator=generator)
    got = few_rows_linear(x, w, b)
    want = F.linear(x, w, b)
    assert got.shape == want.shape == (rows, outer)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_kernel
def test_a_row_is_the_same_bit_for_bit_alone_or_in_any_batch() -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(MAX_ROWS, 576, generator=generator)
    w = torch.randn(1536, 576, generator=generator)
    full = few_rows_linear(x, w)
    for size in (1, 2, 3, 5, 8, 13):
        part = few_rows_linear(x[:size], w)
        assert torch.equal(part, full[:size]), size
    assert torch.equal(torch.cat([few_rows_linear(x[i : i + 1], w) for i in range(MAX_ROWS)]), full)


@needs_kernel
def test_leading_dimensions_and_a_strided_input_keep_their_shape() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 64, generator=generator)
    w = torch.randn(32, 64, generator=generator)
    torch.testing.assert_close(few_rows_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    wide = torch.randn(3, 128, generator=generator)[:, ::2]  # not contiguous
    torch.testing.assert_close(few_rows_linear(wide, w), F.linear(wide, w), rtol=1e-5, atol=1e-4)


def test_eligible_calls_are_float32_cpu_and_few_rows() -> None:
    w = torch.zeros(8, 4)
    assert eligible(torch.zeros(1, 4), w)
    assert eligible(torch.zeros(MAX_ROWS, 1, 4), w)
    assert not eligible(torch.zeros(MAX_ROWS + 1, 4), w)  # a prefill's many rows stay MKL's
    assert not eligible(torch.zeros(2, 4, dtype=torch.float64), w.double())
    assert not eligible(torch.zeros(2, 4, dtype=torch.bfloat16), w.bfloat16())
    assert not eligible(torch.zeros(0, 4), w)
    assert not eligible(torch.zeros(2, 8), torch.zeros(8, 8).t())  # a transposed weight
    trained = torch.zeros(8, 4, requires_grad=True)
    assert not eligible(torch.zeros(2, 4), trained)  # the kernel records no gradient
    with torch.no_grad():
        assert eligible(torch.zeros(2, 4), trained)


@needs_kernel
def test_the_mode_routes_only_its_own_threads_eligible_linears(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = few_rows.few_rows_linear

    def counted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(few_rows, "few_rows_linear", counted)
    layer = nn.Linear(16, 8)
    small, large = torch.randn(2, 16), torch.randn(MAX_ROWS + 4, 16)
    other: list[int] = []
    with torch.no_grad(), FewRowsLinear():
        out = layer(small)
        layer(large)
        F.linear(input=small, weight=layer.weight)  # keywords route too
        thread = threading.Thread(target=lambda: other.append(len(layer(small))))
        thread.start()
        thread.join()
    layer(small)  # outside the block
    assert calls == [(2, 16), (2, 16)]  # only the small calls inside the block, on this thread
    assert other == [2]
    torch.testing.assert_close(out, F.linear(small, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_compiler_calls_the_kernel_inside_one_graph() -> None:
    from torch._dynamo.utils import counters

    layer = nn.Sequential(nn.Linear(32, 64, bias=False), nn.SiLU(), nn.Linear(64, 16)).requires_grad_(False)
    x = torch.randn(3, 32)
    counters.clear()
    compiled = torch.compile(layer, dynamic=False)
    with FewRowsLinear():
        got = compiled(x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


def test_a_cpu_without_avx512_gets_a_reason_and_no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(few_rows, "_state", {})
    reason = kernel_unavailable_reason()
    assert reason is not None and "AVX2" in reason and "AVX512" in reason


def test_a_failed_build_gets_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as cpp_extension

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(cpp_extension, "load_inline", broken)
    monkeypatch.setattr(few_rows, "_state", {})
    reason = kernel_unavailable_reason()
    assert reason is not None and "did not build" in reason and "Ninja is required" in reason


def test_the_ninja_package_is_put_on_path_only_for_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    ninja = pytest.importorskip("ninja")
    import os

    monkeypatch.setattr(few_rows.shutil, "which", lambda name: None)  # not on PATH: an unactivated venv
    before = os.environ.get("PATH", "")
    with few_rows._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep)[0] == str(ninja.BIN_DIR)
    assert os.environ.get("PATH", "") == before
