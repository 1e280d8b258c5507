"""The benchmarks' measuring tools: the FLOP model against hand arithmetic and against the matmuls torch
counts while an align step runs, the timer on sleeps of known length, and peak memory."""

import math
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from directalign.benchmarking import (
    BatchShape,
    LoraCounts,
    ParameterCounts,
    StepTimer,
    align_batches,
    align_step_flops,
    align_step_positions,
    cuda_peak_mib,
    grouped_step_positions,
    lora_step_flops,
    matmul_peak_flops,
    pair_tokens,
    peak_memory_mib,
    peak_rss_mib,
    sampling_flops,
    time_calls,
    training_flops,
)
from directalign.benchmarking.align_runs import trl_head_skips_masked_positions
from directalign.logprobs import completion_logps
from directalign.models import with_lora
from directalign.pairs import collate_prompt_groups
from directalign.prefix import shared_prompt_completion_logps
from directalign.trunk import TopLayers
from tests.conftest import TOP_LAYER_LORA, tiny_llama

# tiny_llama(): hidden 32, intermediate 64, 2 layers, 4 heads of 8 (q: 32 wide), 2 KV heads (k, v: 16 wide)
HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 32, 64, 2, 64
ATTENTION_WEIGHTS = HIDDEN * 32 + HIDDEN * 16 + HIDDEN * 16 + 32 * HIDDEN  # q, k, v, o = 3072
MLP_WEIGHTS = 3 * HIDDEN * INTERMEDIATE  # gate, up, down = 6144
MATMUL_WEIGHTS = LAYERS * (ATTENTION_WEIGHTS + MLP_WEIGHTS)  # 2 x 9216 = 18432
NORM_WEIGHTS = LAYERS * 2 * HIDDEN + HIDDEN  # two RMSNorms a layer and the final one = 160
HEAD = VOCAB * HIDDEN  # 2048

# Two pairs: prompts of 3 and 5 tokens, chosen completions of 2 and 1, rejected of 3 and 2.
IDS = {
    "prompt_ids": [[5, 6, 7], [8, 9, 10, 11, 12]],
    "chosen_ids": [[13, 14], [15]],
    "rejected_ids": [[16, 17, 18], [19, 20]],
}


# Two prompt groups: a 3-token prompt with K = 3 completions of 2, 1 and 3 tokens (rewards falling: pairs
# (0, 1), (0, 2), (1, 2)), and a 5-token prompt with K = 2 of 2 and 1 tokens (the second ranked first).
GROUPS = [
    {"prompt": [5, 6, 7], "completions": [[13, 14], [15], [16, 17, 18]], "pairs": [(0, 1), (0, 2), (1, 2)]},
    {"prompt": [8, 9, 10, 11, 12], "completions": [[19, 20], [21]], "pairs": [(1, 0)]},
]


@pytest.fixture(scope="module")
def grouped_batch() -> dict[str, torch.Tensor]:
    groups = [
        {
            **group,
            "ref_logps": [[0.0] * len(c) for c in group["completions"]],
            "rewards": [0.0] * len(group["completions"]),
        }
        for group in GROUPS
    ]
    return collate_prompt_groups(groups, pad_id=0)


@pytest.fixture(scope="module")
def pair_batch() -> dict[str, torch.Tensor]:
    (batch,) = align_batches(IDS, pairs_per_step=2, pad_id=0, vocab_size=VOCAB)
    return batch


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_split_the_layers_from_the_lm_head(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        HIDDEN,
        INTERMEDIATE,
        2,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, VOCAB)
    params = ParameterCounts.of(model)
    assert params == ParameterCounts(non_embedding=MATMUL_WEIGHTS + NORM_WEIGHTS, head=HEAD)
    assert params == ParameterCounts(non_embedding=18592, head=2048)


def test_pair_batch_shape_and_constant_reference(pair_batch):
    # 2B = 4 rows; prompt width 5 (left-padded), completion width 3 (right-padded): 8 columns.
    assert BatchShape.of(pair_batch) == BatchShape(
        rows=4, width=8, tokens=3 + 2 + 5 + 1 + 3 + 3 + 5 + 2, completion_width=3, completion_tokens=8
    )
    real = pair_batch["completion_mask"].bool()
    assert torch.allclose(pair_batch["ref_logps"][real], torch.tensor(-math.log(VOCAB)))


