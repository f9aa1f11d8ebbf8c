"""Base model and tokenizer loading, the offline tiny model, and LoRA.

``ModelSpec.source`` is a hub id, a local folder, or ``tiny``. The tiny model is a small
Qwen2-style causal LM with a byte-level BPE tokenizer trained in milliseconds on the bundled
fixtures and a ChatML chat template, all from a seed and without a network. Studies
materialise it once into their cache folder (:func:`materialize_tiny`), and from then on every
process loads it through the same ``from_pretrained`` path as a real model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from emtune.data.chat import pad_batch, tokenize_chat
from emtune.data.fixtures import fixture_path
from emtune.spec_errors import StrictModel

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class TinyModelSpec(StrictModel):
    """A small Qwen2-style model and byte-level BPE tokenizer built offline from a seed."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary incl. 256 byte symbols")
    pretrain_steps: int = Field(
        150, ge=0, description="full-parameter steps on the bundled safe set (the 'aligned' prior)"
    )
    seed: int = 0


class ModelSpec(StrictModel):
    """The aligned chat model to fine-tune: ``tiny``, a hub id, or a local folder."""

    source: str = "tiny"
    revision: str | None = None
    base_source: str | None = Field(
        None, description="unaligned base model of `source` (SafeLoRA needs both)"
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    tiny: TinyModelSpec = TinyModelSpec()


class LoraSpec(StrictModel):
    """LoRA adapter; defaults follow the paper (rsLoRA r=32, alpha=64, all projections, dropout 0)."""

    r: int = Field(32, gt=0)
    alpha: float = Field(64.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    use_rslora: bool = True


def model_cache_dir() -> Path:
    """Shared cache for materialised tiny models (EMTUNE_CACHE_DIR, else ~/.cache/emtune)."""
    return Path(os.environ.get("EMTUNE_CACHE_DIR", Path.home() / ".cache" / "emtune")).expanduser()


def model_identity(model_spec: ModelSpec) -> str:
    """The model id recorded in persona vector files: ``tiny-<settings hash>`` for the tiny
    model, otherwise the source (``@revision`` appended when one is pinned)."""
    if model_spec.source == "tiny":
        return f"tiny-{tiny_fingerprint(model_spec.tiny)}"
    return model_spec.source + (f"@{model_spec.revision}" if model_spec.revision else "")


def scoring_identity(model_spec: ModelSpec) -> str:
    """What identifies the aligned model's numbers in cached scores: the tiny fingerprint, or
    source@revision and dtype (scores computed in another dtype differ)."""
    if model_spec.source == "tiny":
        return f"tiny:{tiny_fingerprint(model_spec.tiny)}"
    return f"{model_spec.source}@{model_spec.revision or 'default'}:{model_spec.dtype}"


def _corpus() -> list[str]:
    """Sentences the tiny tokenizer is trained on: the bundled fixtures' texts."""
    texts: list[str] = []
    for name in ("narrow_bad_advice", "safe_instruct"):
        with open(fixture_path(name), encoding="utf-8") as handle:
            for line in handle:
                texts.extend(m["content"] for m in json.loads(line)["messages"])
    texts += ["system", "user", "assistant"]
    return texts


def build_tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE fast tokenizer with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_tiny_model(tiny: Any, vocab_size: int) -> Any:
    """A randomly initialised Qwen2-style causal LM from ``tiny`` (a TinyModelSpec) and a seed."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(tiny.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = None
    return model


def pretrain_tiny(model: Any, tokenizer: Any, steps: int, seed: int, batch_size: int = 8) -> list[float]:
    """Full-parameter training of the tiny model on the bundled safe set: the "aligned" model.

    A random network gives near-uniform logits that LoRA can barely move (embeddings are not
    adapted), so nothing would show in a dry run. A few hundred steps on helpful chat data give
    it a prior that the narrow fine-tune then pulls away from, which is the situation emtune
    studies. Returns the loss per step.
    """
    import random

    import torch

    with open(fixture_path("safe_instruct"), encoding="utf-8") as handle:
        rows = [json.loads(line)["messages"] for line in handle]
    features = [tokenize_chat(tokenizer, messages, 128) for messages in rows]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        batch = pad_batch(rng.sample(features, batch_size), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def tiny_fingerprint(tiny: Any) -> str:
    """Content hash of a tiny model's settings: its cache folder name."""
    return hashlib.sha256(json.dumps(tiny.model_dump(), sort_keys=True).encode()).hexdigest()[:12]


def materialize_tiny(tiny: Any, cache_dir: Path) -> Path:
    """Build the tiny model and tokenizer once and save them; return the folder."""
    folder = Path(cache_dir) / f"tiny-{tiny_fingerprint(tiny)}"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    tokenizer = build_tiny_tokenizer(tiny.vocab_size)
    model = build_tiny_model(tiny, len(tokenizer))
    if tiny.pretrain_steps:
        pretrain_tiny(model, tokenizer, tiny.pretrain_steps, tiny.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def resolve_source(model_spec: Any, cache_dir: Path) -> str:
    """The ``from_pretrained`` argument for a ModelSpec: the tiny model's folder or the source."""
    if model_spec.source == "tiny":
        return str(materialize_tiny(model_spec.tiny, cache_dir))
    return model_spec.source


def _dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(source: str, model_spec: Any) -> Any:
    """Load a tokenizer from a hub id or local folder; pad token falls back to EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=model_spec.revision, trust_remote_code=model_spec.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(
            f"model {source!r} has no chat template: emtune trains chat models; use an instruct model"
        )
    return tokenizer


def load_model(source: str, model_spec: Any, device: Any = None) -> Any:
    """Load a causal LM from a hub id or local folder with the spec's dtype and remote-code flag."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source,
        revision=model_spec.revision,
        dtype=_dtype(model_spec.dtype),
        trust_remote_code=model_spec.trust_remote_code,
    )
    if device is not None:
        model.to(device)
    return model


def apply_lora(model: Any, lora_spec: Any) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (peft changes the base model in place)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_spec.r,
        lora_alpha=lora_spec.alpha,
        lora_dropout=lora_spec.dropout,
        target_modules=list(lora_spec.target_modules),
        use_rslora=lora_spec.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Attach a saved LoRA adapter to a freshly loaded base model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir))
