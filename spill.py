"""Block inputs that wait on disk through a training step: where a long row's inputs of every block do not fit the
memory plan, the first blocks' inputs are written to the run folder in the forward pass and read back in the
backward pass, one block ahead of their use, by the thread that reads and writes the modules (overlapped with
the computation as the weights are). Each is written once, read once and removed."""
import os
from typing import NamedTuple

import numpy as np
import torch



class Spilled(NamedTuple):
    path: os.PathLike
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    io: object  # the write's future, then the read's


def spill(offload, folder, name, x):
    """Start writing x (a block input: the tensor is let go once written) to folder/name.bin."""
    path = folder / f"{name}.bin"
    data = x.detach().cpu().contiguous()
    write = offload.io.submit(offload.timed, "writing", lambda: data.view(-1).view(torch.uint8).numpy().tofile(path))
    return Spilled(path, x.shape, x.dtype, x.device, x.requires_grad, write)


def read_back(offload, spilled):
    """Start reading a spilled input (after its write): a Spilled whose io gives the tensor."""
    def read():
        spilled.io.result()
        values = torch.from_numpy(np.fromfile(spilled.path, dtype=np.uint8))
        os.unlink(spilled.path)  # (its pages in the page cache go with it)
        return values.view(spilled.dtype).view(spilled.shape)
    return spilled._replace(io=offload.io.submit(offload.timed, "reading", read))


def unspilled(spilled):
    """The input, read back (read_back started it), on its device and as it needed gradients."""
    return spilled.io.result().to(spilled.device).requires_grad_(spilled.requires_grad)
