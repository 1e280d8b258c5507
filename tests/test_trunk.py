"""The frozen-trunk cache changes the cost of the align step, never its result.

On a 4-layer random Llama with LoRA adapters above layer L, the hidden states entering L are computed
once (``trunk_states``) and the align step runs layers L..3 on them (``TopLayers``): on one grouped
batch (prompts of different lengths, K = 2, 3 and 4, a 1-token completion) the loss and every
gradient must equal those of the same step through the whole model, to 1e-5.
"""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from directalign.artifacts import PolicyArtifact, TrunkStates
from directalign.lit.align import AlignModule
from directalign.logprobs import batched_completion_logps
from directalign.models import with_lora
from directalign.pairs import attach_trunk_states, build_prompt_groups, collate_prompt_groups
from directalign.stages.context import StageContext
from directalign.stages.trunk import align_first_layer
from directalign.trunk import (
    first_trained_layer,
    shared_trunk_layer,
    top_layers_completion_logps,
    trunk_states,
)
from tests.conftest import compose_config, step_loss_and_grads
from tests.test_align import BETA, PAD, STAGE, offpolicy_table


def four_layer_llama(**config) -> LlamaForCausalLM:
    """``tiny_llama``'s shape with 4 layers (seed 0, eval mode): room for a trunk below the adapters."""
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, **shape, **heads, **config)).eval()


def lora_on(layers: list[int], **extra) -> dict:
    """Adapters with random A and B (peft's default B = 0 would leave A without gradient)."""
    return {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "layers_to_transform": layers,
        "init_lora_weights": False,
        **extra,
    }


def policy(lora: dict | None) -> torch.nn.Module:
    return with_lora(four_layer_llama(), None if lora is None else OmegaConf.create(lora))


def trunk_step(
    batch: dict[str, torch.Tensor], lora: dict, method: dict, first_layer: int | None
) -> tuple[float, dict[str, torch.Tensor]]:
    module = AlignModule(policy(lora).train(), STAGE, OmegaConf.create(method), first_layer)
    return step_loss_and_grads(module, batch)


@pytest.mark.parametrize(
    ("layers", "first_layer"), [([2, 3], 2), ([1, 3], 1), ([3], 3)], ids=["top-two", "gapped", "top-one"]
)
@pytest.mark.parametrize(("loss", "length_power"), [("dpo", 0.0), ("ipo", 1.0), ("copg", 0.0), ("copg", 1.0)])
def test_top_layers_on_trunk_states_give_the_whole_model_loss_and_gradients(
    layers, first_layer, loss, length_power
):
    """Tolerance: 1e-5 absolute on the summed loss and on every gradient entry."""
    lora = lora_on(layers)
    assert first_trained_layer(policy(lora)) == first_layer
    table = offpolicy_table()
    groups, _ = build_prompt_groups(table, drop_ties=loss != "copg")
    method = {"loss": loss, "beta": BETA, "length_power": length_power}
    whole_loss, whole_grads = trunk_step(collate_prompt_groups(groups, PAD), lora, method, None)
    sft = four_layer_llama()  # the frozen weights below the adapters
    rows = trunk_states(
        sft, table["prompt_ids"], table["completion_ids"], first_layer, PAD, prompts_per_forward=2
    )
    attach_trunk_states(groups, rows)
    cached = collate_prompt_groups(groups, PAD)
    cached_loss, cached_grads = trunk_step(cached, lora, method, first_layer)
    n_pairs = len(cached["pair_a"])
    assert cached_loss * n_pairs == pytest.approx(whole_loss * n_pairs, abs=1e-5)
    assert whole_grads.keys() == cached_grads.keys()
    for name, grad in whole_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_trunk_states_are_the_whole_model_hidden_states_entering_the_layer():
    model, table = four_layer_llama(), offpolicy_table()
    rows = trunk_states(model, table["prompt_ids"], table["completion_ids"], 2, PAD, prompts_per_forward=3)
    prompt, completions = table[2]["prompt_ids"], table[2]["completion_ids"]
    for k, completion in enumerate(completions):
        ids = torch.tensor([prompt + completion])
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        start = len(prompt) + sum(len(c) for c in completions[:k])
        torch.testing.assert_close(rows[2][: len(prompt)], hidden[: len(prompt)], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            rows[2][start : start + len(completion)], hidden[len(prompt) :], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    "lora",
    [None, lora_on([0, 3]), lora_on([2, 3], modules_to_save=["embed_tokens"])],
    ids=["whole-model", "reaches-layer-0", "trains-embeddings"],
)
def test_no_trunk_when_the_layers_below_train(lora):
    assert first_trained_layer(policy(lora)) is None


