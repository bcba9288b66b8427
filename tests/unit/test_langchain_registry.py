"""MavisLLM resolving heads and presets through the registry (SQLite, local artifact store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mavis_lc import MavisLLM
from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.errors import ArtifactError, IncompatibleHeadError, NotFoundError
from mavis_lc.registry import Registry
from mavis_lc.value_models import ValueHeadConfig, new_shared_head


@pytest.fixture
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir))


def register(registry: Registry, base: BaseModel, objective: str, seed: int) -> int:
    head = new_shared_head(base, objective)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    info = registry.register_version(
        objective,
        head.to_bytes(),
        base_model_id=base.model_id,
        tokenizer_fingerprint=base.fingerprint,
        architecture={"architecture": head.config.architecture},
        iteration=0,
        training_params={},
        metrics={},
        normalization={"mean": 0.0, "std": 1.0},
    )
    return info.version


def test_specs_aliases_and_presets_resolve_to_registered_heads(base: BaseModel, tiny_model_dir: Path) -> None:
    registry = Registry()
    register(registry, base, "positivity", 1)
    v2 = register(registry, base, "positivity", 2)
    register(registry, base, "conciseness", 3)
    registry.set_alias("positivity", "production", 1)
    llm = MavisLLM(base_model=str(tiny_model_dir), max_tokens=10, beta=3.0, seed=0)

    production = llm.model_copy(update={"heads": ["positivity@production"]})
    latest = llm.model_copy(update={"heads": ["positivity"]})
    out = production.generate(["Hello"], weights={"positivity": 1.0})
    assert out.generations[0][0].generation_info["heads"][0]["version"] == 1  # type: ignore[index]
    assert latest.generate(["Hello"]).generations[0][0].generation_info["heads"][0]["version"] == v2  # type: ignore[index]
    assert production.invoke("Hello") != latest.invoke("Hello")

    registry.create_preset("balanced", {"positivity": 0.5, "conciseness": 0.5}, pinned_specs=["positivity@production"])
    preset = llm.model_copy(update={"preset": "balanced"})
    info = preset.generate(["Hello"]).generations[0][0].generation_info or {}
    assert info["weights"] == {"positivity": 0.5, "conciseness": 0.5}
    assert {(h["objective"], h["version"]) for h in info["heads"]} == {("positivity", 1), ("conciseness", 1)}
    explicit = MavisLLM(
        base_model=str(tiny_model_dir), max_tokens=10, beta=3.0, seed=0, heads=["positivity@1", "conciseness@1"]
    )
    assert preset.invoke("Hello") == explicit.invoke("Hello", weights={"positivity": 0.5, "conciseness": 0.5})


def test_unknown_specs_list_what_exists(base: BaseModel, tiny_model_dir: Path) -> None:
    register(Registry(), base, "positivity", 1)
    llm = MavisLLM(base_model=str(tiny_model_dir), heads=["positivity@staging"])
    with pytest.raises(NotFoundError, match="staging"):
        llm.invoke("Hello")
    with pytest.raises(NotFoundError, match="positivity"):
        MavisLLM(base_model=str(tiny_model_dir), heads=["humour"]).invoke("Hello")


def test_tampered_artifact_is_refused(base: BaseModel, tiny_model_dir: Path) -> None:
    registry = Registry()
    register(registry, base, "positivity", 4)
    info = registry.resolve("positivity@1")
    path = registry.fetch_artifact(info)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        MavisLLM(base_model=str(tiny_model_dir), heads=["positivity@1"]).invoke("Hello")


def test_head_for_another_tokenizer_is_refused(base: BaseModel, tiny_model_dir: Path, tmp_path: Path) -> None:
    head = new_shared_head(base, "positivity")
    head.config = ValueHeadConfig(**{**head.config.__dict__, "tokenizer_fingerprint": "0" * 64})
    path = head.save(tmp_path / "foreign.safetensors")
    with pytest.raises(IncompatibleHeadError, match="tokenizer 000000000000"):
        MavisLLM(base_model=str(tiny_model_dir), heads=[str(path)]).invoke("Hello")


def test_resolution_is_once_per_object_and_never_stale(
    base: BaseModel, tiny_model_dir: Path, request: pytest.FixtureRequest
) -> None:
    from langchain_core.caches import InMemoryCache
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    registry = Registry()
    register(registry, base, "positivity", 1)
    register(registry, base, "positivity", 2)
    registry.set_alias("positivity", "prod", 1)
    queries: list[str] = []

    def count(*args: object) -> None:  # every statement of every SQLAlchemy engine
        queries.append(str(args[2]))

    event.listen(Engine, "before_cursor_execute", count)
    request.addfinalizer(lambda: event.remove(Engine, "before_cursor_execute", count))
    cache = InMemoryCache()
    first = MavisLLM(base_model=str(tiny_model_dir), heads=["positivity@prod"], max_tokens=6, beta=3.0, cache=cache)
    before = first.generate(["Hello"], seed=1).generations[0][0]
    resolved = len(queries)
    assert resolved > 0
    for _ in range(3):  # later calls of the same object query nothing, cached or not
        first.generate(["Hello"], seed=1)
        first.generate(["Hello again"], seed=2)
    assert queries[resolved:] == []
    registry.set_alias("positivity", "prod", 2)
    second = MavisLLM(base_model=str(tiny_model_dir), heads=["positivity@prod"], max_tokens=6, beta=3.0, cache=cache)
    after = second.generate(["Hello"], seed=1).generations[0][0]
    assert [h["version"] for h in (before.generation_info or {})["heads"]] == [1]
    assert [h["version"] for h in (after.generation_info or {})["heads"]] == [2]  # not the cached version-1 answer
    assert first.generate(["Hello"], seed=1).generations[0][0].generation_info["heads"][0]["version"] == 1  # type: ignore[index]
    assert first.refresh().generate(["Hello"], seed=1).generations[0][0].generation_info["heads"][0]["version"] == 2  # type: ignore[index]

    # A preset changed between two objects' calls: the second decodes (and caches) with the new weights.
    register(registry, base, "conciseness", 3)
    registry.create_preset("mix", {"positivity": 1.0, "conciseness": 0.0}, pinned_specs=["positivity@prod"])
    one = MavisLLM(base_model=str(tiny_model_dir), preset="mix", max_tokens=6, beta=3.0, cache=cache)
    info_one = one.generate(["Hello"], seed=1).generations[0][0].generation_info or {}
    registry.create_preset(
        "mix", {"positivity": 0.0, "conciseness": 1.0}, pinned_specs=["positivity@prod"], replace=True
    )
    two = MavisLLM(base_model=str(tiny_model_dir), preset="mix", max_tokens=6, beta=3.0, cache=cache)
    info_two = two.generate(["Hello"], seed=1).generations[0][0].generation_info or {}
    assert info_one["weights"] == {"positivity": 1.0, "conciseness": 0.0}
    assert info_two["weights"] == {"positivity": 0.0, "conciseness": 1.0}


def test_seed_none_gives_fresh_samples_and_a_fixed_seed_repeats(base: BaseModel, tiny_model_dir: Path) -> None:
    llm = MavisLLM(base_model=str(tiny_model_dir), max_tokens=12)
    assert len({llm.invoke("Hello") for _ in range(4)}) > 1
    assert len({llm.invoke("Hello", seed=7) for _ in range(3)}) == 1


def test_latest_and_aliases_resolve_among_versions_trained_on_the_loaded_base(
    base: BaseModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.tiny import build_tiny_model

    other_dir = build_tiny_model(tmp_path / "sibling", seed=1)  # same tokenizer, other weights
    other = load_base_model(str(other_dir))
    registry = Registry()
    mine = register(registry, base, "positivity", 1)
    theirs = register(registry, other, "positivity", 2)  # the newest version, for the sibling base
    assert registry.resolve("positivity@2").base_weights_fingerprint == other.weights_fingerprint
    registry.set_alias("positivity", "prod", theirs)

    llm = MavisLLM(base_model=str(tiny_model_dir), heads=["positivity"], max_tokens=4, seed=0)
    heads = llm.generate(["Hello"]).generations[0][0].generation_info["heads"]  # type: ignore[index]
    assert heads[0]["version"] == mine  # @latest among this base's versions, not the newest overall
    sibling = MavisLLM(base_model=str(other_dir), heads=["positivity@latest"], max_tokens=4, seed=0)
    assert sibling.generate(["Hello"]).generations[0][0].generation_info["heads"][0]["version"] == theirs  # type: ignore[index]

    pinned = MavisLLM(base_model=str(tiny_model_dir), heads=["positivity@prod"], max_tokens=4)
    with pytest.raises(IncompatibleHeadError, match=r"positivity@2, trained on base .*sibling.*allow_other_base"):
        pinned.invoke("Hello")
    transfer = pinned.model_copy(update={"allow_other_base": True})
    assert transfer.generate(["Hello"]).generations[0][0].generation_info["heads"][0]["version"] == theirs  # type: ignore[index]

    register(registry, other, "conciseness", 3)  # trained on the sibling only
    with pytest.raises(IncompatibleHeadError, match="'conciseness' has no ready version trained on the loaded base"):
        MavisLLM(base_model=str(tiny_model_dir), heads=["conciseness"], max_tokens=4).invoke("Hello")


def test_objects_sharing_an_engine_report_their_own_specs_and_versions(base: BaseModel, tiny_model_dir: Path) -> None:
    registry = Registry()
    register(registry, base, "positivity", 5)
    registry.set_alias("positivity", "prod", 1)
    path = str(registry.fetch_artifact(registry.resolve("positivity@1")))
    by_file = MavisLLM(base_model=str(tiny_model_dir), heads=[path], max_tokens=4, seed=0)
    by_alias = MavisLLM(base_model=str(tiny_model_dir), heads=["positivity@prod"], max_tokens=4, seed=0)
    assert by_file.engine() is by_alias.engine()  # the same weights: one engine
    file_heads = by_file.generate(["Hi"]).generations[0][0].generation_info["heads"]  # type: ignore[index]
    alias_heads = by_alias.generate(["Hi"]).generations[0][0].generation_info["heads"]  # type: ignore[index]
    assert (file_heads[0]["spec"], file_heads[0]["version"]) == (path, None)
    assert (alias_heads[0]["spec"], alias_heads[0]["version"]) == ("positivity@prod", 1)
