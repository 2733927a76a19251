import os

import torch

# Under pytest-xdist every worker is its own process; give each one thread so two
# workers on a 2-core machine do not oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
