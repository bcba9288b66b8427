"""oneDNN-packed copies of a frozen stack's large linear layers, for the static-cache step (opt-in).

With ``MavisDecoder(compile=True, pack_weights=True)`` each large bias-free-or-biased float32 CPU
`nn.Linear` of the base's decoder stack (and of every side branch) gets a second copy of its weight,
reordered once into oneDNN's blocked layout. For the handful of rows a decode step feeds, MKL's
plain GEMM re-packs the weight on every call; the packed copy skips that: on SmolLM2's MLP at
batch 8, 223 -> 162 us (576->1536) and 244 -> 152 us (1536->576) per call on one machine's 2 CPU
cores. On another (AVX-512 and AMX), oneDNN's packed kernel was the slower one (576->1536 at 8
rows: 164 us against 89 us), so whether it pays depends on the CPU. The price is memory: one more
copy of every packed weight (304 MiB for SmolLM2's 90 MLP matrices),
which `PackedLinears.nbytes` reports and a log line states. The user's model is never changed: the
copies live here, and the layers are routed to them only inside `PackedLinears.routed`.

Inductor cannot lower oneDNN's packed linear outside weight freezing, so the layers call
`packed_linear`, a custom op that is opaque to the compiler and looks its packed copy up by the
weight's storage: a weight whose storage, shape or version (an in-place update) no longer matches
its copy runs the plain `F.linear`, so results always follow the live weights. Packed kernels sum
in another order than MKL's, within the compiled path's documented tolerance; each copy is checked
against `F.linear` when it is made, and a layer whose check fails stays plain (`skipped`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

MIN_PACKED_PARAMETERS = 1 << 19
"""Layers with fewer weights than this stay plain: on SmolLM2, packing the 576x576 attention
projections saves under 20 us a call and the 576x192 key/value ones run slower packed."""


@dataclass
class _Entry:
    packed: torch.Tensor
    weight: weakref.ref[torch.Tensor]
    shape: tuple[int, ...]
    version: int
    users: int = 1

    def serves(self, weight: torch.Tensor) -> bool:
        live = self.weight()
        return (
            live is not None
            and live.data_ptr() == weight.data_ptr()
            and tuple(weight.shape) == self.shape
            and weight._version == self.version
        )


_registry: dict[int, _Entry] = {}  # the weight's data_ptr -> its packed copy, shared by every user
_registry_lock = threading.Lock()
_routes: dict[int, tuple[int, object]] = {}  # id(layer) -> (blocks routing it, its own forward)


def _pointwise(*args: object) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(*args)


@torch.library.custom_op("mavis_lc::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the weight's packed copy where it has a current one."""
    entry = _registry.get(weight.data_ptr())
    if entry is None or x.dtype != torch.float32 or x.device.type != "cpu" or not entry.serves(weight):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = _pointwise(flat, entry.packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mavis_lc.packed_linear(x, self.weight, self.bias)


def unpackable_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be packed (None: it can)."""
    if type(layer) is not nn.Linear:
        return f"{type(layer).__name__} is not a plain nn.Linear"
    weight = layer.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return f"its weight is {weight.dtype} on {weight.device.type} (packed: float32 on CPU)"
    if not torch.backends.mkldnn.is_available():
        return "oneDNN (mkldnn) is not available in this torch build"
    return None


def packed_copy(
    weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int
) -> tuple[torch.Tensor, None] | tuple[None, str]:
    """``weight`` reordered into oneDNN's blocked layout for ``batch_hint`` rows and checked against
    `F.linear` on a probe; or None and why it could not be."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
        want = F.linear(probe, weight, bias)
    except Exception as exc:  # an op missing from this build, a reorder the CPU does not support, ...
        return None, f"oneDNN reorder failed ({type(exc).__name__}: {exc})"
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        return None, f"the oneDNN-packed copy differs from F.linear by {float((got - want).abs().max()):.3g}"
    return packed, None


@dataclass
class PackedLinears:
    """The packed copies of one module's large linear layers; `release` (or garbage collection)
    drops them. ``batch_hint``: the row count the copies are laid out for (any count runs)."""

    module: nn.Module
    min_parameters: int = MIN_PACKED_PARAMETERS
    batch_hint: int = 8
    layers: dict[str, nn.Linear] = field(default_factory=dict, init=False)
    """The packed layers by qualified name."""
    skipped: dict[str, str] = field(default_factory=dict, init=False)
    """Large layers left plain, by name, with the reason."""
    nbytes: int = field(default=0, init=False)
    """Bytes of the packed copies this object made (copies shared with another user not counted)."""
    _ptrs: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        for name, layer in self.module.named_modules():
            if not isinstance(layer, nn.Linear) or layer.weight.numel() < self.min_parameters:
                continue
            reason = unpackable_reason(layer) or self._pack(layer)
            if reason is None:
                self.layers[name] = layer
            else:
                self.skipped[name] = reason
        if self.skipped:
            first = next(iter(self.skipped.items()))
            logger.info("%d linear layers stay unpacked (%s: %s)", len(self.skipped), *first)
        if self.layers:
            logger.info(
                "packed %d linear layers for the decode step: %.0f MiB more memory",
                len(self.layers),
                self.nbytes / 2**20,
            )
        weakref.finalize(self, _release, self._ptrs)  # the list, not self: release() empties it

    def _pack(self, layer: nn.Linear) -> str | None:
        weight = layer.weight.detach()
        ptr = weight.data_ptr()
        with _registry_lock:
            entry = _registry.get(ptr)
            if entry is not None and entry.serves(weight):
                entry.users += 1
                self._ptrs.append(ptr)
                return None
        packed, reason = packed_copy(weight, None if layer.bias is None else layer.bias.detach(), self.batch_hint)
        if packed is None:
            return reason
        with _registry_lock:
            stale = _registry.get(ptr)  # a copy of this storage made before an in-place update: replaced
            users = 1 + (stale.users if stale is not None else 0)
            _registry[ptr] = _Entry(packed, weakref.ref(layer.weight), tuple(weight.shape), weight._version, users)
            self._ptrs.append(ptr)
        self.nbytes += weight.numel() * weight.element_size()
        return None

    @contextlib.contextmanager
    def routed(self) -> Iterator[None]:
        """Within the block, the packed layers run through `packed_linear`; their own forward is
        put back when the last block routing them (of any user, in any thread) ends, also on error."""
        layers = list(self.layers.values())
        with _registry_lock:
            for layer in layers:
                count, saved = _routes.get(id(layer), (0, layer.__dict__.get("forward")))
                if count == 0:
                    layer.forward = types.MethodType(_packed_forward, layer)  # type: ignore[method-assign]
                _routes[id(layer)] = (count + 1, saved)
        try:
            yield
        finally:
            with _registry_lock:
                for layer in layers:
                    count, saved = _routes.pop(id(layer))
                    if count > 1:
                        _routes[id(layer)] = (count - 1, saved)
                    elif saved is None:
                        layer.__dict__.pop("forward", None)
                    else:
                        layer.forward = saved  # type: ignore[method-assign,assignment]

    def release(self) -> None:
        """Drop this object's claim on its packed copies (a copy goes when its last user does)."""
        _release(self._ptrs)
        self.layers.clear()


def _release(ptrs: list[int]) -> None:
    with _registry_lock:
        for ptr in ptrs:
            entry = _registry.get(ptr)
            if entry is not None:
                entry.users -= 1
                if entry.users <= 0:
                    del _registry[ptr]
    ptrs.clear()
