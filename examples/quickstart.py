"""bminf's core, end to end, on a tiny CPM-1-shaped model that runs on any CPU in seconds.

The real CPM-1/CPM-2/EVA weights cannot be fetched on every machine, so this demo makes its own
tiny checkpoint (random weights, so the tokens it prints are meaningless) and walks it through the
path the real ones take:

1. save it in BMInf's released ``checkpoint.pt`` format (int8 linears, fp16 elsewhere),
2. load it back strictly, straight into place, with format detection,
3. check it against HF transformers' GPT-2 holding the same (dequantized) weights,
4. decode greedily with the preallocated KV cache and check that against full recompute,
5. on a GPU, run it through ``bminf.wrapper`` under a memory limit.

    python examples/quickstart.py
"""
import argparse
import copy
import tempfile
import time

import torch

import bminf
from bminf.checkpoint import describe, load_model, save_model
from bminf.models import GPT, GPTConfig
from bminf.quantization import dequantize_state_dict, quantize_

TINY = GPTConfig(vocab_size=1000, max_positions=128, d_model=128, d_ff=512, n_heads=4, d_head=32, n_layers=4)


def greedy(model, prompt: torch.Tensor, steps: int, use_cache: bool) -> list:
    ids = prompt.clone()
    cache = model.new_cache(1, prompt.shape[1] + steps) if use_cache else None
    logits = model(ids, cache=cache)
    out = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
        ids = torch.cat([ids, token], 1)
        logits = model(token, cache=cache) if use_cache else model(ids)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = GPT(TINY).eval()
    with torch.no_grad():  # random but lively weights: default init makes greedy decoding repeat one token
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    quantize_(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, tmp, format="bminf")
        loaded = load_model(tmp, config=TINY, dtype=torch.float32)
        print(f"saved and reloaded {path.replace(tmp, '<tmp>')}: {describe(loaded)}")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    prompt = torch.randint(0, TINY.vocab_size, (1, 16))
    with torch.no_grad():
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
            from bminf.checkpoint.hf import gpt_to_hf
            hf = GPT2LMHeadModel(GPT2Config(vocab_size=TINY.vocab_size, n_positions=TINY.max_positions,
                                            n_embd=TINY.d_model, n_layer=TINY.n_layers, n_head=TINY.n_heads,
                                            n_inner=TINY.d_ff, activation_function="gelu_new",
                                            bos_token_id=0, eos_token_id=0)).eval()
            hf.load_state_dict(gpt_to_hf(dequantize_state_dict(loaded.state_dict())), strict=False)
            ref = hf(prompt).logits
            err = float((loaded(prompt) - ref).abs().max() / ref.abs().max())
            print(f"logits vs HF GPT2LMHeadModel on the dequantized weights: relative error {err:.1e}")
        except ImportError:
            print("transformers not installed: skipping the HF comparison")

        start = time.perf_counter()
        cached = greedy(loaded, prompt, args.steps, use_cache=True)
        elapsed = time.perf_counter() - start
        full = greedy(loaded, prompt, args.steps, use_cache=False)
        print(f"greedy, KV cache:     {cached}  ({args.steps / elapsed:.0f} tokens/s on {torch.get_num_threads()} threads)")
        print(f"greedy, recomputed:   {full}  -> {'identical' if cached == full else 'DIFFERENT'}")

        if torch.cuda.is_available():
            # fp16 on the GPU, int8 linears kept, blocks planned into a 256 MiB budget
            gpu = bminf.wrapper(copy.deepcopy(loaded).half(), quantization=False, memory_limit=256 << 20)
            on_gpu = greedy(gpu, prompt.cuda(), args.steps, use_cache=True)
            print(f"greedy on {torch.cuda.get_device_name()} via bminf.wrapper (fp16): {on_gpu} -> "
                  f"{'identical' if on_gpu == cached else 'differs from fp32 by rounding'}")
    if cached != full:
        raise SystemExit("KV-cache decoding differs from full recompute")


if __name__ == "__main__":
    main()
