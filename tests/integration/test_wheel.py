"""The built wheel on its own: it carries the migrations and the Celery app, not the repository's
``worker/`` folder; ``mavis db upgrade`` and a worker run from it.

The wheel is unpacked into a folder and run with ``python -S`` (no site processing, so the
editable install of the checkout cannot shadow it), the machine's site-packages appended
after it for the dependencies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from tests.integration.workers import REDIS_HOST, SERVICES_REQUIRED, postgres_database, services_available

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w", str(out)],
        check=True,
        cwd=out,
        capture_output=True,
    )
    [wheel] = out.glob("mavis_lc-*.whl")
    target = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def run(site: Path, code: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[bytes]:
    boot = (
        f"import sys; sys.path[:0] = [{str(site)!r}]; sys.path.append({sysconfig.get_paths()['purelib']!r}); "
        "sys.path.append(" + repr(sysconfig.get_paths()["platlib"]) + "); "
    )
    return subprocess.Popen([sys.executable, "-S", "-c", boot + code], env=env, cwd=site, **kwargs)  # type: ignore[call-overload]


def test_the_wheel_carries_the_migrations_and_the_service_but_no_worker_folder(unpacked: Path) -> None:
    assert (unpacked / "mavis_lc" / "migrations" / "env.py").is_file()
    assert sorted(p.name for p in (unpacked / "mavis_lc" / "migrations" / "versions").glob("*.py")) == [
        "0001_initial.py",
        "0002_base_weights_fingerprint.py",
    ]
    assert (unpacked / "mavis_lc" / "service" / "app.py").is_file()
    assert not (unpacked / "worker").exists()
    # every module of the checkout's package is in the wheel (the package list is explicit)
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mavis_lc").rglob("*.py") if "migrations" not in p.parts)
    assert len(modules) > 60
    assert [m for m in modules if not (unpacked / m).is_file()] == []


@pytest.mark.skipif(not SERVICES_REQUIRED and not services_available(), reason="needs Redis and PostgreSQL")
def test_db_upgrade_on_sqlite_and_postgres_and_a_worker_from_the_wheel(unpacked: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAVIS_")}
    env["MAVIS_HOME"] = str(tmp_path / "home")
    upgrade = (
        "from mavis_lc.cli import app; import mavis_lc, sys; "
        f"assert mavis_lc.__file__.startswith({str(unpacked)!r}), mavis_lc.__file__; "
        "sys.argv = ['mavis', 'db', 'upgrade']; app()"
    )
    sqlite = run(unpacked, upgrade, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = sqlite.communicate(timeout=120)
    assert sqlite.returncode == 0 and b"revision 0002" in out, out.decode()
    with postgres_database() as url:
        postgres = run(
            unpacked, upgrade, {**env, "MAVIS_DATABASE_URL": url}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, _ = postgres.communicate(timeout=120)
        assert postgres.returncode == 0 and b"revision 0002" in out, out.decode()
        log = tmp_path / "worker.log"
        worker_env = {**env, "MAVIS_DATABASE_URL": url, "MAVIS_BROKER_URL": f"redis://{REDIS_HOST}:6379/14"}
        with log.open("wb") as sink:
            worker = run(
                unpacked,
                "import sys; from celery.__main__ import main; sys.argv = ['celery', '-A', 'mavis_lc.service.app', "
                "'worker', '-Q', 'wheel-test', '-c', '1', '--without-gossip', '--without-mingle', '--loglevel', "
                "'info']; main()",
                worker_env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                deadline = time.monotonic() + 120
                while b"ready." not in log.read_bytes() and time.monotonic() < deadline and worker.poll() is None:
                    time.sleep(0.5)
                text = log.read_text(errors="replace")
                assert "ready." in text and "mavis.train_objective" in text, text[-3000:]
            finally:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGTERM)
                    worker.wait(timeout=30)
