"""Fine-tune a Llama 2 model that does not fit in memory, streaming its modules from disk.

python finetune.py [--name=value ...]   (the settings below; with none, the built-in default model
learns the bundled slowllama.txt). The run lives in out_path: run/ holds the working weights,
optimizer state and committed steps (continue with --resume=1); at the end the model is exported
there in Meta's format, ready for python test_gen.py out_path.
torchrun --nproc_per_node=N finetune.py [--name=value ...]: N processes (GPUs, or CPU processes) train
one model, each on batch_size of every step's N x batch_size rows (parallel.py; README).
"""
model_path = ""  # Meta-format model folder; empty: the built-in default model
data_path = ""  # a text file; a .pt file of a 1-D LongTensor of token ids; or a .jsonl file of instructions (README); empty: slowllama.txt
prompt_template = ""  # .jsonl prompt/response data: the text before each response; empty: the model's chat template, else Llama 2's "[INST] {prompt} [/INST]"
system_template = "<<SYS>>\n{system}\n<</SYS>>\n\n"  # .jsonl data with prompt_template: put before the prompt when an example has a system text
out_path = "out"  # the run's folder: working state in out_path/run, the exported model in out_path
out_format = ""  # layout of the exported model: meta, hf or gguf (out_path/model.gguf for llama.cpp, Ollama, LM Studio, f16; gguf:q8_0, gguf:bf16, gguf:f32 for other types; LoRA runs add adapter.gguf); empty: the source's
offload_path = ""  # where converted models are kept (one folder per source model); empty: ./offload
device = "cpu"  # cpu, cuda or mps
compute_dtype = "auto"  # auto: bfloat16 matmuls (fp32 master weights) where the device has native bf16, else float32
memory_budget = -1.0  # GB of RAM the run plans for (kept activations, resident modules), per process under torchrun; -1: half the RAM (shared among a machine's processes)
keep_activations = 1  # 1: keep each block's activations for the backward pass (within the budget); 0: recompute
seed = 1337  # seeds the data order, dropout and LoRA initialisation
iters = 500  # optimizer steps
seq_len = 64  # tokens per row
batch_size = 16  # rows per micro-batch
grad_accum = 1  # micro-batches per optimizer step
lr = 3e-3  # learning rate (real 7B-70B models: about 1e-5 for full fine-tuning, 1e-4 for LoRA)
warmup_iters = 0  # linear warm-up steps; 0: none
lr_decay = 0  # 1: cosine decay from lr to min_lr over iters
min_lr = 0.0  # the learning rate at the end of the cosine decay
optimizer = "adamw"  # sgd or adamw
weight_decay = 0.01  # AdamW's decoupled weight decay, on every parameter
beta1 = 0.9  # AdamW
beta2 = 0.999  # AdamW
eps = 1e-8  # AdamW
grad_clip = 0.0  # clip the global gradient norm to this; 0: off
dropout = 0.0  # dropout on the output of attention and feed-forward in every block
mode = "full"  # full: update every weight; lora: train low-rank adapters, the base is only read
lora_rank = 8  # LoRA
lora_alpha = 16.0  # LoRA: the adapter's output is scaled by lora_alpha / lora_rank
lora_dropout = 0.05  # LoRA: dropout on the adapter's input
lora_targets = "wq,wv"  # LoRA: weights that get adapters, of wq wk wv wo w1 w2 w3 output
base_copy = -1  # LoRA in fp32 on the CPU from a bf16/f16 model: 1 keeps an fp32 copy of the base in out_path/run (mapped at every read, not converted; removed at the end), 0 converts at every read, -1: 1 when it fits in the page cache and on the disk
val_fraction = 0.0  # the tail of the data held out for a validation loss; 0: none
eval_period = 100  # every this many steps: validation loss and a completion of prompt; 0: never
prompt = "The basic problem is one of size."  # completed greedily at each evaluation and at the end
gen_tokens = 24  # tokens to generate for the completion
save_period = 10  # commit the run every this many steps (and at the end, and on Ctrl-C)
resume = 0  # 1: continue the run in out_path from its last committed step
overwrite = 0  # 1: start over even if out_path holds an earlier run
plan = 0  # 1: measure this machine for a few seconds, print the run's time, memory and disk writes, exit (plan.py)
plan_mb = 512  # --plan=1: MB of the temporary file the disk is measured with
dist_timeout = 7200  # torchrun: seconds a process waits for the others (an evaluation on the first one) before stopping
debug = 0  # 1: show Python tracebacks

DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and type(v) in (int, float, str)}

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

import hf_format as hf
import parallel
from adapters import adapter_state, read_adapter
from blackbox_model import graph_bytes_per_token
from data import get_batch, load_tokens
from files import load_tensors, save_tensors, write_json
from loader import load_llama2, log_line, save_llama2
from report import RunLog
from utils import UserError, check_disk, gb, get_rng_state, main_guard, parse_settings, set_rng_state, total_ram_bytes


def disk_needs(model, cfg):
    """What the run will write: the run folder (two slot files of every module's fp32 working copy and
    optimizer state; adapter checkpoints for LoRA), gradients waiting for clipping, the export."""
    out = Path(cfg.out_path)
    n = sum(box.numel() for box in model.boxes.values())
    if cfg.mode == "full":
        run = 2 * n * 4 * (3 if cfg.optimizer == "adamw" else 1) + (n * 4 if cfg.grad_clip else 0)
        run -= sum(f.stat().st_size for f in (out / "run").glob("*.safetensors")) if cfg.resume else 0
    else:
        targets = cfg.lora_targets.split(",")
        adapted = sum(sum(s) for box in [*model.layers, model.output] for k, s in box.shapes.items() if len(s) == 2
                      and ("output" if box is model.output else k.split(".")[-2]) in targets)
        run = 2 * 3 * 4 * cfg.lora_rank * adapted  # two checkpoints of A, B and their AdamW moments
    export = sum(math.prod(box.shapes[k]) * model.storage_dtype.itemsize for box in model.boxes.values()
                 for k in box.shapes)
    return [("run folder", out / "run", max(0, run)), ("export", out, export)]


def learning_rate(cfg, step):
    if cfg.warmup_iters and step <= cfg.warmup_iters:
        return cfg.lr * step / cfg.warmup_iters
    if not cfg.lr_decay:
        return cfg.lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def evaluate(model, cfg, val, step, say=print):
    """The validation loss (where data is held out) and a greedy completion of prompt: printed, and
    returned as {val_loss, perplexity, completion} (the loss and perplexity only with validation data)."""
    model.eval()
    parts, result = [], {}
    tokens, targets = val
    if len(tokens) > 1:
        n = min(cfg.seq_len, len(tokens) - 1)
        starts = list(range(0, len(tokens) - n, n))[:8 * cfg.batch_size]
        _, loss = model(torch.stack([tokens[s:s + n] for s in starts]),
                        torch.stack([targets[s + 1:s + n + 1] for s in starts]))
        result.update(val_loss=loss.item(), perplexity=math.exp(min(loss.item(), 700)))
        parts.append(f"val loss {loss.item():.4f}")
    prompt_ids = model.tokenizer.encode(cfg.prompt)
    completion = model.generate(prompt_ids, cfg.gen_tokens, stop_ids=model.tokenizer.stop_ids)
    result["completion"] = model.tokenizer.decode(prompt_ids + completion)
    say(f"step {step}: {' | '.join(parts + [repr(result['completion'])])}")
    model.train()
    return result


# --- the run folder: committed steps ---

