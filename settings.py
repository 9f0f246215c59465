"""The settings of a run, typed: finetune.py's constants (the one default of each), overridden by
--name=value, parsed and checked once into a Settings with its groups (LoRA, the optimizer, the data).

Functions take the group they use: the model's LoRA (Lora), the optimizer and its schedule (Optim), the
training data and the rows of a step (Data). Library users build one with finetune.settings(name=value ...).
"""
import math
from dataclasses import dataclass

from model import LORA_TARGETS
from utils import UserError, memory_budget_bytes

OUT_FORMATS = ("meta", "hf", "gguf")
GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")
BASE_QUANTS = ("none", "source", "q8_0", "q4_0")  # how a LoRA run's frozen base is kept (quant.py)


@dataclass(frozen=True)
class Lora:
    """Low-rank adapters W x + alpha/rank * B A dropout(x) on the weights named in targets."""
    rank: int
    alpha: float
    dropout: float
    targets: tuple

    @property
    def scale(self):
        return self.alpha / self.rank


@dataclass(frozen=True)
class Optim:
    """The optimizer of the trained weights (LoRA adapters: always AdamW) and its learning-rate schedule."""
    kind: str  # sgd or adamw
    lr: float
    warmup_iters: int
    lr_decay: bool
    min_lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float

    def adamw(self):
        """torch.optim.AdamW's settings, but the learning rate."""
        return {"betas": (self.beta1, self.beta2), "eps": self.eps, "weight_decay": self.weight_decay}

    def lr_at(self, step, iters):
        """The learning rate of step (1-based) of iters: linear warm-up, then lr or a cosine decay to min_lr."""
        if self.warmup_iters and step <= self.warmup_iters:
            return self.lr * step / self.warmup_iters
        if not self.lr_decay:
            return self.lr
        progress = (step - self.warmup_iters) / max(1, iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (self.lr - self.min_lr)


@dataclass(frozen=True)
class Data:
    """The training data and the rows of a step: grad_accum micro-batches of batch_size rows of seq_len tokens
    (objective dpo: of batch_size pairs, two rows each)."""
    path: str
    prompt_template: str
    system_template: str
    seq_len: int
    batch_size: int
    grad_accum: int
    val_fraction: float
    pack: bool = True
    objective: str = "sft"

    @property
    def micro_batch_tokens(self):
        return self.batch_size * self.seq_len * (2 if self.objective == "dpo" else 1)


@dataclass(frozen=True)
class Dpo:
    """DPO's loss (dpo.py): beta, and the share of pairs taken as mislabelled."""
    beta: float
    label_smoothing: float


@dataclass(frozen=True)
class Settings:
    model_path: str
    out_path: str
    out_format: str
    offload_path: str
    device: str
    compute_dtype: str
    memory_budget: float  # GiB per process; -1: half the RAM shared among the machine's processes
    keep_activations: bool
    seed: int
    iters: int
    dropout: float
    router_aux_loss_coef: float
    mode: str
    base_quant: str
    base_copy: int
    eval_period: int
    prompt: str
    gen_tokens: int
    save_period: int
    resume: bool
    overwrite: bool
    plan: bool
    plan_mb: int
    dist_timeout: float
    lora: Lora
    optim: Optim
    data: Data
    dpo: Dpo

    def memory_budget_bytes(self, processes=None):
        return memory_budget_bytes(self.memory_budget, processes)

    @property
    def export(self):
        """(layout or None for the source's, GGUF type or None) of out_format ("gguf:q8_0": gguf, q8_0)."""
        layout, _, gguf_type = self.out_format.partition(":")
        return layout or None, gguf_type or None


def typed_overrides(argv, defaults):
    """{name: value}: the defaults with --name=value overrides, each typed like its default."""
    settings = dict(defaults)
    for arg in argv:
        name, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise UserError(f"{arg!r}: settings are given as --name=value")
        if name not in defaults:
            raise UserError(f"unknown setting --{name}; the settings are: {', '.join(sorted(defaults))}")
        kind = type(defaults[name])
        try:
            settings[name] = value if kind is str else kind(float(value)) if kind is int and "e" in value.lower() \
                else kind(value)
        except (ValueError, OverflowError):  # OverflowError: an integer of 1e400
            raise UserError(f"--{name}={value}: expected {'an integer' if kind is int else 'a number'}")
        if kind is int and settings[name] != float(value):
            raise UserError(f"--{name}={value}: expected an integer")
        if kind is float and not math.isfinite(settings[name]):
            raise UserError(f"--{name}={value}: expected a finite number")
    return settings


def parse(argv, defaults):
    """Settings of --name=value arguments over defaults ({name: value}, each typed like its value), checked."""
    s = typed_overrides(argv, defaults)
    for name, allowed in (("optimizer", ("sgd", "adamw")), ("mode", ("full", "lora")), ("base_copy", (-1, 0, 1)),
                          ("base_quant", BASE_QUANTS), ("objective", ("sft", "dpo"))):
        if s[name] not in allowed:
            raise UserError(f"--{name}={s[name]}: use one of {', '.join(map(str, allowed))}")
    if s["base_quant"] != "none" and s["mode"] != "lora":
        raise UserError(f"--base_quant={s['base_quant']} is for --mode=lora: full fine-tuning trains every weight in "
                        "fp32 (a quantized source is dequantized once, at conversion)")
    for name in ("iters", "seq_len", "batch_size", "grad_accum", "save_period", "lora_rank", "plan_mb", "dist_timeout"):
        if s[name] < 1:
            raise UserError(f"--{name}={s[name]}: must be at least 1")
    for name in ("eval_period", "warmup_iters", "gen_tokens", "lr", "min_lr", "weight_decay", "eps", "grad_clip",
                 "router_aux_loss_coef"):
        if s[name] < 0:
            raise UserError(f"--{name}={s[name]}: must be at least 0")
    for name in ("keep_activations", "lr_decay", "resume", "overwrite", "plan", "pack"):
        if s[name] not in (0, 1):
            raise UserError(f"--{name}={s[name]}: use 0 or 1")
    if s["memory_budget"] < 0 and s["memory_budget"] != -1:
        raise UserError(f"--memory_budget={s['memory_budget']}: GiB, or -1 for half the RAM")
    layout, _, gguf_type = s["out_format"].partition(":")
    if layout not in ("", *OUT_FORMATS) or gguf_type and (layout != "gguf" or gguf_type not in GGUF_TYPES):
        raise UserError(f"--out_format={s['out_format']}: use meta, hf or gguf (gguf:{', gguf:'.join(GGUF_TYPES)})")
    if s["val_fraction"] == -1:
        s["val_fraction"] = 0.1 if s["objective"] == "dpo" else 0.0
    if not 0 <= s["val_fraction"] < 1:
        raise UserError(f"--val_fraction={s['val_fraction']}: must be in [0, 1), or -1")
    if s["dpo_beta"] <= 0 or not 0 <= s["dpo_label_smoothing"] < 0.5:
        raise UserError(f"--dpo_beta={s['dpo_beta']} --dpo_label_smoothing={s['dpo_label_smoothing']}: beta must be "
                        "positive, label smoothing in [0, 0.5)")
    for name in ("dropout", "lora_dropout", "beta1", "beta2"):
        if not 0 <= s[name] < 1:
            raise UserError(f"--{name}={s[name]}: must be in [0, 1)")
    targets = tuple(t.strip() for t in s["lora_targets"].split(",") if t.strip())
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise UserError(f"--lora_targets={s['lora_targets']}: {'unknown ' + unknown[0] if unknown else 'none given'}; "
                        f"name some of {', '.join(LORA_TARGETS)}")
    return Settings(
        model_path=s["model_path"], out_path=s["out_path"], out_format=s["out_format"], offload_path=s["offload_path"],
        device=s["device"], compute_dtype=s["compute_dtype"], memory_budget=s["memory_budget"],
        keep_activations=bool(s["keep_activations"]), seed=s["seed"], iters=s["iters"], dropout=s["dropout"],
        router_aux_loss_coef=s["router_aux_loss_coef"],
        mode=s["mode"], base_quant=s["base_quant"], base_copy=s["base_copy"], eval_period=s["eval_period"], prompt=s["prompt"],
        gen_tokens=s["gen_tokens"], save_period=s["save_period"], resume=bool(s["resume"]),
        overwrite=bool(s["overwrite"]), plan=bool(s["plan"]), plan_mb=s["plan_mb"], dist_timeout=s["dist_timeout"],
        lora=Lora(rank=s["lora_rank"], alpha=s["lora_alpha"], dropout=s["lora_dropout"], targets=targets),
        optim=Optim(kind=s["optimizer"] if s["mode"] == "full" else "adamw", lr=s["lr"],
                    warmup_iters=s["warmup_iters"], lr_decay=bool(s["lr_decay"]), min_lr=s["min_lr"],
                    weight_decay=s["weight_decay"], beta1=s["beta1"], beta2=s["beta2"], eps=s["eps"],
                    grad_clip=s["grad_clip"]),
        data=Data(path=s["data_path"], prompt_template=s["prompt_template"], system_template=s["system_template"],
                  seq_len=s["seq_len"], batch_size=s["batch_size"], grad_accum=s["grad_accum"],
                  val_fraction=s["val_fraction"], pack=bool(s["pack"]), objective=s["objective"]),
        dpo=Dpo(beta=s["dpo_beta"], label_smoothing=s["dpo_label_smoothing"]))
