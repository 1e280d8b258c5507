"""Hugging Face TRL's DPOTrainer as an outside oracle for this project's losses and log-probs.

One tiny random-init Llama with SmolLM2's real tokenizer (obtained as the pipeline obtains it), a
reference copy of it and a policy whose weights are perturbed, so ``policy != reference``. For the
same preference pairs, TRL 1.16's own code path (``DPOTrainer._prepare_dataset`` tokenises, its
``DataCollatorForPreference`` collates, ``DPOTrainer.compute_loss`` runs both models and the loss)
must give the loss this project computes from ``collate_prompt_completion``, ``completion_logps``,
``sequence_logratio`` and ``dpo_loss`` / ``ipo_loss``, to 1e-4:

=====================  ==========================================
TRL ``loss_type``      this project
=====================  ==========================================
``"sigmoid"``          ``dpo_loss``, ``length_power=0`` (summed)
``"ipo"``              ``ipo_loss``, ``length_power=1`` (averaged)
``"sigmoid_norm"``     ``dpo_loss``, ``length_power=1`` (averaged)
=====================  ==========================================

and TRL's CPOTrainer with ``loss_type="simpo"`` and ``cpo_alpha=0`` gives the registry's ``simpo`` on
the same token ids (its own prompt/answer split), its policy log-likelihoods token-averaged.

What TRL 1.16 does, read from ``trl/trainer/dpo_trainer.py``: it sums per-token log-probs over
the completion tokens (labels are -100 elsewhere) for the policy and the reference, and its
``"ipo"`` and ``"sigmoid_norm"`` divide each sequence's log-ratio (policy minus reference) by that
sequence's number of completion tokens, ``completion_mask.sum(1)``: the token average of both
log-likelihoods, as paper A and ``length_power=1``. TRL's IPO is thus averaged IPO (TRL PR #1265);
summed IPO (``length_power=0``) has no TRL counterpart.

Tokens. The pairs are plain text (not TRL's conversational format): the prompt is the chat
template rendered with the generation prompt, as ``prompts.build_prompts`` makes it; TRL appends
the eos text to each completion and tokenises prompt + completion together, which gives the same
ids as this project's ``prompts.completion_ids`` (text ids, then eos). SmolLM2's tokenizer adds no
BOS. The test checks that the ids agree before comparing losses. (TRL's conversational format
would end each completion with ``<|im_end|>\\n``, one token more than the pipeline's.) Layouts
differ, TRL right-pads ``[prompt | completion]`` while this project left-pads prompts, so the
agreement also checks that padding and position ids do not change the log-probs.
"""

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from directalign.logprobs import collate_prompt_completion, completion_logps
from directalign.losses import LOSSES, dpo_loss, ipo_loss, sequence_logratio
from directalign.models import build_policy, load_tokenizer
from directalign.prompts import completion_ids
from tests.conftest import compose_config

trl = pytest.importorskip("trl")

PROMPT_SOURCES = [
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "A local team won the regional championship after a dramatic penalty shoot-out.",
    "Scientists found a new species of frog in the rainforest of northern Peru.",
]
CHOSEN = [
    "Stocks slide as central bank lifts rates",
    "Local team wins title on penalties",
    "New frog found in Peru",
]
REJECTED = [
    "Something happened with money and banks today, read more",
    "Sports",
    "Frogs are amazing animals and scientists like them very much",
]
# (TRL loss_type, this project's loss, length_power, beta); betas keep each loss away from its value
# at a zero margin, where agreement would be trivial.
VARIANTS = [
    ("sigmoid", dpo_loss, 0.0, 0.1),
    ("ipo", ipo_loss, 1.0, 0.5),
    ("sigmoid_norm", dpo_loss, 1.0, 1.0),
]


@pytest.fixture(scope="module")
def setup(shared_store: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, PreTrainedModel, list[dict]]:
    """Tokenizer, reference, perturbed policy and the prompts' chat messages."""
    cfg = compose_config(["model=tiny_llama"], shared_store)
    tokenizer = load_tokenizer(cfg.model, Path(cfg.paths.store))
    reference = build_policy(cfg.model, Path(cfg.paths.store), len(tokenizer), seed=0).eval()
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    messages = [
        [{"role": "system", "content": cfg.model.system_prompt}, {"role": "user", "content": source}]
        for source in PROMPT_SOURCES
    ]
    return tokenizer, reference, policy, messages


