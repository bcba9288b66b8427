"""A float32 CPU kernel for linear layers fed a few rows, for the compiled decode step.

A decode step feeds each linear layer one row per sequence, so the product is (B, K) x (N, K)^T
with B between 1 and a few dozen. For such B, MKL's float32 GEMM on an AVX-512 CPU runs far from
both the core's arithmetic peak and the memory's bandwidth: on 2 cores, SmolLM2's 30 layers plus
4 side-branch layers, their weights cycled from memory, took 21.8 ms at 1 row and 40.0 ms at 8.
This kernel reads each weight row once per call, multiplies it with every input row while it is
in the core's first-level cache (4 weight rows x up to 4 input rows per register tile) and
prefetches the next rows meanwhile: 21.4 ms at 1 row and 28.4 ms at 8 on the same machine
(`benchmarks/few_rows_linear.py`).

Each output element is one dot product over K computed in a fixed order, whatever the number of
rows, so a row's result is the same bit for bit alone or in any batch (MKL's is not guaranteed
to be). It sums in another order than MKL, which the compiled path's tolerance covers.

The kernel is C++ with AVX-512 intrinsics, built once per machine on first use by
`torch.utils.cpp_extension` (about 20 s; kept in torch's extension cache) and registered as the
operator ``mavis_lc_cpu::few_rows_linear``, which `torch.compile` calls as an opaque kernel.
`kernel_unavailable_reason` says why it cannot be used here (a CPU without AVX-512, no C++
compiler or ninja, a failed build, or a result that differs from `F.linear` on a probe); then
the step runs `F.linear` as before. `FewRowsLinear` is the function mode that routes a thread's
eligible `F.linear` calls (float32, CPU, 2-D weight, at most `MAX_ROWS` rows) to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

MAX_ROWS = 16
"""Products of more rows than this run `F.linear` (a prefill's many rows are MKL's strength)."""

_OP = "mavis_lc_cpu::few_rows_linear"

_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>

namespace {

// out[j, i] = sum_k x[j, k] * w[i, k] for NB weight rows and MB input rows, K in order (16 lanes,
// then one horizontal sum), so an element never depends on how many rows share the call.
template <int NB, int MB, bool PREFETCH>
inline void tile(const float* __restrict x, const float* __restrict w, float* __restrict out,
                 int64_t K, int64_t N) {
  __m512 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[MB];
    for (int j = 0; j < MB; ++j) xv[j] = _mm512_loadu_ps(x + j * K + k);
    for (int i = 0; i < NB; ++i) {
      if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(w + (i + NB) * K + k), _MM_HINT_T0);
      __m512 wv = _mm512_loadu_ps(w + i * K + k);
      for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 xv[MB];
    for (int j = 0; j < MB; ++j) xv[j] = _mm512_maskz_loadu_ps(mask, x + j * K + k);
    for (int i = 0; i < NB; ++i) {
      __m512 wv = _mm512_maskz_loadu_ps(mask, w + i * K + k);
      for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) out[j * N + i] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int MB>
inline void rows(const float* x, const float* w, float* out, int64_t n0, int64_t nb, int64_t K, int64_t N,
                 bool prefetch) {
  if (nb == 4) {
    if (prefetch) tile<4, MB, true>(x, w + n0 * K, out + n0, K, N);
    else tile<4, MB, false>(x, w + n0 * K, out + n0, K, N);
  } else {
    for (int64_t i = 0; i < nb; ++i) tile<1, MB, false>(x, w + (n0 + i) * K, out + n0 + i, K, N);
  }
}

torch::Tensor few_rows_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "few_rows_linear: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "few_rows_linear: float32 only");
  const auto xc = x.contiguous();
  const auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * 4, nb = std::min<int64_t>(4, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t r = std::min<int64_t>(4, M - m0);
      const bool prefetch = m0 == 0 && n0 + 8 <= N;  // the first pass over a block fetches the next
      const float* xb = xp + m0 * K;
      float* ob = op + m0 * N;
      switch (r) {
        case 1: rows<1>(xb, wp, ob, n0, nb, K, N, prefetch); break;
        case 2: rows<2>(xb, wp, ob, n0, nb, K, N, prefetch); break;
        case 3: rows<3>(xb, wp, ob, n0, nb, K, N, prefetch); break;
        default: rows<4>(xb, wp, ob, n0, nb, K, N, prefetch); break;
      }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(mavis_lc_cpu, m) { m.def("few_rows_linear(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(mavis_lc_cpu, CPU, m) { m.impl("few_rows_linear", &few_rows_linear); }
"""

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _cpu_reason() -> str | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return f"the CPU's vector capability is {capability} (the kernel needs AVX512)"
    return None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's extension builder runs ``ninja`` from PATH. The ``ninja`` package installs it beside
    the environment's Python, which is not on PATH when that Python is run without activating its
    environment: then that directory is put on PATH for the build, and taken off after."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja

        directory = str(getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        directory = ""
    if not directory or not Path(directory, "ninja").exists():
        yield  # the build fails with torch's own message, which becomes the reason
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = directory + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


def _build() -> str | None:
    """Build and register the operator, then check it against `F.linear`; None when it can run."""
    reason = _cpu_reason()
    if reason is not None:
        return reason
    try:
        from torch.utils.cpp_extension import load_inline

        started = time.perf_counter()
        with _ninja_on_path():
            load_inline(
                name="mavis_lc_few_rows_v1",
                cpp_sources=[_SOURCE],
                extra_cflags=["-O3", "-mavx512f", "-mfma", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
        seconds = time.perf_counter() - started
    except Exception as exc:  # no compiler, no ninja, a build error, ...
        return f"the kernel did not build ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]})"
    try:
        torch.library.register_fake(_OP)(_fake)
    except Exception as exc:  # pragma: no cover - a torch without fake registration
        return f"the kernel cannot be traced ({type(exc).__name__}: {exc})"
    generator = torch.Generator().manual_seed(0)
    for rows, inner, outer in ((1, 576, 40), (5, 100, 9), (16, 33, 8)):  # K with and without a tail
        x = torch.randn(rows, inner, generator=generator)
        w = torch.randn(outer, inner, generator=generator)
        got = torch.ops.mavis_lc_cpu.few_rows_linear(x, w)
        want = F.linear(x, w)
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())):
            return f"the kernel differs from F.linear by {float((got - want).abs().max()):.3g}"
    logger.info("built the few-rows linear kernel in %.1f s", seconds)
    return None


def _fake(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


def kernel_unavailable_reason() -> str | None:
    """Why the kernel cannot run here (None: it is built, registered and checked). Built on the
    first call in a process; later calls return the same answer."""
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _build()
            if _state["reason"] is not None:
                logger.info("linear layers run F.linear: %s", _state["reason"])
        return _state["reason"]


def eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` goes to the kernel: float32 on CPU, at most `MAX_ROWS` rows,
    a contiguous 2-D weight (another would be copied at every call), and no gradient to record
    (the kernel has no backward)."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.is_contiguous()
        and 1 <= rows <= MAX_ROWS
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the kernel (which `kernel_unavailable_reason` must allow)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mavis_lc_cpu.few_rows_linear(flat, weight).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


class FewRowsLinear(TorchFunctionMode):
    """Within the block, this thread's eligible `F.linear` calls run the kernel (which must be
    available); other threads, and calls outside the block, are untouched."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if eligible(x, weight):
                return few_rows_linear(x, weight, bias)
        return func(*args, **kwargs)
