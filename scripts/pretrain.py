"""Pretrain QLoRA Tutor's embedded base model: a tiny Llama that writes Story World stories.

Generates the corpus (seeded), trains a byte-level BPE tokenizer on it, trains a LlamaForCausalLM from
scratch (AdamW, warm-up + cosine; bf16 autocast on a GPU, fp32 on a CPU), measures held-out perplexity, and
saves a standard transformers folder (safetensors + tokenizer) atomically, with a loss curve and metrics.

    python scripts/pretrain.py --device cuda --steps 6000         # the shipped model (GPU, minutes)
    python scripts/pretrain.py --device cpu --small --steps 300   # a smaller model on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qlora_tutor import storyworld  # noqa: E402
from qlora_tutor.paths import atomic_save_dir, atomic_save_file, atomic_write_text  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CONFIGS = {  # the shipped model, and a smaller one a CPU trains in minutes
    "full": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4),
}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus; adds <s> in front of every text it encodes."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=256, padding_side="right")


def encode_corpus(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """<s> story </s> <s> story </s> ... as one flat token array (the packed pretraining stream)."""
    eos = tokenizer.eos_token_id
    encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True)
    lengths = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for e in encs:
        n = len(e.ids)
        flat[pos:pos + n] = e.ids
        flat[pos + n] = eos
        pos += n + 1
    return flat


@torch.no_grad()
def story_perplexity(model, tokenizer, texts: list[str], device: str, batch: int = 64) -> float:
    """exp(mean next-token loss) over whole held-out stories, each scored alone: <s> story </s>."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch):
        enc = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts[i:i + batch]]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), tokenizer.pad_token_id)
        labels = torch.full((len(enc), width), -100)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, :len(e)] = torch.tensor(e)
            labels[r, :len(e)] = torch.tensor(e)
            mask[r, :len(e)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    model.train()
    return math.exp(total / count)


@torch.no_grad()
def reset_unseen_tokens(model, tokenizer, texts: list[str], seed: int = 0) -> int:
    """Give every token that never occurs in the corpus a fresh *input* embedding drawn like a seen one.

    Byte-level BPE keeps all 256 bytes, and the corpus uses few of them. With tied embeddings, training
    pushes those rows to large 'never predict me' vectors (norm ~2 vs ~1.1 seen), and a prompt made of such
    tokens ('###', 'Write', ...) then derails the model. So the embeddings are untied: the output layer keeps
    the trained rows (those tokens are still never predicted), and the input rows are sampled from a normal
    with the mean and covariance of the seen rows, so unknown words look ordinary and stay distinguishable.
    Returns how many rows were redrawn.
    """
    seen = torch.zeros(len(tokenizer), dtype=torch.bool)
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True):
        seen[enc.ids] = True
    seen[[tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]] = True
    emb = model.get_input_embeddings().weight
    if model.config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
        model.config.tie_word_embeddings = False
    rows = emb[seen.to(emb.device)].double().cpu()
    mean = rows.mean(0)
    cov = (rows - mean).T @ (rows - mean) / len(rows)
    chol = torch.linalg.cholesky(cov + 1e-8 * torch.eye(len(mean), dtype=torch.double))
    z = torch.randn(int((~seen).sum()), len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.double)
    emb[~seen.to(emb.device)] = (mean + z @ chol.T).to(emb.dtype).to(emb.device)
    return int((~seen).sum())


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_atomically(model, tokenizer, out: Path) -> None:
    """Write the model folder next to `out` first, then swap it into place, so `out` is never half-written."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # A class name every transformers version knows (5.x writes its internal 'TokenizersBackend').
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2) + "\n")

    atomic_save_dir(out, write)


def plot_loss(history: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, losses = zip(*history)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=120)
    ax.plot(steps, losses, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_file(path, fig.savefig)
    plt.close(fig)


@torch.no_grad()
def score_base(model_dir: Path, report_dir: Path, limit: int | None = None) -> dict:
    """Greedy answers of the saved (not fine-tuned) model to the test prompts of both skills, and their scores.

    This is the 'before' of fine-tuning: the base model has never seen the prompt template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qlora_tutor import data, score

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = {}
    for skill, new_tokens in (("stories", 160), ("qa", 32)):
        rows = data.load_examples(skill, "test")[:limit]
        answers = []
        for i in tqdm(range(0, len(rows), 50), desc=f"base model on {skill}/test", file=sys.stdout):
            chunk = rows[i:i + 50]
            enc = tok([data.format_prompt(r["instruction"], r["input"]) for r in chunk], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            answers += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        mean = score.mean_score([r["instruction"] for r in rows], answers, [r["input"] for r in rows])
        result[skill] = {"test_prompts": len(rows), "mean_score": round(mean, 4),
                         "examples": [{"instruction": r["instruction"], "answer": a} for r, a in zip(rows[:3], answers)]}
        print(f"base model, {skill}/test: mean score {mean:.3f} over {len(rows)} prompts", flush=True)
    torch.manual_seed(0)
    samples = []
    for prefix in ["", "Once upon a time, there was a brave fox named", "Pip was a shy hedgehog."]:
        ids = tok(prefix, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=160,
                             pad_token_id=tok.pad_token_id)
        samples.append(tok.decode(out[0], skip_special_tokens=True))
    result["samples_temperature_0.8"] = samples
    atomic_write_text(report_dir / "base_scores.json", json.dumps(result, indent=1))
    return result


def finish_in_place(args) -> None:
    """The last pretraining step (reset_unseen_tokens) applied to an already trained model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.out)
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    heldout = storyworld.generate_stories(2000, seed=args.seed + 1)
    before = story_perplexity(model, tokenizer, heldout, "cpu")
    n_reset = reset_unseen_tokens(model, tokenizer, storyworld.generate_corpus(50_000, seed=args.seed))
    after = story_perplexity(model, tokenizer, heldout, "cpu")
    save_atomically(model, tokenizer, args.out)
    report = {"unseen_tokens_reset": n_reset, "heldout_perplexity_before_reset": round(before, 4),
              "heldout_perplexity": round(after, 4), "command": "python scripts/pretrain.py " + " ".join(sys.argv[1:])}
    atomic_write_text((args.report_dir or args.out.parent) / "pretrain_reset_unseen.json", json.dumps(report, indent=1))
    print(report)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", default="auto", help="optimizer steps, or 'auto': as many as fit in --time-budget")
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds of training for --steps auto")
    p.add_argument("--small", action="store_true", help="the smaller CPU configuration (hidden 128)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "embedded-model")
    p.add_argument("--report-dir", type=Path, default=None, help="where loss.png and metrics.json go (default: next to --out)")
    p.add_argument("--documents", type=int, default=None, help="corpus size (default 600,000 on GPU, 40,000 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 256 GPU, 32 CPU)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--reset-unseen", action="store_true",
                   help="do not train: apply the final unseen-token reset to the model at --out (for a model "
                        "trained before that step existed), re-measure perplexity, save in place")
    p.add_argument("--score-base", action="store_true",
                   help="do not train: score the model saved at --out on the test splits (writes base_scores.json)")
    args = p.parse_args()
    if args.score_base:
        score_base(args.out, args.report_dir or args.out.parent)
        return
    if args.reset_unseen:
        finish_in_place(args)
        return

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device == "cuda"
    n_stories = args.documents or (600_000 if gpu else 40_000)
    batch = args.batch_size or (256 if gpu else 32)
    report_dir = args.report_dir or args.out.parent
    report_dir.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.time()

    # --- corpus and tokenizer (the held-out stories come from a different seed)
    corpus = storyworld.generate_corpus(n_stories, seed=args.seed)
    heldout = storyworld.generate_stories(2000, seed=args.seed + 1)
    tokenizer = train_tokenizer(corpus[:50_000], args.vocab_size)
    stream = torch.from_numpy(encode_corpus(tokenizer, corpus).astype(np.int64))
    print(f"corpus: {n_stories:,} documents, {len(stream):,} tokens, vocab {len(tokenizer)}, "
          f"prepared in {time.time() - t0:.0f}s", flush=True)

    # --- model
    cfg = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=args.context, rms_norm_eps=1e-5,
                      num_key_value_heads=CONFIGS["small" if args.small else "full"]["num_attention_heads"],
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      **CONFIGS["small" if args.small else "full"])
    model = LlamaForCausalLM(cfg).to(device)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"model: {n_params:,} parameters on {device}", flush=True)
    decay = [t for n, t in model.named_parameters() if t.dim() >= 2]
    no_decay = [t for n, t in model.named_parameters() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=gpu)
    stream = stream.to(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    offsets = torch.arange(args.context + 1, device=device)

    def get_batch() -> torch.Tensor:
        starts = torch.randint(0, len(stream) - args.context - 1, (batch,), generator=gen).to(device)
        return stream[starts[:, None] + offsets]

    def step_fn(step: int, steps: int) -> float:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, warmup=min(200, steps // 10 + 1))
        chunk = get_batch()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    # --- how many steps: fixed, or as many as fit in the time budget (timed on throwaway steps, then reset)
    if args.steps == "auto":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for i in range(5):
            step_fn(i, 1000)
        if gpu:
            torch.cuda.synchronize()
        tb = time.time()
        for i in range(20):
            step_fn(i, 1000).item()
        per_step = (time.time() - tb) / 20
        steps = max(100, int(args.time_budget / per_step) // 100 * 100)
        print(f"timing: {per_step * 1000:.1f} ms/step -> {steps} steps for {args.time_budget:.0f}s", flush=True)
        model.load_state_dict(state)
        opt.state.clear()
        torch.manual_seed(args.seed)
        gen.manual_seed(args.seed)
    else:
        steps = int(args.steps)

    # --- train
    history: list[tuple[int, float]] = []
    tt = time.time()
    pending = []
    for step in tqdm(range(steps), desc="pretraining", mininterval=10, file=sys.stdout):
        loss = step_fn(step, steps)
        if step % 10 == 0 or step == steps - 1:
            pending.append((step, loss.detach()))
        if len(pending) >= 20 or step == steps - 1:
            history += [(s, v.item()) for s, v in pending]
            pending = []
            print(f"step {history[-1][0]:>6}  loss {history[-1][1]:.4f}  {time.time() - tt:.0f}s", flush=True)
    train_seconds = time.time() - tt

    # --- finish (neutral rows for never-seen tokens), evaluate, sample, save
    n_reset = reset_unseen_tokens(model, tokenizer, corpus[:50_000])
    ppl = story_perplexity(model, tokenizer, heldout, device)
    model = model.float().cpu().eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=160)
    torch.manual_seed(args.seed)
    samples = []
    for prefix in ["", "Once upon a time, there was a brave fox named", "Pip was a shy hedgehog."]:
        ids = tokenizer(prefix, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=160)
        samples.append(tokenizer.decode(out[0], skip_special_tokens=True))
    save_atomically(model, tokenizer, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    config_name = "small" if args.small else "full"
    plot_loss(history, report_dir / "loss.png",
              f"Pretraining the embedded model ({config_name}, {n_params / 1e6:.1f}M params, {device})")
    import transformers
    metrics = {
        "config": config_name, "parameters": n_params, "bytes_on_disk": size,
        "weights_bytes": (args.out / "model.safetensors").stat().st_size,
        "vocab_size": len(tokenizer), "context": args.context, "steps": steps, "batch_size": batch,
        "tokens_seen": steps * batch * args.context, "corpus_documents": n_stories, "corpus_tokens": len(stream),
        "lr": args.lr, "seed": args.seed, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(steps * batch * args.context / train_seconds),
        "final_train_loss": history[-1][1], "heldout_stories": len(heldout), "heldout_perplexity": round(ppl, 4), "unseen_tokens_reset": n_reset,
        "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "command": "python scripts/pretrain.py " + " ".join(sys.argv[1:]),
        "samples": samples, "loss_history": history,
    }
    atomic_write_text(report_dir / "metrics.json", json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k != "loss_history"}, indent=1))
    print(f"saved to {args.out} ({size / 1e6:.1f} MB) in {time.time() - t0:.0f}s total")


if __name__ == "__main__":
    main()
