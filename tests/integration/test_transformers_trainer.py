"""Hugging Face ``transformers.Trainer`` with matrixopt optimizers passed in.

``Trainer(optimizers=(opt, scheduler))`` is how HF users plug in an optimizer the
library does not know. The model is a randomly initialised one-layer GPT-2 built
from a config (nothing is downloaded); the data are random token ids.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the test extra)")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_cosine_schedule_with_warmup,
)

from matrixopt.optim import GaLoreAdamW, Muon, muon_param_groups  # noqa: E402

VOCAB, SEQ, MAX_STEPS, SAVE_AT = 64, 16, 4, 2


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "muon":
        return Muon(muon_param_groups(model), lr=1e-2, ns_dtype=torch.float32)
    return GaLoreAdamW([{"params": [p for p in model.parameters() if p.ndim == 2], "rank": 4,
                         "update_proj_gap": 2},
                        {"params": [p for p in model.parameters() if p.ndim != 2]}], lr=1e-2)


class CaptureOptimizerState(TrainerCallback):
    """The optimizer's state_dict before the first step of the (resumed) loop
    (``on_train_begin`` fires before Trainer loads the checkpoint's optimizer)."""

    def __init__(self) -> None:
        self.state: dict | None = None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[override]
        if self.state is None and optimizer is not None:
            self.state = copy.deepcopy(optimizer.state_dict())  # its tensors are live


def run(name: str, out: Path, resume: str | None = None,
        callbacks: list | None = None) -> tuple[Trainer, GPT2LMHeadModel]:
    model = tiny_gpt2()
    opt = make_optimizer(name, model)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=MAX_STEPS)
    args = TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4,
        save_strategy="steps", save_steps=SAVE_AT, logging_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(),
                      optimizers=(opt, sched), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


@pytest.mark.parametrize("name", ["muon", "galore_adamw"])
def test_trainer_trains_checkpoints_and_resumes(name: str, tmp_path: Path) -> None:
    model0 = tiny_gpt2()
    _, model = run(name, tmp_path / "full")
    # it trained: every matrix moved
    moved = {n for (n, a), b in zip(model.named_parameters(), model0.parameters())
             if not torch.equal(a, b)}
    assert "transformer.h.0.attn.c_attn.weight" in moved
    assert "transformer.h.0.mlp.c_fc.weight" in moved

    ckpt = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "scheduler.pt").exists()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["state"], "checkpoint holds no optimizer state"

    capture = CaptureOptimizerState()
    resumed, model_r = run(name, tmp_path / "resumed", resume=str(ckpt), callbacks=[capture])
    # the optimizer state the resumed loop starts from is the checkpoint's
    assert capture.state is not None
    assert capture.state["state"].keys() == saved["state"].keys()
    for k, st in saved["state"].items():
        for key, v in st.items():
            got = capture.state["state"][k][key]
            assert torch.equal(got, v), f"state[{k}][{key!r}] not restored"
    assert resumed.state.global_step == MAX_STEPS
    # ... and resuming continues the uninterrupted run exactly
    for (n, a), b in zip(model.named_parameters(), model_r.parameters()):
        assert torch.equal(a, b), f"{n} differs between the resumed and the uninterrupted run"
    assert os.path.isdir(tmp_path / "resumed" / f"checkpoint-{MAX_STEPS}")
