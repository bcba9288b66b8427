"""Tree rollouts: shape of the trees, determinism, sharding, recorded features and log-ratios."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import mavis_step
from mavis_lc.errors import ConfigurationError, TrainingCancelled
from mavis_lc.training import TrainingConfig, TreeRollouts, format_prompts, merge_rollouts, sample_trees
from mavis_lc.training.rollouts import _sample_step, planned_tokens
from mavis_lc.value_models import new_separate_backbone, new_shared_head

CONFIG = TrainingConfig(
    k_root=3, k_children=2, n_layers=3, segment_min_tokens=2, segment_max_tokens=5, t_max_tokens=200,
    rollout_prompts_per_batch=2, top_k=8, expand_top_m=0, leaf_completion_tokens=0,
)  # fmt: skip
TEXTS = ["I love cats", "The weather is awful", "Tell me a story", "Numbers 1 2 3", "Hi"]


@pytest.fixture
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")


def prompts(base: BaseModel) -> list[str]:
    return format_prompts(base.tokenizer, TEXTS)


def assert_same(a: TreeRollouts, b: TreeRollouts) -> None:
    assert a.prompts == b.prompts and a.first_prompt == b.first_prompt
    names = ("node_prompt", "node_parent", "node_start", "node_length", "node_eos", "tokens", "log_ratio", "log_z_k")
    for name in names:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.hidden, b.hidden)


def test_trees_have_the_configured_shape(base: BaseModel) -> None:
    config = replace(CONFIG, t_max_tokens=10_000)
    rollouts = sample_trees(base, prompts(base), config)
    eos = set(base.eos_token_ids)
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(rollouts.node_parent.tolist()):
        children.setdefault(parent, []).append(node)
    depth: dict[int, int] = {}
    for node, parent in enumerate(rollouts.node_parent.tolist()):
        depth[node] = 0 if parent < 0 else depth[parent] + 1
        segment = rollouts.tokens[rollouts.node_start[node] : rollouts.node_start[node] + rollouts.node_length[node]]
        if parent < 0:
            assert len(children[node]) == 3 and segment.numel() == 0
            continue
        ended = bool(rollouts.node_eos[node])
        assert ended == (int(segment[-1]) in eos)
        assert not any(int(t) in eos for t in segment[:-1])
        assert 1 <= segment.numel() <= 5 and (ended or segment.numel() >= 2)
        kids = children.get(node, [])
        if ended or depth[node] == 3:
            assert kids == []
        else:
            assert len(kids) == 2
    assert sorted(rollouts.leaves().tolist()) == [n for n in range(rollouts.n_nodes) if n not in children]


def test_token_budget_stops_adding_layers(base: BaseModel) -> None:
    config = replace(CONFIG, t_max_tokens=20)
    rollouts = sample_trees(base, prompts(base), config)
    per_tree = torch.zeros(len(TEXTS), dtype=torch.long).index_add_(0, rollouts.node_prompt, rollouts.node_length)
    assert int(per_tree.max()) <= 20
    tight = replace(CONFIG, t_max_tokens=4)  # the first layer is always sampled, shortened to fit
    small = sample_trees(base, prompts(base)[:1], tight)
    assert small.n_nodes == 4 and small.node_length.tolist() == [0, 1, 1, 1]


def test_same_seed_same_trees_other_seed_other_trees(base: BaseModel) -> None:
    first = sample_trees(base, prompts(base), CONFIG)
    assert_same(first, sample_trees(base, prompts(base), CONFIG))
    other = sample_trees(base, prompts(base), replace(CONFIG, seed=1))
    assert not torch.equal(first.node_length, other.node_length) or not torch.equal(first.tokens, other.tokens)


def test_shards_merge_into_the_unsharded_run(base: BaseModel) -> None:
    texts = prompts(base)
    whole = sample_trees(base, texts, CONFIG)
    shards = [
        sample_trees(base, texts[4:], CONFIG, first_prompt=4),
        sample_trees(base, texts[:2], CONFIG),
        sample_trees(base, texts[2:4], CONFIG, first_prompt=2),
    ]
    assert_same(merge_rollouts(shards), whole)
    with pytest.raises(ConfigurationError, match="multiple of rollout_prompts_per_batch"):
        sample_trees(base, texts[1:], CONFIG, first_prompt=1)
    with pytest.raises(ConfigurationError, match="not consecutive"):
        merge_rollouts([shards[1], shards[0]])


def test_recorded_hidden_states_and_log_ratios_match_a_fresh_forward(base: BaseModel) -> None:
    texts = prompts(base)
    rollouts = sample_trees(base, texts, replace(CONFIG, top_k=base.vocab_size))
    # With top_k = vocabulary, plain sampling is pi_ref itself: every log-ratio is 0.
    assert rollouts.log_ratio.abs().max() < 1e-5
    token_node = rollouts.token_node()
    for leaf in rollouts.leaves().tolist()[:: max(1, rollouts.leaves().numel() // 6)]:
        prompt_ids = base.tokenizer(texts[int(rollouts.node_prompt[leaf])])["input_ids"]
        response = rollouts.response_tokens(leaf)
        ids = torch.tensor([prompt_ids + response])
        with torch.no_grad():
            h = base.model.base_model(input_ids=ids).last_hidden_state[0]  # (len, d)
        states = h[len(prompt_ids) - 1 : -1]  # h(s_t) before each response token
        positions = [t for t in range(rollouts.tokens.numel()) if int(token_node[t]) in _ancestors(rollouts, leaf)]
        assert torch.equal(rollouts.tokens[positions], torch.tensor(response))
        torch.testing.assert_close(rollouts.hidden[positions], states, atol=1e-4, rtol=1e-4)


def _ancestors(rollouts: TreeRollouts, node: int) -> set[int]:
    out = set()
    while node >= 0:
        out.add(node)
        node = int(rollouts.node_parent[node])
    return out


def test_rollouts_under_a_head_record_positive_log_ratios(base: BaseModel) -> None:
    texts = prompts(base)[:2]
    head = new_shared_head(base, "obj")
    with torch.no_grad():
        head.token_bias.copy_(torch.randn(base.vocab_size) * 3)
    config = replace(CONFIG, top_k=base.vocab_size, beta=1.0)
    plain = sample_trees(base, texts, config)
    steered = sample_trees(base, texts, config, heads=[head])
    assert not torch.equal(plain.tokens[:20], steered.tokens[:20])
    assert steered.log_ratio.abs().max() > 1e-3
    # The mean log-ratio under pi is an estimate of KL(pi || pi_ref) >= 0.
    assert float(steered.log_ratio.mean()) > 0


def test_rollouts_under_a_separate_backbone_head(base: BaseModel) -> None:
    model = new_separate_backbone(base, "obj", n_layers=1, mode="scalar")
    with torch.no_grad():
        assert model.value is not None
        model.value.weight.normal_(0, 3.0)
    rollouts = sample_trees(base, prompts(base)[:3], CONFIG, heads=[model])
    again = sample_trees(base, prompts(base)[:3], CONFIG, heads=[model])
    assert_same(rollouts, again)
    assert rollouts.log_ratio.abs().max() > 1e-3


def test_save_load_round_trip_and_cancel(base: BaseModel, tmp_path: Path) -> None:
    rollouts = sample_trees(base, prompts(base)[:2], CONFIG)
    assert_same(TreeRollouts.load(rollouts.save(tmp_path / "r.safetensors")), rollouts)
    with pytest.raises(TrainingCancelled):
        sample_trees(base, prompts(base), CONFIG, should_cancel=lambda: True)


def test_rollout_step_samples_what_mavis_step_would(base: BaseModel) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, base.vocab_size, generator=generator) * 3  # (6, V)
    hidden = torch.randn(6, base.hidden_size, generator=generator)  # (6, d)
    head = new_shared_head(base, "obj")
    with torch.no_grad():
        head.token_bias.copy_(torch.randn(base.vocab_size, generator=generator))
    settings: dict[str, Any] = {"beta": 0.7, "top_k": 5, "temperature": 0.8}
    expected = mavis_step(logits, hidden, [head], torch.ones(6, 1), **settings, generators=None)
    rngs = [torch.Generator().manual_seed(i) for i in range(6)]
    tokens, log_ratio, log_z_k, log_prob, state_kl = _sample_step(logits, hidden, [head], **settings, generators=rngs)
    is_token = expected.candidates == tokens[:, None]  # (6, 5)
    assert bool(is_token.any(1).all())
    log_pi = expected.probs[is_token].log()  # (6,)
    torch.testing.assert_close(log_prob, log_pi)
    log_ref = torch.log_softmax(logits / 0.8, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(log_ratio, log_pi - log_ref)
    log_ref_k = torch.log_softmax(torch.gather(logits / 0.8, 1, expected.candidates), dim=-1)[is_token]  # (6,)
    torch.testing.assert_close(log_ratio + log_z_k, log_pi - log_ref_k)
    # The state's exact KL(pi || pi_ref^k) over its candidates: the expectation of that log-ratio.
    ref_k = torch.log_softmax(torch.gather(logits / 0.8, 1, expected.candidates), dim=-1)  # (6, 5)
    torch.testing.assert_close(state_kl, (expected.probs * (expected.probs.log() - ref_k)).sum(1))
    # Many rows in one state: the sampled frequencies are pi's.
    n = 4000
    many = [torch.Generator().manual_seed(i) for i in range(n)]
    tokens, _, _, _, _ = _sample_step(
        logits[:1].expand(n, -1), hidden[:1].expand(n, -1), [head], **settings, generators=many
    )
    frequency = (expected.candidates[0][:, None] == tokens[None, :]).double().mean(1)  # (5,)
    torch.testing.assert_close(frequency, expected.probs[0].double(), atol=0.03, rtol=0)
    # Forced ranks take the base's candidates in order of its probability (not the tilted pi's),
    # whatever the generator draws; their log pi is still the tilted policy's.
    forced = torch.tensor([0, 1, 2, 3, 4, -1])
    tokens, _, _, log_prob, _ = _sample_step(logits, hidden, [head], **settings, generators=rngs, forced=forced)
    by_base = (logits / 0.8).topk(5, dim=-1).indices  # (6, 5) most probable under pi_ref first
    for row in range(5):
        assert int(tokens[row]) == int(by_base[row, row])
        j = int((expected.candidates[row] == tokens[row]).nonzero())
        assert float(log_prob[row].exp()) == pytest.approx(float(expected.probs[row, j]), rel=1e-5)


def test_leaf_completion_samples_leaves_to_whole_responses(base: BaseModel) -> None:
    config = replace(CONFIG, t_max_tokens=10_000, leaf_completion_tokens=30)
    rollouts = sample_trees(base, prompts(base), config)
    plain = sample_trees(base, prompts(base), replace(config, leaf_completion_tokens=0))
    eos = set(base.eos_token_ids)
    leaves = set(rollouts.leaves().tolist())
    for node in range(rollouts.n_nodes):
        if int(rollouts.node_parent[node]) < 0:
            continue
        path = rollouts.response_tokens(node)
        if node in leaves:  # a whole response: it ended with EOS or reached 30 tokens
            assert path[-1] in eos or len(path) == 30
            assert len(path) <= 30
        else:  # inner segments are sampled as without completion
            assert int(rollouts.node_length[node]) <= 5
    assert int(rollouts.node_length.max()) > 5
    assert rollouts.n_nodes == plain.n_nodes  # the tree shape is the same; only the leaves grow
    with pytest.raises(ConfigurationError, match="leaf_completion_tokens"):
        replace(config, leaf_completion_tokens=-1).validate()


def test_eos_is_banned_at_the_first_response_token_by_default(base: BaseModel) -> None:
    # A head that makes EOS by far the best candidate, with every token a candidate.
    head = new_shared_head(base, "brevity")
    with torch.no_grad():
        head.token_bias[base.eos_token_ids[0]] = 100.0
    config = replace(CONFIG, k_root=2, n_layers=1, segment_min_tokens=3, segment_max_tokens=3, top_k=base.vocab_size)
    texts = prompts(base)[:2]
    rollouts = sample_trees(base, texts, config, heads=[head])
    eos = set(base.eos_token_ids)
    for node in rollouts.leaves().tolist():
        path = rollouts.response_tokens(node)
        assert path[0] not in eos and path[1] in eos  # banned first, then taken at once
    allowed = sample_trees(base, texts, replace(config, min_response_tokens=0), heads=[head])
    assert all(allowed.response_tokens(n)[0] in eos for n in allowed.leaves().tolist())
    longer = sample_trees(base, texts, replace(config, min_response_tokens=2), heads=[head])
    assert all(len(longer.response_tokens(n)) == 3 for n in longer.leaves().tolist())


def test_iterations_draw_fresh_randomness(base: BaseModel) -> None:
    first = sample_trees(base, prompts(base)[:2], CONFIG, iteration=0)
    assert_same(first, sample_trees(base, prompts(base)[:2], CONFIG, iteration=0))
    second = sample_trees(base, prompts(base)[:2], CONFIG, iteration=1)
    assert not torch.equal(first.node_length, second.node_length) or not torch.equal(first.tokens, second.tokens)


def test_context_check_counts_leaf_completion_beyond_the_budget(base: BaseModel) -> None:
    # Leaves complete to 1020 tokens whatever t_max_tokens says: with the prompt that overflows 1024.
    config = replace(CONFIG, t_max_tokens=10, leaf_completion_tokens=1020)
    with pytest.raises(ConfigurationError, match="no room"):
        sample_trees(base, prompts(base)[:1], config)


def test_planned_tokens_bound_the_rollouts_and_progress_reports_the_pace(base: BaseModel) -> None:
    texts = prompts(base)
    config = replace(CONFIG, leaf_completion_tokens=12)
    calls: list[tuple[int, int, dict[str, float]]] = []
    rollouts = sample_trees(base, texts, config, progress=lambda d, n, m: calls.append((d, n, m)))
    planned = planned_tokens(config, len(texts))
    assert rollouts.tokens.numel() <= planned
    assert calls[0] == (0, len(texts), {"tokens": 0, "tokens_per_s": 0.0, "planned_tokens": planned})
    done, total, last = calls[-1]
    assert (done, total, last["tokens"]) == (len(texts), len(texts), rollouts.tokens.numel())
    assert last["tokens_per_s"] > 0 and [c[0] for c in calls] == [0, 2, 4, 5]
    # With EOS banned throughout, every planned token is sampled: the plan is exact.
    no_eos = replace(config, min_response_tokens=10_000)
    assert sample_trees(base, texts, no_eos).tokens.numel() == planned_tokens(no_eos, len(texts))
    assert planned_tokens(config, 3, iteration=1) != planned_tokens(config, 3)  # plans are drawn per iteration


def test_expansion_forces_the_top_m_distinct_candidates_of_pi(base: BaseModel) -> None:
    config = replace(
        CONFIG, n_layers=2, expand_top_m=3, t_max_tokens=10_000, leaf_completion_tokens=12, ceiling_share=0.0
    )
    rollouts = sample_trees(base, prompts(base), config)
    parent = rollouts.node_parent.tolist()
    depth = [0] * rollouts.n_nodes
    for node, p in enumerate(parent):
        depth[node] = 0 if p < 0 else depth[p] + 1
    assert all(bool(rollouts.node_forced[n]) == (depth[n] == 2) for n in range(rollouts.n_nodes))
    groups: dict[int, list[int]] = {}
    for node in torch.nonzero(rollouts.node_forced).squeeze(1).tolist():
        groups.setdefault(parent[node], []).append(node)
    assert len(groups) == sum(1 for n in range(rollouts.n_nodes) if depth[n] == 1 and not rollouts.node_eos[n])
    lm_head = base.model.get_output_embeddings()
    for kids in groups.values():
        assert len(kids) == 3
        first = rollouts.node_start[kids]  # (3,) each child's forced first token
        state = rollouts.hidden[first]  # (3, d): all three read their parent's last state
        torch.testing.assert_close(state, state[:1].expand(3, -1))
        with torch.no_grad():
            logits, candidates = (lm_head(state[:1]).float() / config.temperature).topk(config.top_k)  # (1, k)
        assert rollouts.tokens[first].tolist() == candidates[0, :3].tolist()  # ranks 0, 1, 2 of pi = pi_ref^k
        expected = torch.log_softmax(logits, dim=-1)[0, :3]
        torch.testing.assert_close(rollouts.log_prob[first], expected, atol=1e-5, rtol=0)
    # Leaves are completed to exactly leaf_completion_tokens (or end with EOS).
    eos = set(base.eos_token_ids)
    for leaf in rollouts.leaves().tolist():
        path = rollouts.response_tokens(leaf)
        assert len(path) == 12 or path[-1] in eos
    assert planned_tokens(config, len(TEXTS)) >= rollouts.tokens.numel()
    with pytest.raises(ConfigurationError, match="expand_top_m 9 must be <= top_k 8"):
        replace(config, expand_top_m=9).validate()
    # With ceiling_share 1 every expanded candidate is continued twice, by its own generator.
    doubled = sample_trees(base, prompts(base), replace(config, ceiling_share=1.0))
    for state in {int(doubled.node_parent[n]) for n in torch.nonzero(doubled.node_forced).squeeze(1).tolist()}:
        kids = torch.nonzero(doubled.node_parent == state).squeeze(1)
        first = doubled.tokens[doubled.node_start[kids]].tolist()
        assert len(kids) == 6 and first[:3] == first[3:] and len(set(first)) == 3
        assert [doubled.response_tokens(int(k)) for k in kids[:3]] != [
            doubled.response_tokens(int(k)) for k in kids[3:]
        ]
    with pytest.raises(ConfigurationError, match="ceiling_share must be in"):
        replace(config, ceiling_share=1.5).validate()
