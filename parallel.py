"""Data-parallel runs on torch.distributed: the processes torchrun starts split each step's rows and
add up their gradients, so every process applies the same update.

Without torchrun's environment (WORLD_SIZE) a run is one process and nothing here talks to anyone.
With it: backend nccl on cuda (LOCAL_RANK picks the GPU), gloo elsewhere. The processes of one
machine share its offload and run folders: a module file being trained is memory-mapped by all of
them, and each updates its own part of every weight's rows in the shared pages (run_folder.py says who
writes what), so the machine writes each module once, as a single process would. A collective that
fails or does not finish within the timeout (a process died) is one UserError line.
"""
import datetime
import os
import time

import torch
import torch.distributed as dist

from utils import UserError


class Group:
    """This process's place in the run: rank and world over all machines, local_rank and local_world
    on this machine; the seconds it waited in collectives."""

    def __init__(self, rank=0, world=1, local_rank=0, local_world=1, device="cpu"):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.device = torch.device(device)  # where the backend sums (nccl: the GPU)
        self.wait_s = 0.0

    def call(self, fn, *args):
        """A collective (or a wait on one), timed; a failure is a UserError."""
        start = time.perf_counter()
        try:
            return fn(*args)
        except (RuntimeError, ValueError) as e:  # DistBackendError, connection closed, timeout
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"process {self.rank} of {self.world}: another process of this run stopped or did not "
                            f"answer ({reason}); the run stays at its last committed step") from e
        finally:
            self.wait_s += time.perf_counter() - start

    def sum(self, tensor):
        """The tensor summed over every process, in place."""
        if self.world > 1 and tensor.device != self.device:
            return tensor.copy_(self.sum(tensor.to(self.device)))
        if self.world > 1:
            self.call(dist.all_reduce, tensor)
        return tensor

    def sum_async(self, tensor):
        """Start summing the tensor over every process, in place; wait() on the result."""
        return self.call(dist.all_reduce, tensor, dist.ReduceOp.SUM, None, True)

    def wait(self, work):
        self.call(work.wait)

    def gather(self, obj):
        """[obj of every process], in rank order."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        self.call(dist.all_gather_object, objs, obj)
        return objs

    def barrier(self):
        if self.world > 1:
            self.call(dist.barrier)

    def agree(self, fn):
        """fn() on this machine's first process, while the others wait; a UserError of it is raised by all."""
        error = None
        if self.local_rank == 0:
            try:
                fn()
            except UserError as e:
                error = str(e)
        first = next((e for e in self.gather(error) if e), None)
        if first:
            raise UserError(first)

    def check_same(self, checksums, step):
        """Stop when processes that updated the same rows of a weight hold different values there.
        checksums: {(module, key, first row, end row): checksum of the rows as updated}."""
        seen = {}
        for rank, sums in enumerate(self.gather(checksums)):
            for where, value in sums.items():
                first = seen.setdefault(where, (rank, value))
                if first[1] != value:
                    module, key, r0, r1 = where
                    raise UserError(f"step {step}: processes {first[0]} and {rank} hold different weights in "
                                    f"{module}.{key} (rows {r0}:{r1}); the run stays at its last committed step")

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def checksum(tensor):
    """A cheap fingerprint of a tensor's bits (their sum as integers, wrapping around): equal bits, equal
    sums. In the tensor's own width: a wider sum would copy the tensor first."""
    bits = tensor.detach().contiguous().view(-1)
    bits = bits.view(torch.int32) if bits.element_size() == 4 else bits.view(torch.int16)
    return int(bits.sum(dtype=bits.dtype))  # modulo 2^32 (or 2^16): any order of the sum gives the same


def start(device, timeout_s):
    """The Group of this process: joins torchrun's process group where WORLD_SIZE > 1; with cuda, each
    process takes the GPU of its LOCAL_RANK. Returns (group, device name)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Group(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"process {rank} of {world}: cannot join the process group with {backend} ({e})")
    return Group(rank, world, local_rank, local_world, device if backend == "nccl" else "cpu"), device
