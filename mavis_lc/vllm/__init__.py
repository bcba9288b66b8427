"""MAVIS inside vLLM: registered heads steer a vLLM server, with weights chosen per request.

vLLM is never a dependency of mavis-lc: install it beside mavis-lc (docs/serving-vllm.md). The
plugin has three parts:

- `register` (the ``vllm.general_plugins`` entry point mavis-lc declares) registers the model
  classes ``MavisLlamaForCausalLM``, ``MavisMistralForCausalLM``, ``MavisQwen2ForCausalLM`` and
  ``MavisQwen3ForCausalLM`` (`mavis_lc.vllm.plugin`), selected with
  ``--hf-overrides '{"architectures": ["MavisLlamaForCausalLM"]}'``: vLLM's own classes that keep
  the final hidden states for the processor;
- ``--logits-processors mavis_lc.vllm.plugin:MavisLogitsProcessor`` steers the requests that
  carry ``mavis_*`` arguments (`mavis_lc.vllm.args`) with the heads named by the
  ``MAVIS_VLLM_HEADS`` environment variable (head files or registry specs, comma-separated);
- `vllm_xargs` builds a request's arguments on the client side (weights, a preset, beta, top-k).

This module imports neither vLLM nor torch.
"""

from __future__ import annotations

from mavis_lc.vllm.args import (
    BETA,
    TOP_K,
    WEIGHTS,
    MavisArgumentError,
    Steering,
    parse_steering,
    vllm_xargs,
)

PROCESSOR = "mavis_lc.vllm.plugin:MavisLogitsProcessor"
"""What ``--logits-processors`` (or ``LLM(logits_processors=[...])``) names."""
MODEL_CLASSES = ("MavisLlamaForCausalLM", "MavisMistralForCausalLM", "MavisQwen2ForCausalLM", "MavisQwen3ForCausalLM")
"""The architectures ``--hf-overrides '{"architectures": [...]}'`` may name."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the Mavis model classes (lazily, by
    name: vLLM imports `mavis_lc.vllm.plugin` only where it builds the model)."""
    from vllm import ModelRegistry

    for name in MODEL_CLASSES:
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"mavis_lc.vllm.plugin:{name}")


__all__ = [
    "BETA",
    "MODEL_CLASSES",
    "PROCESSOR",
    "TOP_K",
    "WEIGHTS",
    "MavisArgumentError",
    "Steering",
    "parse_steering",
    "register",
    "vllm_xargs",
]
