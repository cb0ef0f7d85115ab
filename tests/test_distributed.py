"""Beyond one GPU, checked on CPUs: data parallel with two processes (gloo) through `qlora-tutor finetune`,
FSDP sharding of 4-bit weights (bitsandbytes quant_storage), the accelerate configs, and per-GPU memory."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from qlora_tutor import distributed as dist_mod
from qlora_tutor import memory
from qlora_tutor.distributed import RankInfo, device_map, quant_storage, rank_info
from qlora_tutor.memory import GIB, per_gpu_memory, unit_bytes

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


# ------------------------------------------------------------------------------------------ rank and placement
def test_rank_info_reads_the_launcher_environment():
    assert rank_info({}) == RankInfo(0, 0, 1)
    info = rank_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (info.rank, info.local_rank, info.world_size, info.is_main, info.distributed) == (3, 1, 4, False, True)
    assert rank_info({"RANK": "0", "WORLD_SIZE": "2"}).is_main
    with pytest.raises(ValueError, match="integers"):
        rank_info({"RANK": "x"})
    with pytest.raises(ValueError, match="inconsistent"):
        rank_info({"RANK": "2", "WORLD_SIZE": "2"})


def test_each_process_loads_onto_its_own_gpu():
    for local in (0, 1, 5):
        assert device_map(RankInfo(local, local, 8), cuda=True) == {"": local}
    assert device_map(RankInfo(1, 1, 2), cuda=False) == "cpu"


def test_quant_storage_is_a_float_only_under_fsdp(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert quant_storage(torch.bfloat16) == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    assert quant_storage(torch.bfloat16) == torch.bfloat16
    assert quant_storage(torch.float16) == torch.float16
    assert quant_storage(torch.bfloat16, fsdp=False) == torch.uint8


def test_fingerprints_are_found_in_launch_output():
    fp0, fp1 = "a" * 64, "0123456789abcdef" * 4
    text = f"training: 100%|##| 3/3\rrank 0/2: adapter fingerprint {fp0}\nlog\nrank 1/2: adapter fingerprint {fp1}\n"
    assert dist_mod.parse_fingerprints(text) == {0: fp0, 1: fp1}
    assert dist_mod.parse_fingerprints("rank 0/2: adapter fingerprint abc") == {}  # not a sha256


def test_adapter_difference_is_relative_to_what_training_learned():
    g = torch.Generator().manual_seed(0)
    ref = {"x.lora_A.weight": torch.randn(4, 8, generator=g), "x.lora_B.weight": torch.randn(8, 4, generator=g) * 1e-3}
    same = {k: v.clone() for k, v in ref.items()}
    assert dist_mod.adapter_difference(same, ref) == 0.0
    import numpy as np
    for seed in (1, 2):
        g2 = torch.Generator().manual_seed(seed)
        other = {k: v + torch.randn(v.shape, generator=g2) * 1e-4 for k, v in ref.items()}
        flat = lambda d, keys: np.concatenate([d[k].double().numpy().ravel() for k in keys])  # noqa: E731
        keys = sorted(ref)
        want = np.linalg.norm(flat(other, keys) - flat(ref, keys)) / np.linalg.norm(flat(ref, ["x.lora_B.weight"]))
        assert math.isclose(dist_mod.adapter_difference(other, ref), want, rel_tol=1e-9)
    with pytest.raises(ValueError, match="different tensors"):
        dist_mod.adapter_difference({"y.lora_B.weight": torch.ones(1)}, ref)
    with pytest.raises(ValueError, match="not been trained"):
        dist_mod.adapter_difference(ref, {k: torch.zeros_like(v) for k, v in ref.items()})


def test_fingerprint_changes_with_any_trainable_value():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(7, 5), torch.nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    assert dist_mod.adapter_fingerprint(a) == dist_mod.adapter_fingerprint(b)
    with torch.no_grad():
        b.weight[3, 2] = torch.nextafter(b.weight[3, 2], torch.tensor(1.0))  # one ulp
    assert dist_mod.adapter_fingerprint(a) != dist_mod.adapter_fingerprint(b)
    b.weight.requires_grad_(False)  # frozen tensors are not part of the adapter
    a.weight.requires_grad_(False)
    assert dist_mod.adapter_fingerprint(a) == dist_mod.adapter_fingerprint(b)


# ------------------------------------------------------------------------------------------ accelerate configs
def _launch_env(path: Path) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file path` would do: its own parser, validation and environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", ["accelerate_ddp_cpu.yaml", "accelerate_ddp_2gpu.yaml"])
def test_ddp_configs_launch_two_local_processes(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    cfg = load_config_from_file(str(CONFIGS / name))
    assert cfg.distributed_type == DistributedType.MULTI_GPU and cfg.num_processes == 2 and cfg.num_machines == 1
    args, env = _launch_env(CONFIGS / name)
    assert args.multi_gpu and not args.cpu and args.num_processes == 2  # torchrun-style launcher, 2 processes
    assert env.get("ACCELERATE_USE_FSDP", "false") == "false"


def test_fsdp_config_sets_what_qlora_needs():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    cfg = load_config_from_file(str(CONFIGS / "accelerate_fsdp_qlora.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes == 2
    args, env = _launch_env(CONFIGS / "accelerate_fsdp_qlora.yaml")
    assert args.use_fsdp
    expected = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_USE_ORIG_PARAMS": "false",
                "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_SYNC_MODULE_STATES": "true",
                "FSDP_OFFLOAD_PARAMS": "false", "FSDP_BACKWARD_PREFETCH": "BACKWARD_PRE"}
    assert {k: env.get(k) for k in expected} == expected
    with pytest.MonkeyPatch.context() as mp:  # inside such a launch, finetune stores 4-bit codes as bf16
        mp.setenv("ACCELERATE_USE_FSDP", env["ACCELERATE_USE_FSDP"])
        assert quant_storage(torch.bfloat16) == torch.bfloat16


def test_config_loader_rejects_a_misspelt_key(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "accelerate_ddp_2gpu.yaml").read_text() + "num_proceses: 2\n")
    with pytest.raises(ValueError, match="num_proceses"):
        load_config_from_file(str(bad))


# -------------------------------------------------------------------------- bitsandbytes quant_storage on CPU
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_float_storage_holds_the_same_bits_as_uint8(seed, storage):
    import bitsandbytes.functional as F
    g = torch.Generator().manual_seed(seed)
    per = 2 * storage.itemsize  # codes per storage element: bf16 holds 4, fp32 holds 8
    for shape in [(64, 48), (3, 8 * 25), (per * 7,), (40, 200)]:  # partial blocks, 1-D, odd block counts
        for quant_type in ("nf4", "fp4"):
            for dq in (False, True):
                x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3
                q8, s8 = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=dq)
                qf, sf = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=dq,
                                         quant_storage=storage)
                assert qf.dtype == storage and qf.numel() * per == x.numel()
                assert torch.equal(qf.reshape(-1).view(torch.uint8), q8.reshape(-1))  # same packed bytes
                assert torch.equal(sf.absmax, s8.absmax)
                assert torch.equal(F.dequantize_4bit(qf, sf), F.dequantize_4bit(q8, s8))


def test_linear4bit_with_bf16_storage_computes_like_uint8():
    import bitsandbytes as bnb
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    x = torch.randn(5, 96)
    outs = {}
    for storage in (torch.uint8, torch.bfloat16):
        layer = bnb.nn.Linear4bit(96, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                  quant_storage=storage)
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", quant_storage=storage,
                                         module=layer)
        layer = layer.to("cpu")  # quantizes
        assert layer.weight.dtype == storage
        outs[storage] = layer(x)
    assert torch.equal(outs[torch.uint8], outs[torch.bfloat16])


def _tiny_llama(folder: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_transformers_quant_storage_gives_fsdp_one_dtype(tmp_path):
    """bf16 storage + bf16 model: every parameter bf16 (FSDP can flatten them); uint8: two dtypes, one integer."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    folder = _tiny_llama(tmp_path / "m")
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    logits, dtypes = {}, {}
    for storage, dtype in ((torch.uint8, torch.bfloat16), (torch.bfloat16, torch.bfloat16)):
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=storage)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, dtype=dtype, device_map="cpu")
        dtypes[storage] = {p.dtype for p in model.parameters()}
        with torch.no_grad():
            logits[storage] = model(ids).logits
    assert dtypes[torch.bfloat16] == {torch.bfloat16}
    assert dtypes[torch.uint8] == {torch.uint8, torch.bfloat16}
    assert torch.equal(logits[torch.uint8], logits[torch.bfloat16])  # same bits, same model


