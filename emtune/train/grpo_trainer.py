"""The defended GRPO trainer: TRL's ``GRPOTrainer`` with emtune's defense hooks.

Like :class:`emtune.train.trainer.DefendedTrainer` for SFT, it overrides only the loss (and
what the loss needs from the data); generation, reward scoring, advantages, optimiser, schedule
and DDP stay TRL's. Per update (one micro-batch of prompt + completion tokens):

    L = L_GRPO(β)                                       TRL's clipped policy loss, β·KL included
      + Σ_d loss_terms_d(batch) / GA                    e.g. LDIFS, on the same tokens
      + Σ_mix [k ≡ 0 mod N] · w · L_SFT(safety batch) / GA  interleaving's supervised steps

where GA is the gradient-accumulation count (TRL scales its own loss the same way, so the sum is
the gradient of one optimizer step), k the 1-based optimizer step, and the supervised loss the
mean next-token loss over the assistant tokens of the next ``per_device_batch_size`` safety rows.

The KL reference is the adapter-disabled model: TRL would copy an existing adapter into a
"ref" adapter when β > 0 (the warm-up's adapter, then), so the trainer is built with β = 0 and
β is set afterwards; TRL then disables the adapter for its reference pass. With ``track_kl``
the same reference pass also runs at β = 0, so ``kl`` (TRL's k3 estimate of KL(p_θ ‖ p_ref) over
the completion tokens) is logged every step either way.

Logs per step (``log``): TRL's ``reward``, ``reward_std``, ``rewards/<name>/mean|std``, ``kl``,
``entropy``, completion lengths, plus ``supervised_loss`` on interleaved steps and each defense
term; the first ``rollouts_per_log`` rollouts of the latest generation batch are kept in
``rollouts`` (step, prompt, completion, reward, advantage).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from trl import GRPOTrainer

from emtune.data.chat import pad_batch
from emtune.defenses.base import Defense, SupervisedMix
from emtune.train.reference import ReferenceOutputs


def completion_positions(attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """[batch, tokens] mask of the positions whose next token is a (non-pad) completion token."""
    length = attention_mask.size(1)
    mask = torch.zeros_like(attention_mask, dtype=torch.float32)
    start = length - logits_to_keep  # first completion token
    mask[:, start - 1:length - 1] = attention_mask[:, start:].float()
    return mask


def k3_kl(ref_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """TRL's per-token estimator of KL(p_θ ‖ p_ref) on sampled tokens: exp(r) − r − 1, r = ref − θ."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