def test_align_step_flops_by_hand(pair_batch):
    shape, params = BatchShape.of(pair_batch), ParameterCounts(non_embedding=18592, head=2048)
    # Plain path: T = 4 rows x 8 columns = 32 positions; K = 4 rows x (3 + 1) logits = 16.
    assert align_step_positions(shape, share_prompt=False) == (32, 16)
    assert align_step_flops(shape, params, share_prompt=False) == 6 * 18592 * 32 + 6 * 2048 * 16 == 3_766_272
    # Shared prompt: 2 prompts x 5 columns once, then 4 rows x (3 - 1) completion inputs: T = 10 + 8 = 18;
    # one logit per prompt and one per completion input: K = 2 + 8 = 10.
    assert align_step_positions(shape, share_prompt=True) == (18, 10)
    assert align_step_flops(shape, params, share_prompt=True) == 6 * 18592 * 18 + 6 * 2048 * 10 == 2_130_816


def test_sampling_flops_by_hand():
    params = ParameterCounts(non_embedding=1000, head=300)
    # Prompts of 5 and 2 tokens, each run once; samples of 3, 1 (eos at once) and 4, 2 tokens. Positions
    # through the layers: 5 + 2 prompt tokens and (3 - 1) + 0 + (4 - 1) + (2 - 1) fed-back samples = 13;
    # through the head: every sampled token, 3 + 1 + 4 + 2 = 10.
    flops = sampling_flops(params, [5, 2], [[[7, 8, 9], [1]], [[4, 4, 4, 1], [6, 1]]])
    assert flops == 2 * 1000 * 13 + 2 * 300 * 10 == 32_000
    # An empty completion (none sampled) feeds nothing back and reads no logits.
    assert sampling_flops(params, [5], [[[]]]) == 2 * 1000 * 5
    # From a prompt cache the prompts but their last tokens run a quarter of the layers: (4 + 1) x 1000 x 2
    # / 4 = 2,500 for 10,000; their last tokens run all, as before.
    cached = sampling_flops(
        params, [5, 2], [[[7, 8, 9], [1]], [[4, 4, 4, 1], [6, 1]]], prompt_layer_share=0.25
    )
    assert cached == 32_000 - 10_000 + 2_500


def test_pair_tokens_count_each_pair_as_pair_rows(grouped_batch, pair_batch):
    # Rows: 3 + 2, 3 + 1, 3 + 3, 5 + 2, 5 + 1 tokens; pairs (0, 1), (0, 2), (1, 2) and (4, 3).
    assert pair_batch["attention_mask"].sum() == 3 + 2 + 5 + 1 + 3 + 3 + 5 + 2
    assert pair_tokens(pair_batch) == 24
    assert BatchShape.of(grouped_batch).tokens == 28
    assert pair_tokens(grouped_batch) == (5 + 4) + (5 + 6) + (4 + 6) + (6 + 7) == 43


