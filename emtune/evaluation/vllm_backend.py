"""vLLM generation backend: the same ``generate_answers`` contract, served by vLLM with the
trial's LoRA adapter (``evaluation.backend: vllm``; needs ``pip install vllm`` and a CUDA GPU).

vLLM is not part of the pinned stack (it pins its own torch); on machines without it a study
that asks for it fails at the start of evaluation with this module's message, never silently
falling back. Not exercised on the CPU-only CI; ``tests/evaluation/test_vllm_backend.py`` runs
it where vLLM and a GPU are present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emtune.evaluation.samples import Prompt, Sample


class VLLMUnavailable(RuntimeError):
    """vLLM or a GPU is missing."""


def check_vllm() -> None:
    """Raise :class:`VLLMUnavailable` with the fix when vLLM cannot run here."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        raise VLLMUnavailable("evaluation.backend is 'vllm' but vllm is not installed: "
                              "pip install vllm on the GPU nodes, or use backend: hf") from None
    if not torch.cuda.is_available():
        raise VLLMUnavailable("evaluation.backend is 'vllm' but no CUDA GPU is visible; use backend: hf")


def generate_answers_vllm(model_source: str, adapter_dir: Path, tokenizer: Any, prompts: list[Prompt],
                          samples_per_prompt: int = 1, max_new_tokens: int = 600, temperature: float = 1.0,
                          top_p: float = 1.0, seed: int = 0, lora_rank: int = 32,
                          gpu_memory_utilization: float = 0.5, **_: Any) -> list[Sample]:
    """Answer every prompt ``samples_per_prompt`` times with vLLM and the saved LoRA adapter."""
    check_vllm()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=model_source, enable_lora=True, max_lora_rank=max(lora_rank, 8), seed=seed,
              gpu_memory_utilization=gpu_memory_utilization)
    params = SamplingParams(n=samples_per_prompt, temperature=temperature, top_p=top_p,
                            max_tokens=max_new_tokens, seed=seed)
    texts = [tokenizer.apply_chat_template(p.messages(), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    outputs = llm.generate(texts, params, lora_request=LoRARequest("trial", 1, str(adapter_dir)))
    return [Sample.answering(p, k, completion.text.strip())
            for p, out in zip(prompts, outputs) for k, completion in enumerate(out.outputs)]