def commit(model, cfg, run_dir, step, data_rng):
    """Make the current state the run's last committed step: flush everything, then rename a manifest.
    In a parallel run every process flushes, then the machine's first one writes the checkpoint (with
    every process's random state) and the manifest, then all go on: all commit the step, or none."""
    group = model.group
    files = model.flush()
    checkpoint = f"checkpoint.{step:06d}.pt"
    rngs = group.gather(get_rng_state(model.device))  # once every process has flushed
    group.check_same(model.optimizer.checksums, step)
    if group.local_rank == 0:
        state = {"step": step, "rng": rngs[group.rank], "data_rng": data_rng.get_state()}
        if group.world > 1:
            state["rngs"] = rngs
        if cfg.mode == "lora":  # the adapter checkpoint: adapter, settings, optimizer state, step, RNG
            state.update(lora_state(model, cfg), optimizer=model.optimizer.adapter_optimizer.state_dict())
        save_tensors(state, run_dir / checkpoint)
        manifest = {"step": step, "files": files, "checkpoint": checkpoint, "model": model.manifest["fingerprint"],
                    "source": model.manifest["source"], "mode": cfg.mode, "processes": group.world}
        write_json(manifest, run_dir / "state.json")  # the commit: one rename
        clean_run_dir(run_dir, set(files.values()) | {checkpoint})
    group.barrier()
    model.offload.committed = set(files.values()) | {checkpoint}


def lora_state(model, cfg):
    return adapter_state(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","))


def clean_run_dir(run_dir, keep):
    """Remove what no committed state needs: older checkpoints, temporary files, gradients of an
    interrupted step (the modules' second slot files stay: they are overwritten in place; so do LoRA's
    fp32 copies of the base)."""
    for f in run_dir.iterdir():
        if f.name not in keep and f.name != "state.json" and not f.name.endswith((".0.safetensors", ".1.safetensors", ".fp32.safetensors")):
            f.unlink()


