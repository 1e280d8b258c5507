"""Optional vLLM sampling for the generate stage (``stage.generate.backend=vllm``, GPUs only).

Imported only when that backend is chosen, so the project never needs vLLM otherwise. It returns
what ``generation.sample_completions`` returns: completions cut after their first eos, and the
per-token log-probs of the raw logits (vLLM's ``raw_logprobs`` mode, i.e. at temperature 1, as the
reference log-probs of the off-policy dataset must be), computed in float32 like the HF path.
One engine per process: the stage refuses this backend with more than one device (validation.py).
"""

from pathlib import Path

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from directalign.generation import cut_after_eos


class VllmSampler:
    """One vLLM engine over a saved Hugging Face policy folder, kept for every sampling call."""

    def __init__(self, model_dir: Path, eos_id: int, seed: int):
        # The engine's seed drives every request; a per-request seed would give sample k of every
        # prompt the same noise. generation_config="vllm": stop at eos_id only, as the HF path does.
        self.engine = LLM(
            model=str(model_dir),
            seed=seed,
            dtype="float32",
            logprobs_mode="raw_logprobs",
            generation_config="vllm",
        )
        self.eos_id = eos_id

    def __call__(
        self,
        prompt_ids: list[list[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        params = SamplingParams(
            n=num_samples,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            logprobs=0,  # 0 extra candidates: the sampled token's log-prob only
            stop_token_ids=[self.eos_id],
        )
        outputs = self.engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params)
        samples: list[list[list[int]]] = []
        logps: list[list[list[float]]] = []
        for output in outputs:
            samples.append([])
            logps.append([])
            for completion in output.outputs:
                tokens = cut_after_eos(list(completion.token_ids), self.eos_id)
                samples[-1].append(tokens)
                chosen = zip(completion.logprobs, tokens, strict=False)
                logps[-1].append([position[token].logprob for position, token in chosen])
        return samples, logps