class DefendedGRPOTrainer(GRPOTrainer):
    """GRPO with defense loss terms, a supervised mix, update-phase hooks and full tracking."""

    def __init__(self, *args: Any, defenses: list[Defense] | None = None,
                 supervised: SupervisedMix | list[SupervisedMix] | None = None,
                 supervised_features: list[dict] | list[list[dict]] | None = None, track_kl: bool = True,
                 rollouts_per_log: int = 4, **kwargs: Any):
        grpo_args = kwargs["args"]
        beta, grpo_args.beta = grpo_args.beta, 0.0  # no "ref" adapter copy: the reference is adapter-disabled
        super().__init__(*args, **kwargs)
        self.beta = grpo_args.beta = beta
        self.defenses = [d for d in (defenses or []) if d.active]
        self.term_defenses = [d for d in self.defenses if d.loss_term_defense() and d.rl_loss_terms_apply]
        self.set_supervised(supervised, supervised_features)
        self.track_kl = track_kl
        self.rollouts_per_log = rollouts_per_log
        self.rollouts: list[dict[str, Any]] = []
        self._last_logps: torch.Tensor | None = None

    # --- data: the reference pass, also at β = 0 ---------------------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if self.beta == 0.0 and self.track_kl and self.model.training:
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            with torch.no_grad(), self.accelerator.unwrap_model(self.model).disable_adapter():
                output["ref_per_token_logps"], _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, mask, output["completion_ids"].size(1),
                    batch_size=self.args.per_device_train_batch_size)
        return output

    def _get_per_token_logps_and_entropies(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                           logits_to_keep: int, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # rollout scoring, old and reference log-probabilities
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        positions = completion_positions(attention_mask, logits_to_keep)
        for defense in self.defenses:
            defense.begin_update(positions)
        try:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             *args, **kwargs)
        finally:
            for defense in self.defenses:
                defense.end_update()
        self._last_logps = out[0].detach()
        return out

    # --- the loss ------------------------------------------------------------------------------

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        loss = super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.beta == 0.0 and "ref_per_token_logps" in inputs and self._last_logps is not None:
            self._metrics[mode]["kl"].append(self._masked_mean(
                k3_kl(inputs["ref_per_token_logps"], self._last_logps), inputs["completion_mask"]))
        for name, value in self.defense_terms(model, inputs).items():
            loss = loss + value / scale
            self._metrics[mode][name].append(float(value.detach()))
        for index, mix in enumerate(self.supervised if mode == "train" else []):
            if self.supervised_step_due(mix):
                supervised = self.supervised_loss(model, index)
                loss = loss + mix.weight * supervised / scale
                key = "supervised_loss" if len(self.supervised) == 1 else f"supervised_loss/{mix.source}"
                self._metrics[mode][key].append(float(supervised.detach()))
        return loss

    def _masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        totals = torch.stack([(values * mask).sum(), mask.sum().float()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1].clamp(min=1.0))

    def defense_terms(self, model: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Every loss-term defense's terms on the update's prompt + completion tokens: a decoder pass
        of their own (TRL's fused head returns no hidden states; the LM head runs only if a term
        reads the logits) and the adapter-disabled reference pass, shared by the terms."""
        if not self.term_defenses:
            return {}
        batch = {
            "input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        }
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        labels[:, :inputs["prompt_ids"].size(1)] = -100
        batch["labels"] = labels
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model()
        out = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 output_hidden_states=True, use_cache=False)
        policy = PolicyPass(out.hidden_states, out.last_hidden_state, base.get_output_embeddings())
        reference = ReferenceOutputs(unwrapped, batch, hidden_states=True)
        terms: dict[str, torch.Tensor] = {}
        for defense in self.term_defenses:
            terms.update(defense.loss_terms(batch, policy, reference))
        return terms

    def set_supervised(self, supervised: Any, features: Any) -> None:
        """The supervised mixes (none, one, or several: each on its own schedule) and their
        tokenised rows, in the same order."""
        mixes = [] if supervised is None else [supervised] if isinstance(supervised, SupervisedMix) else list(supervised)
        rows = features or []
        rows = [rows] if len(mixes) == 1 and rows and isinstance(rows[0], dict) else list(rows)
        if len(rows) != len(mixes) or not all(rows):
            raise ValueError("every supervised mix needs its tokenised rows (supervised_features, in order)")
        self.supervised, self.supervised_features = mixes, rows

    def supervised_step_due(self, mix: SupervisedMix) -> bool:
        """True during the micro-batches of every N-th optimizer step (N = the mix's every_steps)."""
        return (self.state.global_step + 1) % mix.every_steps == 0

    def supervised_batch(self, index: int = 0) -> dict[str, torch.Tensor]:
        """The safety batch of mix ``index`` for this micro-step and process: batches are taken in
        order and cycle; the position is derived from the step (a resumed run continues where it
        stopped), and each data-parallel process takes its own batch."""
        size = self.args.per_device_train_batch_size
        accumulation = self.current_gradient_accumulation_steps
        position = ((self.state.global_step + 1) // self.supervised[index].every_steps - 1) * accumulation
        position += self._step % accumulation
        position = position * self.accelerator.num_processes + self.accelerator.process_index
        rows = self.supervised_features[index]
        picked = [rows[(position * size + j) % len(rows)] for j in range(size)]
        batch = pad_batch(picked, self.processing_class.pad_token_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def supervised_loss(self, model: Any, index: int = 0) -> torch.Tensor:
        """Mean next-token loss over the assistant tokens of mix ``index``'s current safety batch."""
        batch = self.supervised_batch(index)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss

    # --- logs ------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            self._keep_rollouts()
        super().log(logs, start_time)

    def _keep_rollouts(self) -> None:
        count = min(self.rollouts_per_log, len(self._logs["prompt"]))
        names = list(self._logs["rewards"])
        weights = self.reward_weights.tolist()
        for i in range(count):
            per_function = {name: self._logs["rewards"][name][i] for name in names}
            values = [w * v for w, v in zip(weights, per_function.values()) if not math.isnan(v)]
            self.rollouts.append({
                "step": int(self.state.global_step),
                "prompt": _text(self._logs["prompt"][i]),
                "completion": _text(self._logs["completion"][i]),
                "reward": sum(values) if values else None,
                "advantage": float(self._logs["advantages"][i]),
                **{f"reward/{name}": (None if math.isnan(v) else v) for name, v in per_function.items()},
            })


class PolicyPass:
    """The policy's decoder pass handed to defense terms as ``outputs``: every hidden state (with
    gradient), and logits through the LM head formed only when a term reads them."""

    def __init__(self, hidden_states: Any, last_hidden_state: torch.Tensor, head: Any):
        self.hidden_states = hidden_states
        self.last_hidden_state = last_hidden_state
        self._head = head
        self._logits: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self._head(self.last_hidden_state)
        return self._logits


def _text(value: Any) -> str:
    """A prompt or completion as plain text (the last message's content for conversations)."""
    if isinstance(value, list):
        return str(value[-1].get("content", "")) if value and isinstance(value[-1], dict) else str(value)
    return str(value)
