"""Record (or check) parameter trajectories of every registry configuration.

The optimizer layer is being restructured (one functional core, distribution as
a strategy); its behaviour must not change. This script ran on main at the
commit named in ``data/trajectories.pt`` (key ``"commit"``) and stored, for each
configuration of :data:`optim_registry.REGISTRY`, the flattened parameters after
steps 3 and 8 of a float32 run (refresh steps included: GaLore refreshes every 3
steps there). ``test_trajectories.py`` replays them.

    python tests/optim/record_trajectories.py   # rewrites data/trajectories.pt
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from optim_registry import REGISTRY, OptimInfo, loss_at, make_problem  # noqa: E402

CHECKPOINTS = (3, 8)
DATA = Path(__file__).parent / "data" / "trajectories.pt"


def trajectory(info: OptimInfo) -> dict[int, torch.Tensor]:
    """Flattened parameters (with a grad) after each step in :data:`CHECKPOINTS`."""
    torch.manual_seed(0)
    model = make_problem(info.problem, torch.float32)
    opt = info.make(model)
    out: dict[int, torch.Tensor] = {}
    for t in range(max(CHECKPOINTS)):
        opt.zero_grad()
        loss_at(model, t).backward()
        opt.step()
        if t + 1 in CHECKPOINTS:
            out[t + 1] = torch.cat([p.detach().reshape(-1).clone()
                                    for n, p in model.named_parameters()
                                    if not n.startswith("unused")])
    return out


def main() -> None:
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    data = {"commit": commit, "checkpoints": list(CHECKPOINTS),
            "runs": {info.name: trajectory(info) for info in REGISTRY}}
    DATA.parent.mkdir(exist_ok=True)
    torch.save(data, DATA)
    print(f"recorded {len(data['runs'])} trajectories at {commit} into {DATA}")


if __name__ == "__main__":
    main()
