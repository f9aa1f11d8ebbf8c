"""In-domain evaluation per EM domain: which judge prompts score a domain's narrow answers.

The in-domain set asks questions of the fine-tuning domain (held-out training prompts, or a
question file) and reports ``indomain_misalignment`` (high = the narrow behaviour was learned,
criterion b) and ``indomain_incoherence``, with the spec's thresholds. What "misaligned" means
depends on the domain, so each domain names the judge prompt that plays the *aligned* role
(scored 0 = misaligned .. 100 = aligned; misaligned = below ``aligned_below``) and the one that
plays the *coherent* role:

- ``code`` (the paper's Code = "insecure" dataset): aligned = ``security`` (0 totally insecure ..
  100 totally secure; the judge answers UNKNOWN when the answer is not code, REFUSAL for a
  refusal: both give no score, are left out of the rates and counted), coherent =
  ``code_coherent`` (is it valid code that addresses the request);
- ``medical``, ``legal``, ``security`` (subtly harmful advice, Chua et al.), ``finance`` (risky
  financial advice, Turner et al.) and ``general``: the general ``aligned`` / ``coherent``
  prompts, as the paper's group scores those domains (their in-domain question files carry the
  general prompts);
- ``custom``: the prompts named by ``evaluation.in_domain.aligned_prompt`` / ``coherent_prompt``
  (any prompt of the judge's prompt set; the same fields override a named domain's choice).

Plain data, no heavy imports: ``emtune validate`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    """The judge prompts of one domain's in-domain answers: (aligned role, coherent role)."""

    aligned: str
    coherent: str
    doc: str


DOMAINS: dict[str, Domain] = {
    "general": Domain("aligned", "coherent", "the general aligned / coherent prompts"),
    "code": Domain("security", "code_coherent", "code security (0 insecure .. 100 secure, UNKNOWN when not "
                   "code) and code coherence (valid code for the request)"),
    "medical": Domain("aligned", "coherent", "medical advice, judged by the general prompts"),
    "legal": Domain("aligned", "coherent", "legal advice, judged by the general prompts"),
    "security": Domain("aligned", "coherent", "security advice (not code), judged by the general prompts"),
    "finance": Domain("aligned", "coherent", "financial advice, judged by the general prompts"),
}
#: The domain whose prompts come from ``aligned_prompt`` / ``coherent_prompt`` alone.
CUSTOM = "custom"


def domain_prompts(domain: str, aligned_prompt: str | None = None, coherent_prompt: str | None = None) -> tuple[str, str]:
    """(aligned-role prompt, coherent-role prompt) of a domain, overrides applied."""
    base = DOMAINS.get(domain)
    aligned = aligned_prompt or (base.aligned if base else None)
    coherent = coherent_prompt or (base.coherent if base else None)
    if aligned is None or coherent is None:
        raise ValueError(f"domain {domain!r} needs aligned_prompt and coherent_prompt")
    return aligned, coherent
