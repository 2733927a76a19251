"""The main job (examples/train_gpt.py) runs end to end on a tiny configuration."""

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_train_gpt_tiny(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_gpt
    finally:
        sys.path.remove(str(EXAMPLES))
    rows = train_gpt.main(["--steps", "4", "--n-layer", "1", "--d-model", "32", "--n-head", "2",
                           "--batch-size", "4", "--seq-len", "16", "--eval-every", "2",
                           "--eval-batches", "1", "--warmup", "2", "--no-plot",
                           "--out", str(tmp_path)])
    names = [r["optimizer"] for r in rows]
    assert names == ["adamw", "muon", "galore_adamw", "adafactor", "dion"]
    for r in rows:
        assert r["val_loss"] == r["val_loss"] and r["val_loss"] < 10  # finite, sane
        assert r["state_MB"] > 0
    assert (tmp_path / "train_gpt.csv").exists()


def test_train_gpt_ddp_single_process_checkpoint_roundtrip(tmp_path):
    """Without torchrun the data-parallel example trains in one process; its DCP
    checkpoint resumes (the 2-process path is covered by tests/distributed)."""
    import warnings

    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_gpt_ddp
    finally:
        sys.path.remove(str(EXAMPLES))
    tiny = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--batch-size", "4",
            "--seq-len", "16"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: "assuming ... single process"
        first = train_gpt_ddp.main(tiny + ["--steps", "3", "--checkpoint", str(tmp_path / "c")])
        again = train_gpt_ddp.main(tiny + ["--steps", "2", "--resume", str(tmp_path / "c")])
    assert len(first) == 3 and len(again) == 2
    assert all(x == x and x < 10 for x in first + again)
    assert (tmp_path / "c" / ".metadata").exists()
