"""Judge on a local Hugging Face causal LM, with a scoring rule that survives number splitting.

The paper's rule reads one token's top-20 logprobs and needs 0..100 to be single tokens. Most open
tokenizers (Qwen, Llama) split "85" into "8" + "5", so this judge scores each candidate number by
its sequence probability instead. Rule "candidate_sequence_terminated_v1":

  prompt  = the metric's judge prompt as one user turn, through the tokenizer's chat template
            (with the generation prompt) when it has one, else the raw text;
  c_k     = tokenizer.encode(str(k)) for each candidate k (default 0..100), appended to the prompt;
  log p_k = sum_t log P(c_k[t] | prompt, c_k[:t])                        (teacher forced)
          + log P(next token does not start with a digit | prompt, c_k)  (the number ends there)
  score   = sum_k k·p_k / sum_k p_k, None when sum_k p_k < 0.25 (the paper's mass check).

The end-of-number factor makes the candidates disjoint events: without it P("1") would also hold
the mass of "10".."19" and "100", and the mass check would count it twice. Candidates are written
without a leading space (chat templates end the generation prompt with a newline).

Cost: the prompt is run once; its KV cache is repeated for batches of candidates, so each item
costs one prompt forward plus ceil(101 / batch_size) short forwards.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Iterable, Sequence

from emtune.evaluation.judges import (
    MIN_NUMBER_MASS,
    JudgeItem,
    JudgeVerdict,
    label_from_token,
    load_judge_prompts,
    render_prompt,
    resolved_prompt_version,
)

SEQUENCE_RULE = "candidate_sequence_terminated_v1"


class HFLocalJudge:
    """Local-model judge (see module docs for the rule).

    model / tokenizer: a transformers causal LM and its tokenizer (already on their device).
    candidates: the numbers scored (default 0..100); min_mass: the mass check threshold.
    use_prompt_cache: run the prompt once and reuse its KV cache (False: full sequences, for
    models whose cache cannot be repeated along the batch).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        judge_id: str,
        prompt_version: str = "v2",
        prompts: dict[str, str] | None = None,
        candidates: Iterable[int] = range(101),
        min_mass: float = MIN_NUMBER_MASS,
        batch_size: int = 32,
        use_prompt_cache: bool = True,
    ):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.judge_id = judge_id
        self.prompt_version = resolved_prompt_version(prompt_version)
        self.prompts = prompts if prompts is not None else load_judge_prompts(prompt_version)
        self.candidates = [int(k) for k in candidates]
        self.min_mass = min_mass
        self.batch_size = batch_size
        self.use_prompt_cache = use_prompt_cache
        self._candidate_ids = [tokenizer.encode(str(k), add_special_tokens=False) for k in self.candidates]
        vocab = model.get_output_embeddings().weight.shape[0]
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        continues = torch.zeros(vocab, dtype=torch.bool)
        for i, text in enumerate(texts[:vocab]):
            continues[i] = bool(text) and text[0] in "0123456789"
        self._continues_number = continues

    @classmethod
    def from_spec(cls, spec: Any, **kwargs: Any) -> "HFLocalJudge":
        """Load the model and tokenizer named by a JudgeSpec of kind "hf_local"."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
        model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=getattr(torch, spec.dtype))
        return cls(
            model.to(spec.device), tokenizer, judge_id=spec.judge_id, prompt_version=spec.prompt_version, **kwargs
        )

    def __repr__(self) -> str:
        return (
            f"HFLocalJudge(judge_id={self.judge_id!r}, prompt_version={self.prompt_version!r}, "
            f"rule={SEQUENCE_RULE!r})"
        )

    def score(self, metric: str, question: str, answer: str, template: str | None = None) -> JudgeVerdict:
        """Judge one answer (with ``template`` instead of the metric's prompt when given)."""
        return self._score_prompt(render_prompt(self.prompts, metric, question, answer, template))

    def score_many(self, items: Sequence[JudgeItem]) -> list[JudgeVerdict]:
        """Judge items one after another (the candidates of one item form the batch)."""
        return [self.score(*item) for item in items]

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the judge prompt as the model sees it before its answer."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def candidate_logprobs(self, prompt_ids: list[int]) -> tuple[dict[int, float], "Any"]:
        """(candidate -> terminated sequence logprob, first-token log-probabilities)."""
        import torch

        device = self.model.get_input_embeddings().weight.device
        prompt = torch.tensor([prompt_ids], device=device)
        out: dict[int, float] = {}
        with torch.no_grad():
            first = self.model(prompt, use_cache=self.use_prompt_cache, logits_to_keep=1)
            first_logp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
            for start in range(0, len(self.candidates), self.batch_size):
                chunk = list(zip(self.candidates, self._candidate_ids))[start : start + self.batch_size]
                out.update(self._chunk_logprobs(prompt_ids, chunk, first, first_logp, device))
        return out, first_logp

    def _chunk_logprobs(self, prompt_ids, chunk, first, first_logp, device) -> dict[int, float]:
        import torch

        width = max(len(ids) for _, ids in chunk)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        cand = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        for row, (_, ids) in enumerate(chunk):
            cand[row, : len(ids)] = torch.tensor(ids, device=device)
            mask[row, : len(ids)] = 1
        n_prompt = len(prompt_ids)
        full_mask = torch.cat([torch.ones((len(chunk), n_prompt), dtype=torch.long, device=device), mask], dim=1)
        if self.use_prompt_cache:
            # transformers 5.x renamed past_key_values to cache (input and output) mid-series.
            prompt_cache = getattr(first, "cache", None) or first.past_key_values
            cache = copy.deepcopy(prompt_cache)
            cache.batch_repeat_interleave(len(chunk))
            kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            logits = self.model(cand, attention_mask=full_mask, use_cache=True, **{kwarg: cache}).logits
        else:
            prompt = torch.tensor([prompt_ids], device=device).expand(len(chunk), -1)
            logits = self.model(torch.cat([prompt, cand], 1), attention_mask=full_mask, logits_to_keep=width).logits
        # logp[row, t] predicts the token after candidate token t; the first candidate token is
        # predicted by the prompt's last position (first_logp).
        logp = torch.log_softmax(logits.float(), dim=-1)
        continues = self._continues_number.to(device)
        result: dict[int, float] = {}
        for row, (k, ids) in enumerate(chunk):
            total = first_logp[ids[0]].item()
            for t in range(1, len(ids)):
                total += logp[row, t - 1, ids[t]].item()
            end = logp[row, len(ids) - 1]
            p_continue = torch.exp(end[continues[: end.shape[0]]]).sum().item()
            result[k] = total + math.log(max(1.0 - p_continue, 1e-300))
        return result

    def _score_prompt(self, prompt: str) -> JudgeVerdict:
        logprobs, first_logp = self.candidate_logprobs(self.prompt_ids(prompt))
        mass = sum(math.exp(lp) for lp in logprobs.values())
        top_token = self.tokenizer.decode([int(first_logp.argmax())])
        label = label_from_token(top_token)
        raw = {str(k): lp for k, lp in logprobs.items()}
        if mass < self.min_mass or mass == 0.0:
            return JudgeVerdict(
                score=None, label=label, logprobs=raw, scoring_rule=SEQUENCE_RULE,
                reason=f"low_number_mass ({mass:.3g} < {self.min_mass})",
            )
        score = sum(k * math.exp(lp) for k, lp in logprobs.items()) / mass
        return JudgeVerdict(score=score, label=label, logprobs=raw, scoring_rule=SEQUENCE_RULE)
