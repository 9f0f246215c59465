"""Greedy completion as a sanity check of a model folder.

python test_gen.py [MODEL_DIR] [DEVICE] [--prompt TEXT] [--chat [--system TEXT]] [--tokens N] [--lora ADAPTER]
                   [--temperature T] [--top_p P] [--compute_dtype D] [--offload_path DIR]
Example for real weights: python test_gen.py ../llama-2-7b mps
"""
import argparse
import time

import torch

from adapters import attach_adapter
from chat import chat_format, encode_rendered
from loader import load_model
from utils import UserError, main_guard, synchronize


def main():
    parser = argparse.ArgumentParser(description="Complete a prompt (or answer a chat message) with a model.")
    parser.add_argument("model_dir", nargs="?", default=None,
                        help="model folder in Meta's or Hugging Face's layout (default: the built-in model)")
    parser.add_argument("device", nargs="?", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--prompt", default="The basic problem is one of size.")
    parser.add_argument("--chat", action="store_true", help="the prompt is a user's message, in the model's chat format")
    parser.add_argument("--system", default=None, help="with --chat: a system message before it")
    parser.add_argument("--tokens", type=int, default=40, help="how many tokens to generate")
    parser.add_argument("--lora", default=None, help="a LoRA adapter file to apply without merging")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold (with temperature)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--compute_dtype", default="auto", help="float32, bfloat16 or auto (bf16 where native)")
    parser.add_argument("--offload_path", default=None, help="where converted models are kept")
    a = parser.parse_args()
    if a.tokens < 1:
        raise UserError(f"--tokens={a.tokens}: must be at least 1")
    model = load_model(a.model_dir, offload_path=a.offload_path, device=a.device, compute_dtype=a.compute_dtype)
    if a.lora:
        attach_adapter(model, a.lora)
    model.eval()
    if a.chat:
        render = chat_format(model.offload_dir, model.tokenizer)
        messages = [{"role": "system", "content": a.system}] * bool(a.system) + [{"role": "user", "content": a.prompt}]
        prompt = encode_rendered(model.tokenizer, render(messages, add_generation_prompt=True))
    else:
        prompt = model.tokenizer.encode(a.prompt)
    start = time.time()
    tokens = model.generate(prompt, a.tokens, temperature=a.temperature, top_p=a.top_p,
                            stop_ids=model.tokenizer.stop_ids, generator=torch.Generator().manual_seed(a.seed))
    synchronize(model.device)
    seconds = time.time() - start
    if a.chat:  # the reply alone, without the token that ended it
        print(f"{a.prompt}\n{model.tokenizer.decode([t for t in tokens if t not in model.tokenizer.stop_ids])}")
    else:
        print(model.tokenizer.decode(prompt + tokens))
    print(f"{seconds / max(1, len(tokens)) * 1000:.1f} ms per token ({len(tokens)} tokens)")
    model.close()


if __name__ == "__main__":
    main_guard(main)
