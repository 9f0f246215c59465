"""Merge a LoRA adapter into its base model: python merge_lora.py MODEL_DIR ADAPTER OUT_DIR [--shards N] [--dtype D]

Streams the base model module by module, adds alpha/rank * B A to each adapted weight (in float32) and
writes it in the base model's layout (Meta's: its shard count; Hugging Face's) and dtype; every other
weight is copied bit for bit.
"""
import argparse
from pathlib import Path

from adapters import attach_adapter
from loader import load_model, save_model
from utils import UserError, main_guard


def main():
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model.")
    parser.add_argument("model_dir", help="the base model the adapter was trained on")
    parser.add_argument("adapter", help="adapter file (adapter.pt of a LoRA run)")
    parser.add_argument("out_dir", help="where to write the merged model")
    parser.add_argument("--shards", type=int, default=None, help="shard count (default: the base model's)")
    parser.add_argument("--dtype", default=None, help="dtype of the written weights (default: the base model's)")
    parser.add_argument("--offload_path", default=None, help="where converted models are kept")
    a = parser.parse_args()
    if Path(a.out_dir).resolve() == Path(a.model_dir).resolve():
        raise UserError(f"{a.out_dir}: the destination is the base model folder, which is never written to")
    model = load_model(a.model_dir, offload_path=a.offload_path)
    attach_adapter(model, a.adapter)
    save_model(model, a.out_dir, shards=a.shards, dtype=a.dtype)
    model.close()


if __name__ == "__main__":
    main_guard(main)
