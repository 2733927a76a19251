"""The main job (examples/train_gpt.py) runs end to end on a tiny configuration."""

import csv
import inspect
import json
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
    assert names == train_gpt.AVAILABLE
    assert names[:4] == ["adamw", "muon", "galore_adamw", "adafactor"]
    assert "soap" in names and "shampoo" in names
    for r in rows:
        assert r["val_loss"] == r["val_loss"] and r["val_loss"] < 10  # finite, sane
        assert r["state_MB"] > 0
    assert (tmp_path / "train_gpt.csv").exists()


TINY = ["--steps", "4", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--batch-size", "4",
        "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--warmup", "2",
        "--no-plot"]


def _train_gpt():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_gpt
    finally:
        sys.path.remove(str(EXAMPLES))
    return train_gpt


def test_train_gpt_tuned_lrs_fall_back_to_the_default_for_unknown_names(tmp_path):
    train_gpt = _train_gpt()
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"default": 1e-3, "lr": {"adamw": 2e-3}}))
    rows = train_gpt.main(TINY + ["--optimizers", "adamw", "muon", "adamw_lisa", "--tuned",
                                  str(tuned), "--out", str(tmp_path), "--n-layer", "3"])
    assert {r["optimizer"]: r["lr"] for r in rows} == {"adamw": 2e-3, "muon": 1e-3,
                                                         "adamw_lisa": 2e-3}
    lisa, full = rows[2], rows[0]
    assert lisa["state_MB"] < full["state_MB"]  # 2 of 3 blocks hold state
    with open(tmp_path / "train_gpt.csv") as f:
        header = next(csv.reader(f))
    assert "wall_s" in header and "lr" in header


def test_train_gpt_sweep_records_every_run_and_writes_the_best_lr(tmp_path):
    train_gpt = _train_gpt()
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"default": 3e-3, "lr": {"muon": 5e-3},
                                 "not_swept": {"adamw": "hand-set", "muon": "hand-set"}}))
    train_gpt.main(TINY + ["--optimizers", "adamw", "--sweep", "--sweep-steps", "2", "--tuned",
                           str(tuned), "--out", str(tmp_path)])
    with open(tmp_path / "sweep.csv") as f:
        runs = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in runs] == [float(f"{3e-3 * k:.3g}")
                                              for k in train_gpt.SWEEP_FACTORS]
    best = min(runs, key=lambda r: float(r["val_loss"]))
    doc = json.loads(tuned.read_text())
    assert doc["lr"] == {"muon": 5e-3, "adamw": float(best["lr"])}  # others kept
    assert doc["not_swept"] == {"muon": "hand-set"}  # the swept name's note is gone


def test_train_gpt_every_optimizer_lr_lives_in_tuned_lr_json():
    """The one place of the main job's learning rates: no name falls back to the default,
    and the command line has no lr of its own."""
    train_gpt = _train_gpt()
    doc = json.loads(train_gpt.TUNED.read_text())
    names = [n for n in train_gpt.AVAILABLE + train_gpt.EXTRA if not n.endswith("_lisa")
             and n not in train_gpt.MUON_OPERATORS]  # LISA: its base's lr; the Muon
    # operator variants run at the file's default until swept
    assert sorted(set(names) - set(doc["lr"])) == []
    assert set(doc.get("not_swept", {})) <= set(doc["lr"])
    assert "dion=" not in inspect.getsource(train_gpt.main)


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
