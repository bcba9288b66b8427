"""Constrained and steered at once: a JSON schema with a free-text ``reply``, positivity at weight 1 against 0.

Everyday questions (written here, unlike HH-RLHF) x seeds are answered by ChatMavis under the
schema ``{"reply": string of at most 240 characters}`` with the positivity head at weight 0
(plain top-k sampling of the base, constrained) and at weight 1, same seeds. Every output is
checked to be valid JSON of that schema; the positivity of ``reply`` is scored with the
objective's reward, and the gain is given in base standard deviations with a 95% cluster
bootstrap interval over the questions (paired: both rows resample the same questions).
Compute: one base forward per token for both rows.

    python benchmarks/constrained_steering.py --head positivity@latest
    python benchmarks/constrained_steering.py --head path/to/positivity.safetensors --beta 4 --seeds 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mavis_lc import ChatMavis
from mavis_lc.bootstrap import interval, prompt_means, resample_prompts
from mavis_lc.decoding.grammar import Grammar
from mavis_lc.objectives import get_objective

QUESTIONS = [
    "How was your weekend?",
    "What should I cook for dinner tonight?",
    "My train is late again. What do you think?",
    "Can you describe the weather today?",
    "What do you think of Mondays?",
    "How do I feel about moving to a new city?",
    "Tell me about your favourite season.",
    "What is it like to start a new job?",
    "My phone screen cracked this morning.",
    "What do you think about learning to swim as an adult?",
    "How would you describe a long queue at the post office?",
    "I have an exam tomorrow. Any thoughts?",
    "What is your opinion of rainy days?",
    "Describe a busy supermarket on Saturday.",
    "How do you feel about cleaning the kitchen?",
    "My neighbour plays loud music at night.",
    "What do you think of camping in the mountains?",
    "How was the traffic on your way home?",
    "What is good about getting up early?",
    "Describe your last visit to the dentist.",
]
SCHEMA = {
    "type": "object",
    "properties": {"reply": {"type": "string", "maxLength": 240}},
    "required": ["reply"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", required=True, help="positivity head: registry spec or path")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--beta", type=float, default=4.0)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    objective = get_objective("positivity")
    chat = ChatMavis(
        heads=[args.head],
        max_tokens=args.max_tokens,
        top_k=args.top_k,
        beta=args.beta,
        grammar=Grammar.json_schema(SCHEMA),
    )
    name = chat.engine().objectives[0]
    inputs = [q for q in QUESTIONS for _ in range(args.seeds)]
    seeds = [s for _ in QUESTIONS for s in range(args.seeds)]
    prompt_of = [i for i in range(len(QUESTIONS)) for _ in range(args.seeds)]
    scores: dict[float, list[float]] = {}
    kl_topk: dict[float, list[float]] = {}
    for weight in (0.0, 1.0):
        messages = chat.batch(inputs, weights=[{name: weight}] * len(inputs), seed=seeds)
        replies = []
        for message in messages:
            data = json.loads(message.content)  # raises on an invalid output
            assert set(data) == {"reply"} and len(data["reply"]) <= 240, data
            assert message.response_metadata["grammar_complete"], message.response_metadata
            replies.append(data["reply"])
        scores[weight] = objective.score(inputs, replies)
        kl_topk[weight] = [float(m.response_metadata["kl_topk"]) for m in messages]
        print(f"weight {weight}: {len(messages)} outputs, all valid JSON; e.g. {messages[0].content[:100]!r}")
    n = len(QUESTIONS)
    base = prompt_means(scores[0.0], prompt_of, n)
    steered = prompt_means(scores[1.0], prompt_of, n)
    sd = float(np.std(scores[0.0]))
    draws = resample_prompts(n)
    gain = (steered - base).mean() / sd
    low, high = interval((steered[draws] - base[draws]).mean(1) / sd)
    kl = prompt_means(kl_topk[1.0], prompt_of, n)
    kl_low, kl_high = interval(kl[draws].mean(1))
    print(
        f"positivity of reply: weight 0 {base.mean():+.3f}, weight 1 {steered.mean():+.3f} (raw); "
        f"gain {gain:+.2f} base SD [{low:+.2f}, {high:+.2f}] over {n} questions x {args.seeds} seeds, "
        f"beta {args.beta}; kl_topk at weight 1 {kl.mean():.2f} [{kl_low:.2f}, {kl_high:.2f}]"
    )


if __name__ == "__main__":
    main()
