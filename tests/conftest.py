"""Shared fixtures: temp databases (SQLite and the real PostgreSQL), temp Prefect home,
and a tiny random-weight model with the bundled SmolLM2 tokenizer."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

# Prefect reads these when it is imported: point them at a temp dir first, or cached task
# results leak between test runs.
_PREFECT_TMP = tempfile.mkdtemp(prefix="cai-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_TMP
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_TMP, "results")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the temporary Prefect server can need more than its default 20 s on a busy 2-core machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("CAI_DATABASE_URL", None)
# rich wraps CLI output at the terminal width, which differs between a developer shell and CI;
# fix it so assertions on printed messages do not depend on where the tests run
os.environ["COLUMNS"] = "200"
# tests compare engine outputs with direct fp32 forward passes to 1e-4; the engine's `auto` dtype
# would pick bf16 on CPUs where it is faster (tests that cover that choice unset this)
os.environ["CAI_CPU_DTYPE"] = "float32"

# Prefect reads its settings once, at import: here, from the environment above, not from whatever a
# test has monkeypatched when the first module that needs Prefect happens to import it
import prefect  # noqa: E402,F401
import pytest  # noqa: E402
import sqlalchemy as sa  # noqa: E402

PG_URL = os.environ.get("CAI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("CAI_REQUIRE_PG") == "1"


def _pg_available() -> str | None:
    try:
        eng = sa.create_engine(PG_URL)
        with eng.connect() as c:
            c.execute(sa.text("SELECT 1"))
        eng.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    err = _pg_available()
    if err:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required (CAI_REQUIRE_PG=1) but {PG_URL} is unreachable: {err}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {err}")
    return PG_URL


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CAI_REQUIRE_PG=1 (CI) a postgres-marked test that skips, for whatever reason, fails."""
    outcome = yield
    rep = outcome.get_result()
    if REQUIRE_PG and rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("postgres"):
        rep.outcome = "failed"
        rep.longrepr = f"PostgreSQL test skipped although CAI_REQUIRE_PG=1: {rep.longrepr}"


@pytest.fixture
def pg_url(pg_admin_url: str):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"cai_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    yield url
    from store.db import reset_engines

    reset_engines()
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    yield f"sqlite:///{tmp_path / 'cai.db'}"
    from store.db import reset_engines

    reset_engines()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """Runs the test once on SQLite and once on the real PostgreSQL server."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def use_db(db_url: str, monkeypatch) -> str:
    """Make db_url the default database (CAI_DATABASE_URL) for code under test."""
    monkeypatch.setenv("CAI_DATABASE_URL", db_url)
    return db_url


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from engines.bundled import gguf_tokenizer_dir

    return gguf_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), tokenizer_dir)
