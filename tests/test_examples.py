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
    assert names == ["adamw", "muon", "galore_adamw", "adafactor"]
    for r in rows:
        assert r["val_loss"] == r["val_loss"] and r["val_loss"] < 10  # finite, sane
        assert r["state_MB"] > 0
    assert (tmp_path / "train_gpt.csv").exists()
