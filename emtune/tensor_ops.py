"""Token-level tensor helpers shared by the loss-term defenses and the judge-free metrics.

Kept in a leaf module (no emtune imports) because both the KL and feature-space defenses and
``emtune.evaluation.judge_free`` need the same position mask and per-token KL; torch is
imported inside the functions so that importing emtune (e.g. for ``emtune validate``) stays light.

:func:`masked_kl_sum` is the KL of a training step without vocabulary-sized temporaries: the
reference's logits are computed from its final hidden states a few positions at a time, each
chunk's gradient with its value, so nothing of shape [positions, vocab] is kept beyond the trained
logits themselves (which the task loss needs anyway) and their gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
# masked_kl_sum's chunks: at most this many float32 bytes of [positions, vocab] each (~5 such
# temporaries live at once), and at most 1/KL_MIN_CHUNKS of the batch, so the temporaries stay a
# small fraction of the trained logits at any vocabulary size
KL_CHUNK_BYTES = 128 * 2**20
KL_MIN_CHUNKS = 16


def kl_per_token(logits: "torch.Tensor", reference_logits: "torch.Tensor", direction: str = "forward") -> "torch.Tensor":
    """KL divergence at every position, summed over the vocabulary: shape ``logits.shape[:-1]``.

    ``forward`` is KL(p ‖ q) with p = softmax(logits), q = softmax(reference_logits);
    ``reverse`` swaps them.
    """
    import torch.nn.functional as F

    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(reference_logits.float(), dim=-1)
    if direction == "reverse":
        logp, logq = logq, logp
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def token_mask(batch: dict[str, Any], tokens: str) -> "torch.Tensor":
    """Positions whose next-token distribution (or feature) a defense regularises.

    ``all``: every non-pad position. ``response``: positions whose next token is a labelled
    (assistant) token, i.e. the positions the task loss trains.
    """
    import torch

    attention = batch["attention_mask"].bool()
    if tokens == "all":
        return attention
    labels = batch["labels"]
    predicts_label = torch.zeros_like(attention)
    predicts_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predicts_label & attention


def _chunk_terms(logits: "torch.Tensor", hidden: "torch.Tensor", head: Any, reverse: bool) -> tuple:
    """Per-position KL of one chunk and what its gradient needs: ``(kl, p, lp - lq)`` with p the
    trained distribution, both log-softmaxes in float32 (``reverse`` swaps the KL's arguments)."""
    import torch.nn.functional as F

    lq = head(hidden).float().log_softmax(dim=-1)
    lp = logits.float().log_softmax(dim=-1)
    diff = lp.sub_(lq)  # log p - log q, in lp's storage
    p = (diff + lq).exp_()
    if reverse:
        q = lq.exp_()
        return (q * diff).sum(dim=-1).neg_(), p, q
    return (p * diff).sum(dim=-1), p, diff


class _ChunkedKL:
    """torch.autograd.Function (built lazily, torch being imported late): Σ_t w_t·KL_t. Each chunk's
    gradient is computed with its value, in the forward pass, into one buffer shaped like the
    logits (what a backward pass would allocate anyway): nothing is recomputed, and the backward
    pass only scales that buffer. Like fused-loss kernels, it supports one backward pass."""

    function: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.function is None:
            import torch

            class ChunkedKL(torch.autograd.Function):
                @staticmethod
                def forward(ctx: Any, logits: Any, hidden: Any, weights: Any, head: Any, reverse: bool,
                            chunks: list) -> Any:
                    grad = torch.zeros_like(logits) if logits.requires_grad else None
                    total = logits.new_zeros((), dtype=torch.float32)
                    for start, stop in chunks:
                        kl, p, other = _chunk_terms(logits[start:stop], hidden[start:stop], head, reverse)
                        scale = weights[start:stop].unsqueeze(-1)
                        total += (kl * weights[start:stop]).sum()
                        if grad is not None:
                            if reverse:  # d KL(q||p) / dz = p - q
                                chunk = p.sub_(other)
                            else:  # d KL(p||q) / dz = p * ((log p - log q) - KL)
                                chunk = other.sub_(kl.unsqueeze(-1)).mul_(p)
                            grad[start:stop] = chunk.mul_(scale)
                    ctx.save_for_backward(grad)
                    return total

                @staticmethod
                def backward(ctx: Any, grad_total: Any) -> Any:
                    (grad,) = ctx.saved_tensors
                    return grad.mul_(grad_total.to(grad.dtype)), None, None, None, None, None

            cls.function = ChunkedKL
        return cls.function


def masked_kl_sum(logits: "torch.Tensor", reference_hidden: "torch.Tensor", head: Any, weights: "torch.Tensor",
                  direction: str = "forward", chunk_bytes: int = KL_CHUNK_BYTES) -> "torch.Tensor":
    """Σ_t weights_t · KL_t over every position t, where KL_t is :func:`kl_per_token` of the trained
    ``logits`` [..., vocab] against ``head(reference_hidden)`` [..., hidden] (the reference's logits),
    computed chunk by chunk over positions, in float32, the same value as the full computation.

    The gradient reaches ``logits`` only (the reference side is a constant). Positions whose
    weight is 0 (padding, unselected tokens) cost nothing; ``head`` is any module or function
    mapping hidden states to logits (the reference model's LM head).
    """
    import torch

    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_hidden = reference_hidden.reshape(-1, reference_hidden.shape[-1]).detach()
    flat_weights = weights.reshape(-1).to(torch.float32)
    rows = max(1, min(chunk_bytes // (4 * vocab), -(-flat_logits.shape[0] // KL_MIN_CHUNKS)))
    starts = range(0, flat_logits.shape[0], rows)
    live = torch.stack([flat_weights[s:s + rows].abs().sum() for s in starts]).tolist() if len(starts) else []
    chunks = [(s, min(s + rows, flat_logits.shape[0])) for s, w in zip(starts, live) if w > 0]
    return _ChunkedKL.get().apply(flat_logits, flat_hidden, flat_weights, head, direction == "reverse", chunks)
