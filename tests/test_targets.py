"""One target-module rule everywhere: our selection equals PEFT's on a real model, and the from-scratch layers,
the real stack's up-front check and the memory calculator all select the same layers."""

import copy

import pytest
import torch

from qlora_tutor import memory, models, targets
from qlora_tutor.qlora import add_adapters

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _peft_selection(model, spec) -> set[str]:
    """The modules PEFT wraps with LoRA, by their names in the plain model."""
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=spec))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and n.startswith(prefix)}


SPECS = ["all-linear", ["q_proj", "v_proj"], ["down_proj"], ["self_attn.o_proj"], ["layers.1.mlp.up_proj"],
         ["q_proj", "mlp.gate_proj"]]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_our_selection_is_peft_selection(spec):
    model = _tiny_llama()
    assert set(targets.find_linear_targets(model, spec)) == _peft_selection(model, spec)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_from_scratch_layers_and_the_real_stack_check_select_the_same_layers(spec):
    model = _tiny_llama()
    chosen = set(targets.find_linear_targets(model, spec))
    adapted = add_adapters(copy.deepcopy(model), spec, r=2, alpha=4, compute_dtype="fp32")
    assert {n for n, m in adapted.named_modules() if hasattr(m, "lora_A")} == chosen
    assert set(models.check_targets(model.config, spec)) == chosen  # built on the meta device, no weights


def test_the_calculator_uses_the_same_rule():
    assert memory.lora_target_names("all-linear") == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj")
    assert memory.lora_target_names("q_proj,v_proj") == ("q_proj", "v_proj")
    assert memory.lora_target_names(["self_attn.o_proj"]) == ("o_proj",)
    with pytest.raises(ValueError, match="matches no module.*'q_proj'"):
        memory.lora_target_names(["qproj"])


def test_comma_strings_and_bad_specs():
    assert targets.parse_target_modules(" q_proj , v_proj ") == ["q_proj", "v_proj"]
    assert targets.parse_target_modules("ALL-LINEAR") == "all-linear"
    for bad in ([], 5, ["q_proj", ""], ",", None):
        with pytest.raises(TypeError, match="non-empty list"):
            targets.parse_target_modules(bad)
    model = _tiny_llama()
    with pytest.raises(TypeError, match="LlamaMLP.*not an nn.Linear"):
        targets.find_linear_targets(model, ["mlp"])
    with pytest.raises(ValueError, match="matches no module of this LlamaForCausalLM"):
        targets.find_linear_targets(model, ["q_proj", "qkv"])
    assert "lm_head" not in targets.find_linear_targets(model, "all-linear")
    assert targets.find_linear_targets(model, ["lm_head"]) == ["lm_head"]  # named explicitly, it is selected