def test_lora_step_flops_by_hand(grouped_batch):
    shape = BatchShape.of(grouped_batch)
    # 5 rows, prompt width 5, completion width 3: 2 prompts x 5 columns, then 5 rows x (3 - 1) completion
    # inputs: T = 10 + 10 = 20; one logit per prompt and one per completion input: K = 2 + 10 = 12.
    assert (shape.rows, shape.width, shape.completion_width) == (5, 8, 3)
    assert grouped_step_positions(shape, prompts=2) == (20, 12)
    model = with_lora(tiny_llama(), OmegaConf.create(TOP_LAYER_LORA))
    counts = LoraCounts.of(model, first_layer=1)
    # Frozen on top: layer 1's matmul weights and two norms, and the final norm; adapters r = 4 on q
    # (32 -> 32: 4 x 32 + 32 x 4) and v (32 -> 16: 4 x 32 + 16 x 4); reading the trunk's states: q, k
    # and v (32 x 32 + 2 x 16 x 32) and the two lora_A (4 x 32 each).
    top = ParameterCounts(non_embedding=MATMUL_WEIGHTS // 2 + 2 * HIDDEN + HIDDEN, head=HEAD)
    assert counts == LoraCounts(top=top, adapters=(128 + 128) + (128 + 64), constant_input=2048 + 256)
    assert counts == LoraCounts(
        ParameterCounts(non_embedding=9312, head=2048), adapters=448, constant_input=2304
    )
    # The head reads only real completion tokens (of 2, 1, 3, 2 and 1): K = 2 prompts + (9 - 5 rows) = 6.
    flops = (4 * 9312 + 6 * 448 - 2 * 2304) * 20 + 4 * 2048 * 6
    assert lora_step_flops(shape, 2, counts) == flops == 4 * 9312 * 20 + 49_152 + 53_760 - 92_160 == 755_712


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]],
    ids=["q-v", "all-seven"],
)
def test_lora_flop_model_counts_the_matmuls_the_trunk_step_runs(grouped_batch, targets):
    """torch's count of the weight matmuls of a forward and backward of the top layer on trunk states
    equals ``lora_step_flops`` with ``N`` the matmul weights (norms are elementwise)."""
    model = with_lora(tiny_llama(), OmegaConf.create({**TOP_LAYER_LORA, "target_modules": targets})).train()
    width = grouped_batch["completion_mask"].shape[1]
    states = torch.randn(*grouped_batch["input_ids"].shape, HIDDEN)
    with FlopCounterMode(display=False) as counter:
        shared_prompt_completion_logps(
            TopLayers(model, 1),
            grouped_batch["input_ids"],
            grouped_batch["attention_mask"],
            width,
            grouped_batch["prompt_index"],
            states,
            grouped_batch["completion_mask"],
        ).sum().backward()
    counted = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    counts = LoraCounts.of(model, first_layer=1)
    matmuls = replace(counts, top=ParameterCounts(non_embedding=MATMUL_WEIGHTS // 2, head=HEAD))
    assert counted == lora_step_flops(BatchShape.of(grouped_batch), 2, matmuls)


@pytest.mark.parametrize(
    ("share_prompt", "logps"), [(False, completion_logps), (True, shared_prompt_completion_logps)]
)
def test_flop_model_counts_the_matmuls_the_align_step_runs(pair_batch, share_prompt, logps):
    """torch's own count of the weight matmuls (aten.mm) of a forward and backward equals the model's
    6 N T + 6 H K with N the matmul weights: the positions T and K are the ones that execute. (The
    RMSNorm weights in N are elementwise, and attention scores are not mm; the model leaves them out.)"""
    model = tiny_llama().train()
    width = pair_batch["completion_mask"].shape[1]
    with FlopCounterMode(display=False) as counter:
        logps(model, pair_batch["input_ids"], pair_batch["attention_mask"], width).sum().backward()
    counted = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    positions = align_step_positions(BatchShape.of(pair_batch), share_prompt)
    assert counted == training_flops(ParameterCounts(non_embedding=MATMUL_WEIGHTS, head=HEAD), *positions)


def test_time_calls_times_each_repeat_after_untimed_warmups():
    calls = []

    def nap() -> int:
        calls.append(None)
        time.sleep(0.05)
        return len(calls)

    timing = time_calls(nap, "cpu", repeats=3, warmup=2)
    assert len(calls) == 5
    assert timing.result == 5
    assert len(timing.seconds) == 3
    assert all(0.05 <= seconds < 0.5 for seconds in timing.seconds)


def kernel_high_water_mib() -> float:
    """The kernel's own peak resident memory of this process (VmHWM), in MiB."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the kernel's VmHWM (Linux)")
def test_step_timer_records_each_step_with_its_peak_memory():
    """After each step the timer records the process's peak resident memory in MiB, as the kernel counts
    it (VmHWM), and a peak never falls."""
    timer = StepTimer("cpu")
    for _ in range(2):
        timer.start()
        time.sleep(0.03)
        timer.stop()
    assert len(timer.seconds) == 2
    assert all(0.03 <= seconds < 0.5 for seconds in timer.seconds)
    assert [cuda for _, cuda in timer.peak_memory] == [None, None]
    (first, _), (second, _) = timer.peak_memory
    assert first <= second
    assert abs(second - kernel_high_water_mib()) < 16


def test_matmul_peak_is_two_size_cubed_over_the_fastest_matmul():
    """The reported ceiling agrees with the test's own timing of the same matmul to a factor 1.5, so a
    FLOP count off by 2 (``size^3`` for ``2 size^3``) would show."""
    size = 256
    peak = matmul_peak_flops("cpu", size=size, repeats=20, warmup=2)
    a, b = torch.randn(size, size), torch.randn(size, size)
    fastest = min(time_calls(lambda: a @ b, "cpu", repeats=20, warmup=2).seconds)
    assert 1 / 1.5 < peak / (2 * size**3 / fastest) < 1.5


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the kernel's VmHWM (Linux)")
def test_peak_rss_is_the_process_high_water_mark_in_mib():
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32, written so it is resident
    peak = peak_rss_mib()
    assert held.sum() > 0
    assert peak >= 64
    assert abs(peak - kernel_high_water_mib()) < 16
    rss, cuda = peak_memory_mib("cpu")
    assert rss >= peak
    assert cuda is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_counts_an_allocation():
    torch.cuda.reset_peak_memory_stats()
    held = torch.ones(32 * 2**20 // 4, device="cuda")
    assert cuda_peak_mib() >= 32
    assert held.sum() > 0


@pytest.mark.parametrize("device", ["cpu", "cuda", "xpu"])
def test_trl_head_rule_is_trls_own(device):
    """The benchmark counts TRL's LM-head FLOPs by TRL's own rule for when its fused head skips masked
    positions (a private TRL function, read here as the oracle)."""
    from trl.kernels.chunked_logprob import _use_triton

    assert trl_head_skips_masked_positions(device) == _use_triton(torch.device(device))
