"""PyTorch Lightning: ``configure_optimizers`` returning matrixopt optimizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch", reason="needs lightning (the test extra)")

from matrixopt.optim import (  # noqa: E402
    Adafactor,
    GaLoreAdafactor,
    GaLoreAdamW,
    Muon,
    muon_param_groups,
)

STEPS = 6
# lightning 2.6's own pytree helper uses an API torch deprecated; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "muon":
        return Muon(muon_param_groups(model), lr=0.02, ns_dtype=torch.float32)
    if name == "galore_adamw":
        return GaLoreAdamW(model.parameters(), lr=1e-2, rank=2, update_proj_gap=3)
    if name == "galore_adafactor":
        return GaLoreAdafactor(model.parameters(), lr=1e-2, relative_step=False, rank=2,
                               update_proj_gap=3)
    return Adafactor(model.parameters(), lr=1e-2, relative_step=False)


class Regressor(L.LightningModule):
    def __init__(self, opt_name: str) -> None:
        super().__init__()
        self.opt_name = opt_name
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def configure_optimizers(self):
        opt = make_optimizer(self.opt_name, self)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 4, generator=g))
    # the same full batch every step, so the loss must fall
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)


@pytest.mark.parametrize("name", ["muon", "galore_adamw", "galore_adafactor", "adafactor"])
def test_lightning_configure_optimizers(name: str) -> None:
    torch.manual_seed(0)
    module = Regressor(name)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, train_dataloaders=data())
    assert trainer.global_step == STEPS
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == {"muon": "Muon", "galore_adamw": "GaLoreAdamW",
                                  "galore_adafactor": "GaLoreAdafactor",
                                  "adafactor": "Adafactor"}[name]
    assert len(opt.state) == len(before), "every parameter has optimizer state"
    assert all(not torch.equal(a, b) for a, b in zip(module.parameters(), before))
    assert module.losses[-1] < module.losses[0]
    # the scheduler Lightning steps every step halves the lr every 2 steps
    assert module.lrs == pytest.approx([module.lrs[0] * 0.5 ** (i // 2) for i in range(STEPS)])
