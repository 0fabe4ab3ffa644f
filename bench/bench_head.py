"""The output head's contiguous input (``saealign.models.contiguous_head``) against the strided one, same process.

Run: ``python bench/bench_head.py [--rows 24] [--tokens 18] [--repeats 3]``.

Times the default model's prompt pass as generation runs it (KV cache on, last position's logits alone:
``logits_to_keep=1``) with the head's input made contiguous (what every LoadedModel does) and with the hook removed
(what transformers does by itself), checks that both give the same logits bit for bit, and prints the ratio. On a CPU
in bf16 the strided input takes a slow path in PyTorch's linear; in fp32 or on a GPU the two should be level.
"""

from __future__ import annotations

import argparse
import time

import torch

from saealign.models import _contiguous_input, load_model


def seconds(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1).logits
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
    return best, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = load_model("default")
    ids = torch.randint(100, 20_000, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0))
    head = lm.model.get_output_embeddings()
    fixed, want = seconds(lm.model, ids, args.repeats)
    hooks = dict(head._forward_pre_hooks)
    for key, hook in hooks.items():  # transformers' own behaviour: the head reads the strided slice
        if hook is _contiguous_input:
            del head._forward_pre_hooks[key]
    try:
        strided, got = seconds(lm.model, ids, args.repeats)
    finally:
        head._forward_pre_hooks.update(hooks)
    same = torch.equal(want, got)
    print(f"prompt pass of {args.rows} rows x {args.tokens} tokens, dtype {next(lm.model.parameters()).dtype}: "
          f"contiguous head input {fixed:.3f} s, strided {strided:.3f} s -> {strided / fixed:.2f}x faster; "
          f"logits identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
