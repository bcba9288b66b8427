"""Decoding: the MAVIS decoder, grammars, the engine that holds a base model and its heads,
and the scheduler that merges concurrent calls into batches.

- `noise`: each row's sampling noise, as `torch.multinomial` draws it from the row's seed;
- `grammar`: grammars (JSON schema, regex, Lark) compiled to per-row token masks;
- `packed_linear`, `static_step`: the compiled static-cache step of the base (and side branches);
- `decoder`: `MavisDecoder` and `mavis_step`, the tilted next-token distribution;
- `scheduler`: `BatchScheduler`, one decoding thread per engine;
- `engine`: `MavisEngine`, heads resolved from files or the registry, cached per process.

Each module imports only the ones above it in this list.
"""

from mavis_lc.decoding.decoder import (
    DecodeConfig,
    Generation,
    MavisDecoder,
    RowOptions,
    StepOutput,
    StreamStep,
    mavis_step,
)

__all__ = ["DecodeConfig", "Generation", "MavisDecoder", "RowOptions", "StepOutput", "StreamStep", "mavis_step"]