def test_no_trunk_with_attention_dropout():
    model = four_layer_llama(attention_dropout=0.1)
    assert first_trained_layer(with_lora(model, OmegaConf.create(lora_on([2, 3])))) is None


def test_saved_states_load_back_row_by_row(tmp_path):
    rows = [torch.randn(5, 8), torch.randn(3, 8), torch.randn(7, 8)]
    sizes = TrunkStates.save(tmp_path, rows)
    assert sizes["memory_bytes"] == 15 * 8 * 4 and sizes["disk_bytes"] > sizes["memory_bytes"]
    artifact = TrunkStates("trunk", "key", tmp_path, {"metrics": {"first_layer": 2}})
    assert artifact.first_layer == 2
    for loaded, saved in zip(artifact.rows(), rows, strict=True):
        assert torch.equal(loaded, saved)


TOP_LAYER = (
    "stage.align.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], layers_to_transform: [3]}"
)


@pytest.mark.parametrize(
    ("overrides", "first_layer"),
    [
        ([TOP_LAYER], 3),
        ([], None),  # lora null: the whole model trains
        ([TOP_LAYER, "stage.align.group_by_prompt=false"], None),
        ([TOP_LAYER, "stage.align.frozen_trunk=false"], None),
        ([TOP_LAYER, "trainer.precision=bf16-true"], None),
    ],
    ids=["top-layer", "whole-model", "pair-batches", "switched-off", "half-precision-weights"],
)
def test_the_pipeline_caches_the_trunk_only_where_it_applies(tmp_path, overrides, first_layer):
    four_layer_llama().save_pretrained(tmp_path / PolicyArtifact.MODEL_DIR)
    sft = PolicyArtifact("sft", "key", tmp_path, {})
    ctx = StageContext(compose_config(["experiment=smoke", *overrides]), store=None, task=None)
    assert align_first_layer(ctx, sft) == first_layer


def perturbed(model: LlamaForCausalLM, *prefixes: str) -> LlamaForCausalLM:
    """A copy of ``model`` with noise on the parameters whose names start with one of ``prefixes``."""
    other = four_layer_llama()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, weight in other.named_parameters():
            if name.startswith(prefixes):
                weight.add_(0.1 * torch.randn_like(weight))
    return other


@pytest.mark.parametrize(
    "prefixes, layer",
    [
        (("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"), 2),
        (("model.layers.3.mlp",), 3),
        (("lm_head",), 3),
        (("model.layers.0.self_attn.q_proj",), None),
        (("model.embed_tokens",), None),
    ],
)
def test_shared_trunk_is_the_first_layer_that_differs(prefixes, layer):
    model = four_layer_llama()
    assert shared_trunk_layer(perturbed(model, *prefixes), model) == layer


def test_reference_logps_from_the_shared_trunk_equal_a_whole_forward():
    """Prompts of different lengths, completions of 1 to 4 tokens: running the reference's layers 2-3 on
    the policy's states entering layer 2 gives the reference's own log-probs."""
    reference = four_layer_llama()
    policy = perturbed(reference, "model.layers.2.", "model.layers.3.")
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15], [10, 11]]
    completions = [[20, 21, 1], [22], [23, 24, 25, 26], [27, 28], [29, 30, 31]]
    with torch.no_grad():
        states = [
            policy(torch.tensor([p + c]), output_hidden_states=True).hidden_states[2][
                0, : len(p) + len(c) - 1
            ]
            for p, c in zip(prompts, completions, strict=True)
        ]
    got = top_layers_completion_logps(reference, 2, prompts, completions, states, PAD, batch_size=3)
    expected = batched_completion_logps(reference, prompts, completions, PAD, batch_size=3)
    assert [len(row) for row in got] == [len(c) for c in completions]
    for row, expected_row in zip(got, expected, strict=True):
        assert torch.allclose(torch.tensor(row), torch.tensor(expected_row), atol=1e-5)
    mine = batched_completion_logps(policy, prompts, completions, PAD, batch_size=3)
    assert not torch.allclose(torch.tensor(mine[0]), torch.tensor(expected[0]), atol=1e-3)