def trl_loss(setup, loss_type: str, beta: float, tmp_path: Path) -> tuple[float, list[dict]]:
    """TRL's loss on the pairs, and the token ids its own preprocessing produced."""
    tokenizer, reference, policy, messages = setup
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        loss_type=[loss_type],
        beta=beta,
        precompute_ref_log_probs=False,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        eval_strategy="no",
    )
    dataset = Dataset.from_dict({"prompt": prompts, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    rows = [trainer.train_dataset[i] for i in range(len(prompts))]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    return loss.item(), rows


def our_loss(setup, rows: list[dict], loss_fn, length_power: float, beta: float) -> float:
    """This project's loss on the same token ids."""
    tokenizer, reference, policy, _ = setup
    prompt_ids = [row["prompt_ids"] for row in rows]
    batch = collate_prompt_completion(
        prompt_ids * 2,
        [row["chosen_ids"] for row in rows] + [row["rejected_ids"] for row in rows],
        tokenizer.pad_token_id,
    )
    mask = batch["completion_mask"]
    with torch.no_grad():
        policy_logps, ref_logps = (
            completion_logps(model, batch["input_ids"], batch["attention_mask"], mask.shape[1])
            for model in (policy, reference)
        )
    chosen, rejected = sequence_logratio(policy_logps, ref_logps, mask, length_power).chunk(2)
    return loss_fn(chosen, rejected, beta).mean().item()


@pytest.mark.parametrize(("loss_type", "loss_fn", "length_power", "beta"), VARIANTS)
def test_loss_matches_trl(setup, tmp_path, loss_type, loss_fn, length_power, beta):
    tokenizer, _, _, messages = setup
    expected, rows = trl_loss(setup, loss_type, beta, tmp_path)

    pipeline_prompts = [  # as prompts.build_prompts tokenises them
        list(
            tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for m in messages
    ]
    assert [row["prompt_ids"] for row in rows] == pipeline_prompts
    assert [row["chosen_ids"] for row in rows] == completion_ids(tokenizer, CHOSEN)
    assert [row["rejected_ids"] for row in rows] == completion_ids(tokenizer, REJECTED)

    assert our_loss(setup, rows, loss_fn, length_power, beta) == pytest.approx(expected, abs=1e-4)
    wrong_power = 1.0 - length_power
    assert our_loss(setup, rows, loss_fn, wrong_power, beta) != pytest.approx(expected, abs=1e-2)


def trl_simpo_loss(setup, beta: float, gamma: float, tmp_path: Path) -> tuple[float, list[dict]]:
    """TRL's CPOTrainer with ``loss_type="simpo"`` and ``cpo_alpha=0`` (pure SimPO, no NLL term) on the
    pairs, and the rows its own preprocessing produced."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tokenizer, _, policy, messages = setup
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    args = CPOConfig(
        output_dir=str(tmp_path),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
        bf16=False,
        use_cpu=True,
        report_to="none",
        eval_strategy="no",
    )
    dataset = Dataset.from_dict({"prompt": prompts, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = CPOTrainer(
        model=copy.deepcopy(policy), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    rows = [trainer.train_dataset[i] for i in range(len(prompts))]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    return loss.item(), rows


def split_prompt_completion(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """TRL's prompt + answer ids cut where its labels (-100 on the prompt) start."""
    start = next(i for i, label in enumerate(labels) if label != -100)
    return input_ids[:start], input_ids[start:]


def test_simpo_matches_trl_cpo(setup, tmp_path):
    """Our registry's SimPO on TRL's own token ids (its prompt/answer split, BOS and EOS handling) gives
    TRL's loss; the summed log-likelihood (``length_power=0``) does not."""
    beta, gamma = 2.0, 1.0
    expected, rows = trl_simpo_loss(setup, beta, gamma, tmp_path)
    tokenizer, reference, policy, _ = setup
    chosen = [split_prompt_completion(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
    rejected = [split_prompt_completion(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    batch = collate_prompt_completion(
        [prompt for prompt, _ in chosen + rejected], [c for _, c in chosen + rejected], tokenizer.pad_token_id
    )
    mask = batch["completion_mask"]
    with torch.no_grad():
        policy_logps, ref_logps = (
            completion_logps(model, batch["input_ids"], batch["attention_mask"], mask.shape[1])
            for model in (policy, reference)
        )
    simpo, method = LOSSES["simpo"], {"beta": beta, "gamma": gamma}

    unused_rewards = torch.zeros(len(rows))

    def ours(length_power: float) -> float:
        terms = simpo.sequence_terms(policy_logps, ref_logps, mask, length_power)
        terms_chosen, terms_rejected = terms.chunk(2)
        return simpo(method, terms_chosen, terms_rejected, unused_rewards, unused_rewards).mean().item()

    assert ours(1.0) == pytest.approx(expected, abs=1e-4)
    assert ours(0.0) != pytest.approx(expected, abs=1e-2)
