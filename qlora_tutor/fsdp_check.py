"""FSDP-QLoRA on CPUs: the sharding mechanism of notebook 08, checked without GPUs.

    python -m torch.distributed.run --nproc_per_node 2 -m qlora_tutor.fsdp_check --storage uint8,bf16

For each storage dtype of the 4-bit codes, each process shards a tiny QLoRA model with PyTorch's FSDP as the
Trainer would and takes one SGD step on its share of a batch; the result is compared with an unsharded copy
stepped on the whole batch. uint8 storage is refused by FSDP (it flattens floats only); bf16 storage shards.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

import torch

from .distributed import RankInfo, rank_info, say
from .models import bnb_config
from .paths import atomic_write_text


def _tiny_qlora(folder: str, storage: torch.dtype, seed: int) -> torch.nn.Module:
    """A 2-layer Llama from `folder`, loaded in 4-bit by transformers with `storage` as the codes' container,
    with LoRA on every linear layer (B made non-zero so that every adapter gets a gradient)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    dtype = torch.float32 if storage == torch.uint8 else storage  # the other weights share the storage dtype
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config("nf4", True, dtype, storage),
                                                dtype=dtype, device_map="cpu")
    torch.manual_seed(seed + 1)  # the same LoRA A on every rank and in the reference
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed + 2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02, generator=g)
    return model


def _fsdp_step(storage: torch.dtype, folder: str, ids: torch.Tensor, info: RankInfo, seed: int,
               lr: float = 0.5) -> dict[str, Any]:
    """Shard one copy with FSDP, step it on this rank's rows of `ids`; step an unsharded copy on all rows."""
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    ref, model = _tiny_qlora(folder, storage, seed), _tiny_qlora(folder, storage, seed)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    out: dict[str, Any] = {"storage": str(storage).replace("torch.", ""), "rank": info.rank,
                           "world_size": info.world_size, "param_dtypes": dtypes}
    try:  # the Trainer's recipe: FSDP1, flat parameters, PEFT's policy (decoder layers + each LoRA matrix)
        fsdp = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"),
                    use_orig_params=False)
    except ValueError as err:  # uint8 storage: "Cannot flatten integer dtype tensors"
        return {**out, "error": str(err)}
    rows = ids.shape[0] // info.world_size
    mine = ids[info.rank * rows: (info.rank + 1) * rows]
    opt = torch.optim.SGD([p for p in fsdp.parameters() if p.requires_grad], lr=lr)
    loss = fsdp(input_ids=mine, labels=mine).loss
    loss.backward()  # FSDP reduce-scatters the gradients: each rank keeps the average for its shard
    opt.step()
    before = {n: p.detach().float().clone() for n, p in ref.named_parameters() if p.requires_grad}
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p -= lr * p.grad
    losses = [torch.zeros(()) for _ in range(info.world_size)]
    dist.all_gather(losses, loss.detach().float())
    with FSDP.summon_full_params(fsdp):
        got = {n.replace("_fsdp_wrapped_module.", ""): p.detach().float().clone()
               for n, p in fsdp.named_parameters() if "lora_" in n}
    want = {n: p.detach().float() for n, p in ref.named_parameters() if p.requires_grad}
    if sorted(got) != sorted(want):
        raise RuntimeError(f"FSDP changed the adapter names: {sorted(set(got) ^ set(want))[:4]}")
    return {**out, "shard_bytes": sum(p.numel() * p.element_size() for p in fsdp.parameters()),
            "full_bytes": sum(p.numel() * p.element_size() for p in ref.parameters()),
            "loss_mean": float(torch.stack(losses).mean()), "ref_loss": float(ref_loss), "n_adapters": len(want),
            "adapter_max_diff": max((got[n] - want[n]).abs().max().item() for n in want),
            "moved": max((want[n] - before[n]).abs().max().item() for n in want)}


def fsdp_qlora_check(storages: Sequence[str] = ("uint8", "bf16"), seed: int = 0,
                     log: Any = say) -> list[dict[str, Any]]:
    """FSDP-QLoRA on CPUs, inside a torchrun launch (gloo): for each 4-bit storage dtype ('uint8', 'bf16',
    'fp32'), try to shard a tiny QLoRA model as the Trainer would and take one SGD step on this rank's share of
    a batch; compare loss and adapters with an unsharded copy stepped on the whole batch.

    accelerate refuses FSDP without an accelerator, so this calls torch's FSDP directly, with the same wrapping.
    """
    import tempfile
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    names = {"uint8": torch.uint8, "fp32": torch.float32, "bf16": torch.bfloat16}
    bad = [s for s in storages if s not in names]
    if bad:
        raise ValueError(f"unknown storage {bad}: use 'uint8', 'bf16' or 'fp32'")
    info = rank_info()
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, cfg.vocab_size, (2 * info.world_size, 12), generator=torch.Generator().manual_seed(seed))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(folder)  # before joining the group: saving then happens on every rank
        dist.init_process_group("gloo")
        try:
            for s in storages:
                r = _fsdp_step(names[s], folder, ids, info, seed)
                results.append(r)
                if "error" in r:
                    log(f"rank {info.rank}/{info.world_size} · {s} storage ({', '.join(r['param_dtypes'])} "
                        f"parameters): FSDP refuses: {r['error']}")
                else:
                    log(f"rank {info.rank}/{info.world_size} · {s} storage ({', '.join(r['param_dtypes'])}): holds "
                        f"{r['shard_bytes']:,} of {r['full_bytes']:,} parameter bytes; mean loss {r['loss_mean']:.6f} "
                        f"vs unsharded {r['ref_loss']:.6f}; adapters after one step differ by "
                        f"{r['adapter_max_diff']:.1e} (the step moved them {r['moved']:.1e})")
        finally:
            dist.destroy_process_group()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run under torchrun with 2 or more processes."""
    parser = argparse.ArgumentParser(prog="python -m qlora_tutor.fsdp_check",
                                     description="FSDP-QLoRA on CPUs: run under torchrun with 2 or more processes")
    parser.add_argument("--storage", default="uint8,bf16", help="comma list of uint8, bf16, fp32")
    parser.add_argument("--json", help="write each rank's results to JSON.rankN.json")
    args = parser.parse_args(argv)
    results = fsdp_qlora_check(args.storage.split(","))
    if args.json:
        atomic_write_text(f"{args.json}.rank{rank_info().rank}.json", json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
