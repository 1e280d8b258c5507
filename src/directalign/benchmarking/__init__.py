"""What the benchmarks share: wall-clock timing, peak memory, the FLOP model of the align step, and
the model and synthetic pair batches it is timed on.

``pipelines/bench.py`` (the align step against TRL's DPOTrainer), ``pipelines/bench_generate.py``
(sampling) and ``pipelines/gpu_check.py`` (the align step of a 1B model on a GPU) measure with these
functions, so a step time, a peak or a FLOP count means the same thing in all three.

FLOP model of a decoder-only transformer. A forward pass costs one multiply-add (2 FLOPs) per weight
per token position that goes through that weight: ``2 N T`` for the ``N`` non-embedding parameters
over ``T`` positions, plus ``2 H K`` for the LM head (``H`` = vocab x hidden) over the ``K`` positions
whose logits are computed; the embedding lookup is a gather and costs nothing. The backward pass costs
twice the forward (gradients with respect to the activations, and to the weights), so a training
step is ``6 N T + 6 H K``. Attention scores (``QK^T`` and the weighted sum of values,
``4 x layers x hidden x T_query x T_key`` per forward) are left out: about 4% at the benchmarks'
lengths, and how much of the ``T_query x T_key`` square runs depends on the kernel (causal or padded
mask), so the count is that of the weight matmuls, a slight lower bound of what executes.

This is the count ``bench.py`` has always used. ``gpu_check.py`` counted ``6 (P - E) T + 6 E 2B C``
(``P`` all parameters, ``E`` the input embedding, ``2B x C`` the completion positions): the same
when the embeddings are tied, but an untied head would sit in ``P - E`` and be counted at every
position, and its head term missed one position a row, since ``completion_logps`` asks for
``C + 1`` logits (the last prompt position predicts the first completion token). Counting the head
apart, at the positions that really go through it, is what lets the count follow what executes:
prompt sharing and TRL's compact head change ``K`` and ``T``, not the formula. A LoRA step on the
frozen trunk's states (``lora_step_flops``) runs only the top layers and trains only the adapters,
so its frozen weights cost 4 FLOPs a position (forward, and the gradient to their input), not 6.
"""

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")


def resolve_device(requested: str) -> str:
    """``auto`` is cuda where a GPU is visible, else cpu; anything else is taken as given."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers the kernels and not only their launch."""
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing(Generic[T]):
    """Wall seconds of each timed call, and what the last one returned (to count what it produced)."""

    seconds: list[float]
    result: T


