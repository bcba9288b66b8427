"""A LangChain client of a vLLM server that runs the mavis_lc.vllm plugin (docs/serving-vllm.md).

    python examples/vllm_client.py --base-url http://127.0.0.1:8000/v1 --model smollm2 \\
        --weights positivity=1 --weights positivity=0

Each weighting answers the same question with the same seed; with --score the answers are scored
with the objectives they were steered toward (needs the objectives extra).
"""

from __future__ import annotations

import argparse

from langchain_openai import ChatOpenAI

from mavis_lc.vllm import vllm_xargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2", help="the server's --served-model-name")
    parser.add_argument("--weights", action="append", default=None, help="objective=weight[,objective=weight]")
    parser.add_argument("--beta", type=float, default=4.0)
    parser.add_argument("--question", default="My flight got cancelled and I have to wait until tomorrow.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", action="store_true", help="score each answer with its objectives")
    args = parser.parse_args()

    llm = ChatOpenAI(
        base_url=args.base_url, api_key="unused", model=args.model, max_tokens=args.max_tokens, seed=args.seed
    )
    for spec in args.weights or ["positivity=1", "positivity=0"]:
        weights = {name: float(value) for name, value in (part.split("=") for part in spec.split(","))}
        steered = llm.bind(extra_body={"vllm_xargs": vllm_xargs(weights, beta=args.beta)})
        answer = str(steered.invoke(args.question).content)
        line = f"{spec:>24}: {answer!r}"
        if args.score:
            from mavis_lc.objectives import get_objective

            scores = {name: get_objective(name).score([args.question], [answer])[0] for name in weights}
            line += "  " + ", ".join(f"{n} {s:+.3f}" for n, s in scores.items())
        print(line)


if __name__ == "__main__":
    main()
