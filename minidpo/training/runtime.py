"""
Where and how one process computes: its device, the autocast region every forward enters, its rank among `world`
processes, and where its progress lines go. Built once by train.py from the resolved device, dtype and torchrun's
environment, and handed to every method's training function as one argument instead of five.
"""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from minidpo.progress import Log, quiet


@dataclass(frozen=True)
class Runtime:
    device: torch.device = torch.device("cpu")
    autocast: AbstractContextManager = field(default_factory=nullcontext)  # torch.autocast(...) or a no-op
    rank: int = 0                   # this process among `world` (torchrun's RANK; 0 without torchrun)
    world: int = 1
    log: Log = quiet                # progress lines; train.py passes a print on rank 0 and a no-op elsewhere