def time_calls(call: Callable[[], T], device: str, repeats: int, warmup: int = 0) -> Timing[T]:
    """Run ``call`` ``warmup`` times untimed (first calls pay for allocation, kernel choice and lazy
    initialisation), then ``repeats`` times, each timed on its own between device synchronisations."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = call()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Timing(seconds, result)


def matmul_peak_flops(
    device: str, size: int, repeats: int, warmup: int, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of the fastest of ``repeats`` ``size x size`` matmuls (``2 size^3`` FLOPs each): the
    machine's ceiling that a step's FLOP/s is divided by. The fastest, not the mean: it is a ceiling."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    timing = time_calls(lambda: a @ b, device, repeats, warmup)
    return 2 * size**3 / min(timing.seconds)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mib() -> float:
    """Peak CUDA memory allocated by tensors since the last ``torch.cuda.reset_peak_memory_stats``."""
    return torch.cuda.max_memory_allocated() / 2**20


def peak_memory_mib(device: str) -> tuple[float, float | None]:
    """Peak RSS, and peak CUDA memory where the device is a GPU (None on CPU)."""
    return peak_rss_mib(), cuda_peak_mib() if device == "cuda" else None


@dataclass(frozen=True)
class BatchShape:
    """What a step's throughput and FLOPs are computed from: the padded shape and the real tokens.
    ``completion_width`` is that of the completion mask (TRL's spans the whole row)."""

    rows: int
    width: int
    tokens: int
    completion_width: int
    completion_tokens: int

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> "BatchShape":
        return cls(
            rows=batch["input_ids"].shape[0],
            width=batch["input_ids"].shape[1],
            tokens=int(batch["attention_mask"].sum()),
            completion_width=batch["completion_mask"].shape[1],
            completion_tokens=int(batch["completion_mask"].sum()),
        )


class StepTimer:
    """Wall seconds of each step a training loop runs, the peak memory after it, and its batch shape.

    The loop's own callbacks call ``start`` and ``stop`` (and append the shapes), because the step
    is not a function that can be handed to ``time_calls``. A segment's peak is read at its last step.
    """

    def __init__(self, device: str):
        self.device = device
        self.seconds: list[float] = []
        self.peak_memory: list[tuple[float, float | None]] = []
        self.shapes: list[BatchShape] = []
        self._start = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def stop(self) -> None:
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.peak_memory.append(peak_memory_mib(self.device))


@dataclass(frozen=True)
class ParameterCounts:
    """``N``, the non-embedding parameters, and ``H``, the LM head's vocab x hidden, of the FLOP model."""

    non_embedding: int
    head: int

    @classmethod
    def of(cls, model: "PreTrainedModel") -> "ParameterCounts":
        """Tied or not, the head's matmul runs; only an untied head has parameters of its own to remove."""
        head = model.get_output_embeddings().weight
        embedding = model.get_input_embeddings().weight
        total = sum(p.numel() for p in model.parameters())
        untied_head = 0 if head.data_ptr() == embedding.data_ptr() else head.numel()
        return cls(non_embedding=total - embedding.numel() - untied_head, head=head.numel())


def forward_flops(params: ParameterCounts, positions: int, head_positions: int) -> int:
    """``2 N T + 2 H K``: one forward pass over ``T`` positions, ``K`` of them through the LM head."""
    return 2 * params.non_embedding * positions + 2 * params.head * head_positions


def sampling_flops(
    params: ParameterCounts,
    prompt_lengths: list[int],
    completions: list[list[int]],
    prompt_layer_share: float = 1.0,
) -> int:
    """The useful FLOPs of sampling ``completions`` (each prompt's, in order) by the align step's model:
    every prompt token once through the layers (a prompt prefilled once, however many samples share it),
    every sampled token but the last through the layers, and every sampled token's logits through the
    LM head. Padding, rows that already ended and repeated prefills are work it does not credit. From a
    prompt cache (``prompt_cache.py``) a prompt's tokens but its last run only the top layers,
    ``prompt_layer_share`` of the layers' FLOPs; its last token runs them all."""
    tokens = [len(c) for group in completions for c in group]
    fed_back = len(prompt_lengths) + sum(max(n - 1, 0) for n in tokens)
    cached = round(2 * params.non_embedding * sum(n - 1 for n in prompt_lengths) * prompt_layer_share)
    return cached + forward_flops(params, fed_back, head_positions=sum(tokens))


def training_flops(params: ParameterCounts, positions: int, head_positions: int) -> int:
    """``6 N T + 6 H K``: forward and backward, the backward costing twice the forward."""
    return 3 * forward_flops(params, positions, head_positions)


def align_step_positions(shape: BatchShape, share_prompt: bool) -> tuple[int, int]:
    """Positions ``T`` through the layers and ``K`` through the LM head of one align step.

    Plain path: every row runs whole, with ``C + 1`` logits a row (``completion_logps``). Prompt
    sharing: the ``B`` prompts run once with one logit each, then the ``2B`` rows' completions but
    the last token run on the cache, each with its logits (``prefix.py``).
    """
    rows, width, completion = shape.rows, shape.width, shape.completion_width
    if not share_prompt:
        return rows * width, rows * (completion + 1)
    return grouped_step_positions(shape, prompts=rows // 2)


def grouped_step_positions(shape: BatchShape, prompts: int) -> tuple[int, int]:
    """Positions ``T`` and ``K`` of a step on shared prompts: the ``G`` distinct prompts run once, one
    logit each, then the ``R`` rows' completions but the last token, each with its logits. A pair batch
    has ``G = B``; a prompt-grouped batch (``pairs.collate_prompt_groups``) one per prompt."""
    rows, completion = shape.rows, shape.completion_width
    prompt = shape.width - completion
    return prompts * prompt + rows * (completion - 1), prompts + rows * (completion - 1)


def align_step_flops(shape: BatchShape, params: ParameterCounts, share_prompt: bool) -> int:
    """FLOPs one training step of the align stage executes on a batch of this padded shape."""
    return training_flops(params, *align_step_positions(shape, share_prompt))


@dataclass(frozen=True)
class LoraCounts:
    """The FLOP model's counts of a step that trains LoRA adapters on layers ``first_layer`` and up and
    runs only those layers, on the frozen trunk's states (``trunk.py``): ``top.non_embedding`` (``N``)
    the frozen weights of those layers and the final norm, ``top.head`` (``H``) the LM head,
    ``adapters`` (``A``) the trained weights, and ``constant_input`` (``Q``) the weights that read the
    trunk's states themselves (the first trained layer's q, k and v, and their adapters' ``lora_A``)."""

    top: ParameterCounts
    adapters: int
    constant_input: int

    @classmethod
    def of(cls, model: torch.nn.Module, first_layer: int) -> "LoraCounts":
        from directalign.trunk import causal_lm

        lm = causal_lm(model)
        modules = [*lm.model.layers[first_layer:], lm.model.norm]
        frozen = sum(p.numel() for module in modules for p in module.parameters() if not p.requires_grad)
        attention = lm.model.layers[first_layer].self_attn
        constant_input = sum(
            p.numel()
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj)
            for name, p in projection.named_parameters()
            if "lora_B" not in name
        )
        return cls(
            top=ParameterCounts(non_embedding=frozen, head=lm.get_output_embeddings().weight.numel()),
            adapters=sum(p.numel() for p in model.parameters() if p.requires_grad),
            constant_input=constant_input,
        )


def lora_step_flops(shape: BatchShape, prompts: int, counts: LoraCounts) -> int:
    """FLOPs of one align step on a prompt-grouped batch of ``prompts`` prompts over the trunk's states:
    ``4 N T + 4 H K + 6 A T - 2 Q T`` over the positions ``T`` of ``grouped_step_positions``, the head's
    ``K`` only at real completion tokens.

    A frozen weight runs forward (2 a position) and passes the gradient to its input (2), but computes
    no gradient of its own; an adapter also computes its own (6). A weight whose input is the trunk's
    constant states passes no gradient back (``- 2 Q T``). The layers below ``first_layer`` and the
    embedding do not run at all.
    """
    positions, _ = grouped_step_positions(shape, prompts)
    # The trunk step's head reads only the real completion tokens (``prefix.py``): one logit a prompt,
    # then every completion token but each row's first.
    head_positions = prompts + shape.completion_tokens - shape.rows
    top = counts.top
    weights = 4 * top.non_embedding + 6 * counts.adapters - 2 * counts.constant_input
    return weights * positions + 4 * top.head * head_positions


def pair_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the batch's pairs laid out as pair rows: ``prompt + a + prompt + b`` a pair, whatever
    layout the batch runs in. A pair batch's ``attention_mask.sum()``, and what TRL's batch of the same
    pairs holds, so a prompt-grouped batch gets no credit for the rows and prompts it shares."""
    row_tokens = batch["attention_mask"].sum(-1)
    return int(row_tokens[batch["pair_a"]].sum() + row_tokens[batch["pair_b"]].sum())


def benchmark_architecture(cfg: dict[str, Any]) -> tuple["PretrainedConfig", "PreTrainedTokenizerBase"]:
    """The CPU benchmarks' model config and tokenizer (SmolLM2-135M): from ``store/models/<converted_model>``
    when the pipeline has converted it, else built from ``architecture`` and ``tokenizer_model``."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoTokenizer

    from directalign.models import load_tokenizer

    folder = Path(cfg["store"]) / "models" / cfg["converted_model"]
    if (folder / "config.json").is_file():
        config, tokenizer = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        arch = dict(cfg["architecture"])
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        tokenizer = load_tokenizer(OmegaConf.create(cfg["tokenizer_model"]), Path(cfg["store"]))
    if cfg["num_hidden_layers"] is not None:
        config.num_hidden_layers = cfg["num_hidden_layers"]
    return config, tokenizer


def align_batches(
    ids: dict[str, list[list[int]]], pairs_per_step: int, pad_id: int, vocab_size: int
) -> list[dict[str, torch.Tensor]]:
    """The align stage's pair batches of ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``.

    The generate stage stores the reference log-probs (from sampling, at no extra forward pass), so
    the align step never runs a reference model; here they are the constant ``-log V`` a random-init
    reference gives to ~0.1 nat: constants of the loss, they do not change what a step costs.
    """
    from directalign.pairs import collate_pairs

    ref_logp = -math.log(vocab_size)
    rows = [
        {
            "prompt": prompt,
            "a": chosen,
            "b": rejected,
            "ref_a": [ref_logp] * len(chosen),
            "ref_b": [ref_logp] * len(rejected),
            "reward_a": 1.0,
            "reward_b": 0.0,
        }
        for prompt, chosen, rejected in zip(
            ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"], strict=True
        )
    ]
    return [collate_pairs(rows[i : i + pairs_per_step], pad_id) for i in range(0, len(rows), pairs_per_step)]


def time_align_steps(
    model: "PreTrainedModel",
    batches: list[dict[str, torch.Tensor]],
    align_cfg: "DictConfig",
    method_cfg: "DictConfig",
    trainer_kwargs: dict[str, Any],
    timer: StepTimer,
    first_layer: int | None = None,
) -> None:
    """Train the pipeline's align step (AlignModule in a Lightning Trainer) on ``batches`` in order,
    each step timed from the batch in hand to the end of the optimizer step. ``first_layer``: the
    batches carry the frozen trunk's states and only the layers from it up run."""
    import lightning as L
    from torch.utils.data import DataLoader

    from directalign.lit.align import AlignModule

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timer.shapes.append(BatchShape.of(batch))
            timer.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.stop()

    trainer = L.Trainer(
        **trainer_kwargs,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Record()],
    )
    module = AlignModule(model.train(), align_cfg, method_cfg, first_layer)
    trainer.fit(module, DataLoader(batches, batch_size=None))