def read_run(run_dir):
    try:
        return json.loads((run_dir / "state.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{run_dir / 'state.json'}: cannot be read ({e}); start over with --overwrite=1")


def prepare_out_path(cfg, model, group):
    """The run folder, checked: never inside the source model, never used by another run at the same
    time (a lock), and an earlier run kept unless asked."""
    out = Path(cfg.out_path).resolve()
    source = Path(model.manifest["source"])
    if out == source or source in out.parents:
        raise UserError(f"out_path={cfg.out_path} is (inside) model_path {source}, which is never written to")
    parallel.lock_run_folder(group, out)
    run_dir = out / "run"
    previous = read_run(run_dir) if run_dir.exists() else None
    if cfg.resume:
        if previous and previous["model"] != model.manifest["fingerprint"]:
            raise UserError(f"{run_dir}: this run was made from {previous['source']}, not from the model given now")
        if previous and previous["mode"] != cfg.mode:
            raise UserError(f"{run_dir}: this run is in mode={previous['mode']}, not mode={cfg.mode}")
    elif (previous or any(out.glob("consolidated.*.pth"))) and not cfg.overwrite:
        raise UserError(f"out_path={cfg.out_path} holds an earlier run; continue it with --resume=1, "
                        "start over with --overwrite=1, or choose another out_path")
    steps = set(group.gather(previous["step"] if cfg.resume and previous else None))
    if len(steps) > 1:
        raise UserError(f"{run_dir}: the machines of this run hold different committed steps ({sorted(steps, key=str)}); "
                        "resume needs the run folders of one step")

    def fresh():
        if not cfg.resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    group.agree(fresh)  # the machine's first process, once every process has read the folder
    return out, run_dir, previous if cfg.resume else None


def resume_or_start(model, cfg, run_dir, previous, data_rng, group):
    """Set the model up for training: from scratch, or from the run's last committed step (weights
    and optimizer state, adapters, random state, data order). Returns the step to continue from."""
    state = None
    if previous:
        checkpoint = run_dir / previous["checkpoint"]
        state = read_adapter(checkpoint, model, cfg.lora_rank) if cfg.mode == "lora" else \
            load_tensors(checkpoint, mmap=False)
    if cfg.mode == "lora":
        model.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","), cfg.seed,
                       tensors=state["tensors"] if state else None)
    model.setup_training(run_dir, mode=cfg.mode, optimizer=cfg.optimizer, grad_clip=cfg.grad_clip,
                         micro_batches=cfg.grad_accum, keep_activations=bool(cfg.keep_activations),
                         tokens_per_step=cfg.batch_size * cfg.seq_len, files=previous and previous["files"],
                         committed=previous and [*previous["files"].values(), previous["checkpoint"]] or (),
                         group=group, base_copy=cfg.base_copy,
                         disk_reserve=disk_needs(model, cfg)[0][2], log=log_line,
                         betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if not previous:
        return 0
    group.agree(lambda: clean_run_dir(run_dir, model.offload.committed))  # what an interrupted step left behind
    rngs = state.get("rngs", [state["rng"]])
    if previous.get("processes", 1) != group.world and group.rank == 0:
        print(f"{run_dir}: a run of {previous.get('processes', 1)} processes continued by {group.world}: the same "
              "data order, not the same rows per step")
    set_rng_state(rngs[group.rank] if group.rank < len(rngs) else state["rng"], model.device)
    data_rng.set_state(state["data_rng"])
    if cfg.mode == "lora":
        model.optimizer.adapter_optimizer.load_state_dict(state["optimizer"])
    print(f"resuming {run_dir} from step {previous['step']}")
    return previous["step"]


class StopRequest:
    """Ctrl-C finishes the current step, commits it and stops; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once, losing it)", file=sys.stderr, flush=True)


def main():
    cfg = type("Settings", (), parse_settings(sys.argv[1:], DEFAULTS))
    for name, allowed in (("optimizer", ("sgd", "adamw")), ("mode", ("full", "lora"))):
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name}={getattr(cfg, name)}: use one of {', '.join(allowed)}")
    for name in ("iters", "seq_len", "batch_size", "grad_accum", "save_period"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}={getattr(cfg, name)}: must be at least 1")
    if cfg.out_format.partition(":")[0] not in ("", "meta", "hf", "gguf"):
        raise UserError(f"--out_format={cfg.out_format}: use meta, hf or gguf (gguf:q8_0, gguf:bf16, gguf:f32)")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val_fraction={cfg.val_fraction}: must be in [0, 1)")
    if cfg.plan:  # nothing is written: plan.py
        from plan import plan as make_plan
        make_plan(cfg, disk_needs)
        return
    group, device = parallel.start(cfg.device, cfg.dist_timeout)
    try:
        train(cfg, group, device)
        group.barrier()  # the others wait for the first process's export: all leave the group together
    except BaseException:
        group.close()
        raise
    if group.world > 1:  # gloo's threads can abort the interpreter's teardown ("terminate called without an
        sys.stdout.flush()  # active exception", about one run in twenty): everything is written and synced
        sys.stderr.flush()  # by now, so the process leaves without it
        os._exit(0)


def train(cfg, group, device):
    first = group.rank == 0  # evaluates, logs and exports
    torch.manual_seed(cfg.seed + group.rank)  # dropout differs between processes; LoRA's start does not
    budget = cfg.memory_budget * 2**30 if cfg.memory_budget >= 0 else total_ram_bytes() / 2 / group.local_world
    model = load_llama2(cfg.model_path or None, offload_path=cfg.offload_path or None, device=device,
                        compute_dtype=cfg.compute_dtype, memory_budget=budget, dropout=cfg.dropout,
                        log=log_line if group.local_rank == 0 else lambda *_: None)
    model.check_window(cfg.seq_len)
    train_tokens, val_tokens = load_tokens(cfg, model.tokenizer, model.offload_dir)
    if group.local_rank == 0:
        check_disk(disk_needs(model, cfg), log_line)
    out, run_dir, previous = prepare_out_path(cfg, model, group)

    data_rng = torch.Generator().manual_seed(cfg.seed)
    step = resume_or_start(model, cfg, run_dir, previous, data_rng, group)
    resident = sum(box.resident for box in model.boxes.values())
    graph = cfg.batch_size * cfg.seq_len * graph_bytes_per_token(model.args, model.compute_dtype)
    if first:
        log_line(f"RAM: about {gb(model.peak_estimate)} at peak{' per process' if group.local_world > 1 else ''} "
                 f"({resident} of {len(model.boxes)} modules resident, activations of "
                 f"{min(model.args.n_layers, model.graph_budget // graph)} blocks kept)")
        if group.world > 1:
            log_line(f"{group.world} processes, {group.local_world} on this machine: {group.world * cfg.batch_size} "
                     f"rows a micro-batch")

    stop = StopRequest()
    run_log = RunLog(cfg, out, model, step, group.world) if first else None
    model.train()

    def evaluation(step):
        if first:
            eval_start = time.time()
            run_log.evaluation(step, evaluate(model, cfg, val_tokens, step, run_log.say), time.time() - eval_start)
            for box in model.boxes.values():  # a module it let go is on the disk before the others read it
                box.wait_write()

    if step == 0 and cfg.eval_period:
        evaluation(step)
    start, first_step = time.time(), step
    while step < cfg.iters:
        batches = [get_batch(train_tokens, cfg, data_rng, (group.rank, group.world)) for _ in range(cfg.grad_accum)]
        step_start = time.time()
        try:
            loss = model.train_step(batches, learning_rate(cfg, step + 1))
        except FloatingPointError as e:
            raise UserError(f"step {step + 1}: {e}; nothing of this step was committed (the run stays at its last "
                            "committed step); try a lower lr or grad_clip")
        step += 1
        elapsed = time.time() - step_start
        left = (time.time() - start) / (step - first_step) * (cfg.iters - step)
        if first:
            run_log.step(model, step, loss, learning_rate(cfg, step), elapsed, left)
        if cfg.eval_period and step % cfg.eval_period == 0 and step < cfg.iters:
            evaluation(step)
        stopping = bool(group.sum(torch.tensor(int(stop.requested))))  # every process stops at the same step
        if step % cfg.save_period == 0 or step == cfg.iters or stopping:
            commit(model, cfg, run_dir, step, data_rng)
        if stopping:
            if first:
                run_log.close()
                launcher = "torchrun ... finetune.py" if group.world > 1 else "python finetune.py"
                print(f"stopped at step {step}; continue with: {launcher} {' '.join(sys.argv[1:])} --resume=1",
                      file=sys.stderr)
            model.close()
            group.barrier()  # all leave the group together
            sys.exit(130)
    if not first:  # the first process evaluates and exports
        model.close()
        return
    run_log.close_bar()
    if cfg.eval_period:
        evaluation(step)
    model.eval()
    model.drop_base_copy()
    if cfg.mode == "lora":
        save_tensors({**lora_state(model, cfg), "step": step}, out / "adapter.pt")
        hf.write_peft(out / "peft", model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","),
                      base_name=model.manifest["source"])
    out_format, _, gguf_type = cfg.out_format.partition(":")  # gguf:q8_0: GGUF of type q8_0
    save_llama2(model, out, out_format=out_format or None, gguf_type=gguf_type or None)
    if cfg.mode == "lora" and out_format == "gguf":  # the adapter alone, for the base model's GGUF
        import gguf_format
        gguf_format.write_adapter(model, out / gguf_format.ADAPTER_FILE, cfg.lora_alpha, log_line)
    model.close()
    run_log.finish(cfg)
    print(f"done: {out / 'model.gguf'} (README: Ollama, llama.cpp)" if out_format == "gguf" else
          f"done: python test_gen.py {cfg.out_path}")


if __name__ == "__main__":
    main_guard(main)
