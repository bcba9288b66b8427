"""Does steering work? Train value heads, then measure reward gains on held-out prompts.

For each objective (default: positivity, and conciseness, which pulls against it), train a
shared-backbone head with `mavis train`'s default recipe on the first --n-train prompts (the work
folders under --workdir make a rerun resume instead of retrain), then decode the next
--n-eval prompts, --seeds samples each, in one batched decode per iteration:

- base: all weights 0 (plain top-k sampling of SmolLM2);
- ``<objective> it<i>``: that objective at weight 1 with the iteration-i head, same seeds.

and print, per objective and iteration: the mean reward and its gain over base in units of
the base rewards' standard deviation, with a 95% cluster-bootstrap interval over prompts of the
paired differences (same prompt, same seed); the other objective's reward; the KL from the base
(full distribution) and from its top-k (what the steering costs);
and whether iteration 1 beats iteration 0 at the same beta. The base rows of the two decodes
must agree exactly (they are the same seeds with zero weights), which is checked.

    python benchmarks/steering.py                                  # the full experiment (~1 h on 2 cores)
    python benchmarks/steering.py --n-train 32 --n-eval 16         # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mavis_lc.bootstrap import mean_ci
from mavis_lc.langchain import ChatMavis
from mavis_lc.objectives import get_objective
from mavis_lc.training import TrainingConfig, TrainingResult, load_prompts, train_objective

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"


def train(objective: str, config: TrainingConfig, workdir: Path) -> tuple[TrainingResult, float]:
    last = [""]

    def progress(stage: str, iteration: int, step: int, total: int, metrics: dict[str, float]) -> None:
        label = f"{objective} iteration {iteration}: {stage}"
        if label != last[0]:
            print(f"  [{time.strftime('%H:%M:%S')}] {label} ({total} steps)", flush=True)
            last[0] = label

    start = time.perf_counter()
    result = train_objective(replace(config, objective=objective), progress=progress, workdir=workdir / objective)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(DATA), help="prompt source (HH-RLHF jsonl.gz, .jsonl or .txt)")
    parser.add_argument("--objectives", nargs=2, default=["positivity", "conciseness"], help="two objectives")
    parser.add_argument("--n-train", type=int, default=256, help="training prompts (the first of the source)")
    parser.add_argument("--n-eval", type=int, default=64, help="held-out prompts (the next ones)")
    parser.add_argument("--seeds", type=int, default=2, help="samples per held-out prompt")
    parser.add_argument(
        "--beta", type=float, default=TrainingConfig().beta, help="guidance strength (the training default)"
    )
    parser.add_argument("--workdir", default="benchmarks/results/steering", help="training work folders and output")
    args = parser.parse_args()

    prompts = load_prompts(args.prompts, args.n_train + args.n_eval)
    train_prompts, eval_prompts = prompts[: args.n_train], prompts[args.n_train :]
    if len(eval_prompts) < args.n_eval:
        raise SystemExit(f"{args.prompts} has {len(prompts)} prompts; need {args.n_train + args.n_eval}")
    workdir = Path(args.workdir)
    # `mavis train`'s default recipe: the training beta is the evaluation's, leaves are 48-token responses.
    config = TrainingConfig(prompts=train_prompts, beta=args.beta, rollout_cache_dir=str(workdir / "rollouts"))
    max_tokens = config.leaf_completion_tokens
    results: dict[str, TrainingResult] = {}
    for objective in args.objectives:
        print(f"training {objective} on {len(train_prompts)} prompts", flush=True)
        results[objective], seconds = train(objective, config, workdir)
        print(f"  {objective}: {seconds:.1f} s (a rerun that resumed finished stages counts only the rest)")
        for it in results[objective].iterations:
            print(f"  iteration {it.iteration}: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(it.metrics.items())))

    a, b = args.objectives
    names = [get_objective(o).name for o in args.objectives]
    rows = [(p, s) for p in eval_prompts for s in range(args.seeds)]
    settings = [{names[0]: 0.0, names[1]: 0.0}, {names[0]: 1.0, names[1]: 0.0}, {names[0]: 0.0, names[1]: 1.0}]
    rewards: dict[tuple[int, int], dict[str, list[float]]] = {}  # (iteration, setting) -> objective -> rewards
    kls: dict[tuple[int, int], list[float]] = {}
    kls_topk: dict[tuple[int, int], list[float]] = {}
    prompt_of = [i // args.seeds for i in range(len(rows))]
    for iteration in range(config.n_iterations):
        heads = [str(results[o].iterations[iteration].artifact_path) for o in args.objectives]
        chat = ChatMavis(heads=heads, beta=args.beta, max_tokens=max_tokens, min_tokens=1, top_k=config.top_k)
        inputs = [p for _ in settings for p, _ in rows]
        configs: Any = [{"configurable": {"mavis": {"weights": w, "seed": s}}} for w in settings for _, s in rows]
        start = time.perf_counter()
        messages = chat.batch(inputs, configs)
        seconds = time.perf_counter() - start
        print(f"decoded {len(inputs)} responses with the iteration-{iteration} heads in {seconds:.0f} s")
        texts = [str(m.content) for m in messages]
        scores = {o: get_objective(o).score(inputs, texts) for o in args.objectives}
        n = len(rows)
        for k in range(len(settings)):
            rewards[iteration, k] = {o: scores[o][k * n : (k + 1) * n] for o in args.objectives}
            kls[iteration, k] = [float(m.response_metadata["kl"]) for m in messages[k * n : (k + 1) * n]]
            kls_topk[iteration, k] = [float(m.response_metadata["kl_topk"]) for m in messages[k * n : (k + 1) * n]]
    if rewards[0, 0] != rewards[1, 0]:
        raise SystemExit("the zero-weight rows of the two decodes differ: base sampling is not reproducible")

    report: dict[str, Any] = {"args": vars(args), "objectives": {}}
    print(f"\n{len(eval_prompts)} held-out prompts x {args.seeds} seeds, beta {args.beta}, ", end="")
    print(f"max {max_tokens} tokens")
    print(
        "| steered | iteration | its reward (base) | gain in base SD [95% CI] | other objective | KL (base) "
        "| KL top-k |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, objective in ((1, a), (2, b)):
        other = b if objective == a else a
        base = rewards[0, 0][objective]
        sd = statistics.stdev(base)
        entry: dict[str, Any] = {"base_mean": statistics.fmean(base), "base_sd": sd, "iterations": []}
        for iteration in range(config.n_iterations):
            steered = rewards[iteration, k][objective]
            gain, low, high = mean_ci([(x - y) / sd for x, y in zip(steered, base, strict=True)], prompt_of)
            kl, kl_low, kl_high = mean_ci(kls[iteration, k], prompt_of)
            kl_topk = statistics.fmean(kls_topk[iteration, k])
            entry["iterations"].append(
                {
                    "iteration": iteration,
                    "mean": statistics.fmean(steered),
                    "gain_sd": gain,
                    "gain_ci": [low, high],
                    "other_mean": statistics.fmean(rewards[iteration, k][other]),
                    "kl": kl,
                    "kl_ci": [kl_low, kl_high],
                    "kl_topk": kl_topk,
                }
            )
            print(
                f"| {objective} | {iteration} | {statistics.fmean(steered):+.3f} ({statistics.fmean(base):+.3f}) "
                f"| {gain:+.2f} [{low:+.2f}, {high:+.2f}] "
                f"| {other} {statistics.fmean(rewards[iteration, k][other]):+.3f} "
                f"({statistics.fmean(rewards[0, 0][other]):+.3f}) "
                f"| {kl:.1f} [{kl_low:.1f}, {kl_high:.1f}] ({statistics.fmean(kls[0, 0]):.1f}) | {kl_topk:.1f} |"
            )
        s0, s1 = rewards[0, k][objective], rewards[1, k][objective]
        entry["it1_minus_it0_sd"] = list(mean_ci([(x - y) / sd for x, y in zip(s1, s0, strict=True)], prompt_of))
        report["objectives"][objective] = entry
    for objective, entry in report["objectives"].items():
        diff, low, high = entry["it1_minus_it0_sd"]
        verdict = "beats" if low > 0 else ("trails" if high < 0 else "does not differ from")
        print(
            f"{objective}: iteration 1 {verdict} iteration 0 at beta {args.beta}: "
            f"{diff:+.2f} base SD [{low:+.2f}, {high:+.2f}]"
        )
    out = workdir / f"steering-beta{args.beta:g}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
