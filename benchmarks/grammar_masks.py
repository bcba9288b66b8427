"""Per-token grammar-mask cost on the base's vocabulary: llguidance (used) against xgrammar.

For a JSON schema and a tool-call Lark grammar, every token of a fixed valid answer is fed to
the matcher and the time to compute the next-token mask before it is recorded (median and
95th percentile, microseconds), as the decoder does once per constrained row and step. The
ratio against one SmolLM2 batch-1 decoding step (about 20-40 ms on 2 cores) is what matters.

    python benchmarks/grammar_masks.py
    PYTHONPATH=/path/to/xgrammar python benchmarks/grammar_masks.py   # xgrammar too, if importable
"""

from __future__ import annotations

import json
import statistics
import time

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding.grammar import Grammar, GrammarCompiler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ANSWER = '{"name":"Ada Lovelace","age":36,"tags":["mathematics","poetry","engines"]}'


def llguidance_times(base: BaseModel, repeats: int) -> tuple[float, list[float]]:
    compiler = GrammarCompiler(base.tokenizer, base.vocab_size, base.eos_token_ids)
    compiler.constraint(Grammar.json_schema({"type": "integer"}))  # builds the tokenizer view once
    started = time.perf_counter()
    compiler.constraint(Grammar.json_schema(SCHEMA))
    compile_s = time.perf_counter() - started
    ids = base.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    times = []
    for _ in range(repeats):
        row = compiler.constraint(Grammar.json_schema(SCHEMA))
        for token in ids:
            t = time.perf_counter()
            row.allowed()
            times.append(time.perf_counter() - t)
            row.consume(token)
    return compile_s, times


def xgrammar_times(base: BaseModel, repeats: int) -> tuple[float, list[float]] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    info = xgr.TokenizerInfo.from_huggingface(base.tokenizer, vocab_size=base.vocab_size)
    compiler = xgr.GrammarCompiler(info)
    compiler.compile_json_schema(json.dumps({"type": "integer"}))
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - started
    ids = base.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for _ in range(repeats):
        matcher = xgr.GrammarMatcher(compiled)
        for token in ids:
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - t)
            assert matcher.accept_token(token)
    return compile_s, times


def main() -> None:
    base = load_base_model()
    n = len(base.tokenizer(ANSWER)["input_ids"])
    print(f"base {base.model_id}, vocabulary {base.vocab_size}, answer of {n} tokens")
    for name, result in (("llguidance", llguidance_times(base, 20)), ("xgrammar", xgrammar_times(base, 20))):
        if result is None:
            print(f"{name}: not importable")
            continue
        compile_s, times = result
        us = sorted(t * 1e6 for t in times)
        p95 = us[int(0.95 * (len(us) - 1))]
        median = statistics.median(us)
        print(f"{name}: compile {compile_s * 1e3:.1f} ms; mask per token median {median:.0f} us, p95 {p95:.0f} us")


if __name__ == "__main__":
    main()
