"""Host time per decoding step spent turning tokens into text: the decoder's text tracker with
incremental detokenisation (a `tokenizers` decode stream per row) against decoding each row's
whole token list every step (the tracker's path for tokenizers without a decode stream).

Feeds the same random token rows (SmolLM2's tokenizer, no stop strings, no EOS) through both
paths alternately in one process and prints the median milliseconds per step and their ratio.
The base model is not run: this is the host work around a forward, which a faster forward
leaves on the critical path.

    python benchmarks/detokenize.py
    python benchmarks/detokenize.py --batch 8 --tokens 512 --repeats 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from mavis_lc.base_model import load_base_model
    from mavis_lc.decoding.decoder import _TextTracker

    base = load_base_model()
    tok = base.tokenizer
    eos = set(base.eos_token_ids)
    rng = random.Random(0)
    special = set(tok.all_special_ids)
    pool = [i for i in range(len(tok)) if i not in special and i not in eos]
    rows = [[rng.choice(pool) for _ in range(args.tokens)] for _ in range(args.batch)]

    def run(incremental: bool) -> float:
        tracker = _TextTracker(tok, [[] for _ in rows], eos, len(rows))
        if not incremental:
            tracker._streams = None
        start = time.perf_counter()
        for step in range(args.tokens):
            tracker.push([r[step] for r in rows], last_step=[step == args.tokens - 1] * len(rows))
        elapsed = time.perf_counter() - start
        assert all(tracker.final_text), "every row should have ended at its length limit"
        return 1e3 * elapsed / args.tokens

    stream, whole = [], []
    for _ in range(args.repeats):
        whole.append(run(False))
        stream.append(run(True))
    s, w = statistics.median(stream), statistics.median(whole)
    print(f"batch {args.batch}, {args.tokens} tokens per row, {args.repeats} alternating runs, medians")
    print(f"whole-row decode every step: {w:.3f} ms/step")
    print(f"decode stream:               {s:.3f} ms/step")
    print(f"stream / whole: {s / w:.3f}  (whole / stream: {w / s:.1f}x)")


if __name__ == "__main__":
    main()
