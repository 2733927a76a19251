from pathlib import Path

import pytest
from _harness import all_jobs, launch


@pytest.fixture(scope="session")
def dist_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run all 2-process jobs once (bounded by a timeout); their results live here."""
    out = tmp_path_factory.mktemp("dist")
    launch(all_jobs, out, world=2, timeout=150.0)
    return out