def left_padded(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest, and their attention mask."""
    width = max(len(prompt) for prompt in prompt_ids)
    input_ids = torch.tensor([[pad_id] * (width - len(prompt)) + prompt for prompt in prompt_ids])
    attention_mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompt_ids])
    return input_ids, attention_mask


@torch.inference_mode()
def repeated_prefill_samples(
    model: "PreTrainedModel",
    prompt_ids: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    temperature: float = 1.0,
    return_logps: bool = False,
) -> list[list[list[int]]] | tuple[list[list[list[int]]], list[list[list[float]]]]:
    """``generation.sample_completions`` as it was before it prefilled each prompt once: prompts
    bucketed by length, ``generate`` with ``num_return_sequences`` prefilling every copy of a prompt,
    one torch seed a batch drawn from ``seed``. Kept once, as the sampling benchmark's baseline and the
    test oracle that the shared prefill samples the same tokens (and, with ``return_logps``, the same
    per-token log-probs of the raw logits)."""
    from directalign.generation import cut_after_eos
    from directalign.logprobs import gather_token_logps

    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    samples: list[list[list[int]]] = [[] for _ in prompt_ids]
    logps: list[list[list[float]]] = [[] for _ in prompt_ids]
    generator_seed = torch.Generator().manual_seed(seed)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = left_padded([prompt_ids[i] for i in rows], pad_id)
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator_seed)))
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            num_return_sequences=num_samples,
            return_dict_in_generate=True,
            output_logits=return_logps,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            top_k=None,
            do_sample=True,
            temperature=temperature,
        )
        sequences = output.sequences[:, input_ids.shape[1] :]
        if return_logps:
            token_logps = gather_token_logps(torch.stack(output.logits, dim=1), sequences)
        for j, sequence in enumerate(sequences.cpu()):
            completion = cut_after_eos(sequence.tolist(), eos_id)
            samples[rows[j // num_samples]].append(completion)
            if return_logps:
                logps[rows[j // num_samples]].append(token_logps[j, : len(completion)].tolist())
    return (samples, logps) if return_logps else samples