# ----------------------------------------------------------------------------------------- memory per GPU
def test_ddp_replicates_everything():
    single = per_gpu_memory("llama-7b", "qlora", "single", 1, per_device_batch=2, seq_len=512)
    ref = memory.estimate("llama-7b", "qlora", batch_size=2, seq_len=512)
    assert single.total == ref.total  # the single-GPU case is memory.estimate itself
    for n in (2, 4, 8):
        ddp = per_gpu_memory("llama-7b", "qlora", "ddp", n, per_device_batch=2, seq_len=512)
        assert ddp.total == ref.total + ref.components["gradients"]  # + DDP's gradient buckets
        assert ddp.settings["global_batch"] == 2 * n
        assert all(ddp.placement[k] == "replicated" for k in ddp.components)


def test_fsdp_units_add_up_to_the_whole_model():
    for name in ("llama-7b", "llama-2-70b", "qwen2.5-0.5b"):
        for method in ("qlora", "lora"):
            u = unit_bytes(name, method, lora_r=16)
            est = memory.estimate(name, method, lora_r=16)
            shape = memory.model_shape(name)
            buffers = 2 * (shape.d // 2) * 4  # rotary tables: neither a layer nor the root
            assert u["layers"] * u["layer_frozen"] + u["root"] + buffers == est.components["frozen_weights"]
            assert u["layers"] * u["layer_adapter"] == est.components["adapter_weights"]


def test_fsdp_shards_by_n_from_arithmetic():
    """Llama-2-70B (hidden 8192, MLP 28672, 80 layers, 8 KV heads, vocab 32000) by hand, in float64."""
    h, i, L, kv, V = 8192, 28672, 80, 1024, 32000
    lin = h * (h + kv + kv + h) + 3 * h * i                # weights of one layer's 7 linear layers
    packed = lin / 2                                        # 4 bits each
    layer = packed + 2 * h * 2                              # + two bf16 RMSNorm weights
    root = (2 * V * h + h) * 2                              # embeddings + lm_head + final norm, bf16
    r = 8
    adapters = L * 4 * r * ((h + h) + (h + kv) * 2 + (h + h) + 3 * (h + i))  # fp32 A and B of the 7 linears
    u = unit_bytes("llama-2-70b", "qlora", lora_r=r)
    assert u["layer_frozen"] == layer and u["root"] == root and L * u["layer_adapter"] == adapters
    for n in (2, 4, 8):
        est = per_gpu_memory("llama-2-70b", "qlora", "fsdp", n, lora_r=r, seq_len=512)
        c = est.components
        assert math.isclose(c["frozen_weights"], (L * layer + root) / n, rel_tol=1e-6)
        assert c["adapter_weights"] == math.ceil(adapters / n)
        assert c["optimizer_state"] == math.ceil(2 * adapters / n)  # AdamW: m and v in fp32
        assert c["gathered_units"] == root + 2 * (layer + adapters / L) + adapters / L
        single = memory.estimate("llama-2-70b", "qlora", lora_r=r, seq_len=512)
        for k in ("quantization_constants", "activations"):
            assert c[k] == single.components[k]  # whole on every GPU
        saved = sum(single.components[k] - c[k] for k in ("frozen_weights", "adapter_weights", "optimizer_state"))
        if single.details.get("peak_moment") == "end of backward":
            saved += single.components["gradients"] - c["gradients"]
        assert est.total == single.total - saved + c["gathered_units"]
    one = per_gpu_memory("llama-2-70b", "qlora", "fsdp", 1, lora_r=r, seq_len=512)
    assert one.total == memory.estimate("llama-2-70b", "qlora", lora_r=r, seq_len=512).total


def test_70b_on_two_24gb_gpus():
    """Answer.AI's claim (FSDP + QLoRA trains a 70B model on two 24 GB cards), by our estimate:
    yes at short sequences with a small rank; at batch 2 x 2048 only with CPU offload; never with DDP."""
    card = 24 * GIB
    fits = per_gpu_memory("llama-2-70b", "qlora", "fsdp", 2, lora_r=8, seq_len=512)
    assert fits.fits(card) and fits.on_card > 20e9  # tight: most of the card
    long = dict(lora_r=8, per_device_batch=2, seq_len=2048)
    assert not per_gpu_memory("llama-2-70b", "qlora", "fsdp", 2, **long).fits(card)
    offload = per_gpu_memory("llama-2-70b", "qlora", "fsdp", 2, cpu_offload=True, **long)
    assert offload.fits(card) and offload.cpu_bytes > 17e9  # the shards now sit in CPU RAM
    assert not per_gpu_memory("llama-2-70b", "qlora", "ddp", 2, lora_r=8, seq_len=512).fits(card)
    assert not per_gpu_memory("llama-2-70b", "qlora", "single", 1, lora_r=8, seq_len=512).fits(card)
    assert per_gpu_memory("llama-2-70b", "qlora", "fsdp", 4, lora_r=64, seq_len=2048).fits(card)


def test_per_gpu_memory_rejects_bad_input():
    with pytest.raises(ValueError, match="strategy"):
        per_gpu_memory("llama-7b", strategy="zero3")
    with pytest.raises(ValueError, match="n_gpus"):
        per_gpu_memory("llama-7b", n_gpus=0)
    with pytest.raises(ValueError, match="one GPU"):
        per_gpu_memory("llama-7b", strategy="single", n_gpus=2)
    with pytest.raises(ValueError, match="FSDP option"):
        per_gpu_memory("llama-7b", strategy="ddp", cpu_offload=True)
    with pytest.raises(TypeError, match="per_device_batch"):
        per_gpu_memory("llama-7b", batch_size=4)


# --------------------------------------------------------------------------------- real multi-process runs
def test_fsdp_shards_4bit_weights_on_cpus(tmp_path):
    """torch FSDP (the Trainer's recipe) with gloo: uint8 storage is refused; bf16 storage shards in half and
    one step on half a batch per process equals one unsharded step on the whole batch."""
    cmd = dist_mod.torchrun_command(2, ["--storage", "uint8,bf16", "--json", str(tmp_path / "r")],
                                    module="qlora_tutor.fsdp_check")
    dist_mod.launch(cmd, timeout=180)
    for rank in (0, 1):
        uint8, bf16 = json.loads((tmp_path / f"r.rank{rank}.json").read_text())
        assert "integer" in uint8["error"] and "uint8" in uint8["param_dtypes"]
        assert bf16["param_dtypes"] == ["bfloat16", "float32"]  # bf16 base, fp32 LoRA (separate FSDP units)
        assert abs(2 * bf16["shard_bytes"] - bf16["full_bytes"]) <= 2 * 64 * 4  # half each (plus padding)
        assert abs(bf16["loss_mean"] - bf16["ref_loss"]) < 1e-5
        assert bf16["adapter_max_diff"] < 1e-6 < 1e-3 < bf16["moved"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and a small byte-level BPE tokenizer trained on the shipped stories."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from qlora_tutor import data
    folder = tmp_path_factory.mktemp("tiny")
    texts = [ex["output"] for ex in data.load_examples("stories", "train")[:500]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                                 pad_token_id=fast.pad_token_id)).save_pretrained(folder)
    return folder


def test_two_process_data_parallel_matches_one_process(tmp_path, tiny_model):
    """`qlora-tutor finetune` under torchrun, 2 CPU processes x batch 4, against 1 process x batch 8: same data
    order (seeded sampler, consecutive slices per rank), loss averaged over all tokens of the global batch,
    dropout off. Both ranks must end bit-identical and equal the single run within float tolerance."""
    from safetensors.torch import load_file
    common = ["finetune", "--model", str(tiny_model), "--data", "stories", "--train-examples", "24",
              "--steps", "3", "--grad-accum", "1", "--max-length", "160", "--lora-dropout", "0",
              "--warmup-steps", "0", "--save-steps", "0", "--logging-steps", "1", "--eval-examples", "2",
              "--generate-examples", "0", "--lr", "0.01", "--seed", "0"]
    dist_mod.launch([sys.executable, "-m", "qlora_tutor.cli", *common, "--batch-size", "8",
                     "--output", str(tmp_path / "one")], timeout=120)
    proc = dist_mod.launch(dist_mod.torchrun_command(2, [*common, "--batch-size", "4",
                                                         "--output", str(tmp_path / "two")]), timeout=120)
    prints = dist_mod.parse_fingerprints(proc.stdout + proc.stderr)
    assert sorted(prints) == [0, 1] and prints[0] == prints[1], prints  # the replicas are identical
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    rel = dist_mod.adapter_difference(two, one)
    # float rounding (all-reduce adds two partial gradients in another order) stays far below what training learned
    assert rel < 1e-3, rel
