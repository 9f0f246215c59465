"""The optimizer of offloaded weights: SGD or AdamW applied a block of rows at a time, gradients
accumulated over micro-batches, the global gradient norm clipped; AdamW on LoRA adapters.

The backward pass hands each weight's gradient to take() as soon as autograd computes it, while the
module is in memory. With one micro-batch and no clipping the weight is updated there and then, a
block of rows at a time, so no whole gradient is ever held; otherwise gradients add up until every
micro-batch has passed (and, with clipping, wait on disk until the global norm is known). In a
run of several processes (parallel.py) a whole gradient is summed over them (asynchronously, while
the backward pass goes on) and applied when the module is let go.
"""
import math

import torch

from memory_plan import CHUNK_BYTES
from parallel import checksum


class Optimizer:
    """optim: settings.Optim (its kind for the weights; LoRA's adapters take AdamW); run: the RunFolder, whose
    group is this process's place in a parallel run and whose own_rows are the rows it updates."""

    def __init__(self, optim, device, compute_dtype, micro_batches, adapters, run):
        self.kind, self.device, self.compute_dtype = optim.kind, device, compute_dtype
        self.micro_batches, self.grad_clip, self.settings = micro_batches, optim.grad_clip, optim.adamw()
        self.run, self.group = run, run.group
        self.pending = {}  # module name -> [(key, summing)]: gradients being summed over the processes
        self.step_before = {}  # (module, key) -> AdamW's step count before this step, read before summing
        self.checksums = {}  # (module, key, r0, r1) -> checksum of the rows as last updated, in a parallel run
        self.states = 2 if self.kind == "adamw" else 0  # fp32 tensors kept beside each weight (the moments)
        self.lr, self.clip_coef, self.grad_norms, self.counts, self.chunks = 0.0, None, [], {}, {}
        self.adapters = list(adapters)
        self.adapter_optimizer = torch.optim.AdamW(self.adapters, lr=0.0, **self.settings) if self.adapters else None

    @property
    def whole_grads(self):
        """Whether whole gradients are held (accumulated or waiting for clipping) rather than rows."""
        return self.micro_batches > 1 or bool(self.grad_clip) or self.group.world > 1

    def start_step(self, lr):
        self.lr, self.clip_coef, self.grad_norms = lr, None, []

    def take(self, box, key, grad_rows, parts=1):
        """A gradient given as grad_rows(r0, r1, out): its rows r0:r1 (computed into out when out is a
        buffer; where grad_rows.adds, grad_rows(r0, r1, out, add=True) adds them to out instead: a table's
        second use adds into its first one's gradient, no second whole gradient beside it). parts: how many
        micro-batches it covers."""
        rows, row_shape = box.shapes[key][0], box.shapes[key][1:]
        if not self.whole_grads and box.grad_uses == 1:
            step = max(1, CHUNK_BYTES // (4 * math.prod(row_shape)))
            for r0 in range(0, rows, step):
                shape = (min(rows, r0 + step) - r0, *row_shape)
                grad = grad_rows(r0, r0 + shape[0], self.chunk_buffer(shape, self.compute_dtype))
                if grad.dtype != torch.float32:
                    grad = self.chunk_buffer(shape, torch.float32).copy_(grad)
                self.update(box, key, grad, r0)
            return
        if key in box.grads and getattr(grad_rows, "adds", False):  # summed into the gradient there, in place
            grad_rows(0, rows, box.grads[key], add=True)
        else:
            grad = grad_rows(0, rows, None).float()
            box.grads[key] = grad if key not in box.grads else box.grads[key].add_(grad)
        count = self.counts[box.name, key] = self.counts.get((box.name, key), 0) + parts
        if count < (self.micro_batches if box.uses is None else box.uses) * box.grad_uses:
            return
        del self.counts[box.name, key]
        if self.group.world > 1:  # AdamW's count is read before any process can have moved it on
            state = box.optim.get(key)
            self.step_before[box.name, key] = state["step"].clone() if state else torch.tensor(0.0)
            self.pending.setdefault(box.name, []).append((key, self.group.sum_async(box.grads[key])))
            return
        self.complete(box, key)

    def finish(self, box):
        """Wait for the module's gradients being summed over the processes, and apply them."""
        for key, summing in self.pending.pop(box.name, ()):
            self.group.wait(summing)
            self.complete(box, key)

    def complete(self, box, key):
        """A whole gradient is complete: keep its norm for clipping, or apply it."""
        if self.grad_clip:
            self.grad_norms.append(torch.linalg.vector_norm(box.grads[key]))
        else:
            self.update(box, key, box.grads.pop(key))

    def chunk_buffer(self, shape, dtype):
        """A reused buffer for rows of a gradient (fresh memory would cost a page fault per 4 KB)."""
        if dtype not in self.chunks:
            self.chunks[dtype] = torch.empty(CHUNK_BYTES // 4, dtype=dtype, device=self.device)
        return self.chunks[dtype][:math.prod(shape)].view(shape)

    def update(self, box, key, grad, r0=0):
        """Apply the optimizer to rows r0: of one weight, whose gradient (for those rows) is complete.
        torch.optim.AdamW runs on the rows and their moments (views): it is elementwise, so updating
        a weight block by block gives the bits of one update of the whole. In a parallel run each
        process of a machine updates its own rows of a mapped weight (the file's pages are shared)."""
        if not torch.isfinite(grad.sum()):  # a NaN or inf anywhere makes the sum one (and sum is fast)
            raise FloatingPointError(f"non-finite gradient in {box.name}.{key}")
        if self.clip_coef is not None:
            grad.mul_(self.clip_coef)
        box.wait_write()  # a background write may still be reading these tensors
        box.prepare_update(("exp_avg", "exp_avg_sq") if self.kind == "adamw" else ())
        full = box.weights[key]
        if box.mapped and self.group.local_world > 1:
            r0, r1 = self.run.own_rows(len(full))
            grad = grad[r0:r1]
        weight = full[r0:r0 + len(grad)]
        if self.kind == "sgd":
            weight.add_(grad, alpha=-self.lr)
        else:
            state = box.optim[key]
            before = self.step_before.pop((box.name, key), None)
            opt = torch.optim.AdamW([weight], lr=self.lr, **self.settings)
            opt.state[weight] = {"step": (state["step"] if before is None else before).clone(),
                                 "exp_avg": state["exp_avg"][r0:r0 + len(grad)],
                                 "exp_avg_sq": state["exp_avg_sq"][r0:r0 + len(grad)]}
            weight.grad = grad
            opt.step()
            weight.grad = None
            if r0 + len(grad) == len(full) or before is not None:  # the last rows: the step count moves on
                state["step"].copy_(opt.state[weight]["step"])
        if self.group.world > 1:
            self.checksums[box.name, key, r0, r0 + len(grad)] = checksum(weight)
        box.stale |= box.compute[key] is not full  # the copy is made again if the module is used again

    def apply_clipped(self, loaded_boxes):
        """Gradient clipping: the global norm is known after the whole backward pass; update each
        module (loaded_boxes yields them in memory, in turn) with its gradients scaled."""
        total = torch.linalg.vector_norm(torch.stack(self.grad_norms))
        if not torch.isfinite(total):
            raise FloatingPointError(f"the gradient norm is {total.item()}")
        self.clip_coef = torch.clamp(self.grad_clip / (total + 1e-6), max=1.0)
        for box in loaded_boxes:
            if self.group.world > 1 and not box.mapped:  # the first process rewrites its file once all read it
                self.group.barrier()
            for key in list(box.grads):
                self.update(box, key, box.grads.pop(key))
        self.clip_coef = None

    def step_adapters(self):
        """LoRA: one AdamW step on every adapter, after the whole backward pass (in a parallel run, on
        their gradients summed over the processes at once)."""
        learned = [p for p in self.adapters if p.grad is not None]  # not those of experts no token chose
        if self.group.world > 1:  # (which are the same in every process: moe.Experts.note_chosen)
            summed = self.group.sum(torch.cat([p.grad.flatten() for p in learned]))
            for p, grad in zip(learned, summed.split([p.numel() for p in learned])):
                p.grad.copy_(grad.view_as(p))
        norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in learned])
        if not torch.isfinite(norms).all():
            raise FloatingPointError("non-finite gradient of a LoRA adapter")
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.adapters, self.grad_clip)
        for param_group in self.adapter_optimizer.param_groups:
            param_group["lr"] = self.lr
        self.adapter_optimizer.step()
        self.adapter_optimizer.zero_grad(set_to_none=True)
        if self.group.world > 1:
            self.checksums.update({("lora", str(i), 0, len(p)): checksum(p) for i, p in enumerate(self.adapters)})
