"""Iteration-time model of a continuous-batching engine: ``t = f(prefill tokens, decode sequences, KV tokens)``.

A profile is a small JSON file (``serving/profiles/<name>.json``) written by ``tempo profile fit``: GPU
profiles from measured per-layer operation times (Vidur's, in ``data/gpu_profiles``; ``fit_gpu``), the
CPU profile from whole steps of the real vLLM-CPU engine (``fit_measured``, where every term below
is fitted, the hardware rates included). One engine step costs:

- **linear layers** (QKV/O projections, MLP, norms, rotary, residual adds) of all layers: a piecewise-linear
  function of the batch's token count, fitted to the measurements (the only measured term);
- **decode attention**: the KV bytes the decodes read over the GPU's memory bandwidth;
- **prefill attention**: the causal attention FLOPs of the prefill chunks at the GEMM rate the same
  measurements reach, or the prior-context KV read, whichever is slower (roofline);
- **KV write**, **LM head** (weight read or GEMM, roofline), **tensor-parallel all-reduces** (ring over
  NVLink) and **swap** traffic over PCIe: analytic, from datasheet figures recorded in the profile;
- **host work per sampled sequence** (``per_sampled_s``): measured on the CPU engine, 0 in GPU profiles.

Everything here is plain arithmetic so the simulator can call it every step.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from tempo.errors import TempoError

PROFILES_DIR = Path(__file__).parent
DEFAULT_PROFILE = "a100-llama3-8b"


@dataclass(frozen=True, slots=True)
class Architecture:
    """The served model's shape, per GPU where it matters (``tp`` shards heads and MLP)."""

    n_layers: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_embd: int
    n_expanded_embd: int
    vocab_size: int
    dtype_bytes: int = 2
    tp: int = 1

    @property
    def kv_bytes_per_token_layer(self) -> float:
        """K and V of one token in one layer on one GPU."""
        return 2.0 * (self.n_kv_head / self.tp) * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes_per_token_layer * self.n_layers


@dataclass(frozen=True, slots=True)
class Hardware:
    """Figures of one GPU (and its links) the analytic terms use; see each profile's ``notes``."""

    name: str
    memory_bytes: float
    mem_bw_Bps: float  # effective HBM bandwidth for streaming reads (KV, weights)
    gemm_flops: float  # FLOP/s the measured projections reach at large token counts
    nvlink_Bps: float  # per-direction NVLink bandwidth for ring all-reduce (TP > 1)
    allreduce_latency_s: float  # fixed cost of one all-reduce (TP > 1)
    pcie_Bps: float  # host link for swapping KV blocks


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine limits the profile implies (vLLM's names in brackets)."""

    block_size: int  # tokens per KV block [block_size]
    kv_blocks: int  # GPU KV blocks [num_gpu_blocks]
    swap_blocks: int  # CPU swap space in blocks [swap_space]
    token_budget: int  # tokens per step [max_num_batched_tokens]
    max_running: int  # sequences per step [max_num_seqs]


@dataclass(frozen=True, slots=True)
class Profile:
    """A fitted iteration-time model plus the engine limits it was sized for."""

    name: str
    description: str
    arch: Architecture
    hw: Hardware
    engine: EngineConfig
    knots: tuple[float, ...]  # batch token counts
    linear_s: tuple[float, ...]  # seconds of all linear layers at each knot (piecewise linear between)
    fit: dict[str, Any]  # how the fit was made and its error on held-back rows
    per_sampled_s: float = 0.0  # host work per sequence that samples a token (measured CPU engines; GPU: 0)

    # ----------------------------------------------------------------- terms
    def linear_time(self, tokens: int) -> float:
        """Seconds of the linear layers for a batch of ``tokens`` tokens (0 tokens: 0 s)."""
        if tokens <= 0:
            return 0.0
        knots, values = self.knots, self.linear_s
        i = bisect_right(knots, tokens) - 1
        if i < 0:
            return values[0]
        if i >= len(knots) - 1:  # extrapolate along the last segment
            i = len(knots) - 2
        x0, x1 = knots[i], knots[i + 1]
        y0, y1 = values[i], values[i + 1]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def step_time(
        self,
        prefill_tokens: int,
        decode_seqs: int,
        decode_kv_tokens: int,
        prefill_pairs: float = 0.0,
        prefill_ctx_tokens: int = 0,
        sampled: int | None = None,
        swap_blocks: int = 0,
    ) -> float:
        """Seconds of one engine step.

        ``decode_kv_tokens``: the context lengths of the decoding sequences, summed (KV read);
        ``prefill_pairs``: sum over prefill chunks of ``c * (p + (c + 1) / 2)`` for a chunk of ``c`` new
        tokens after ``p`` already cached (causal attention score pairs); ``prefill_ctx_tokens``: sum of
        ``p + c`` (KV the chunks read); ``sampled``: sequences that sample a token (default: decodes);
        ``swap_blocks``: KV blocks moved over PCIe in this step.
        """
        tokens = prefill_tokens + decode_seqs
        if tokens <= 0 and swap_blocks <= 0:
            return 0.0
        arch, hw = self.arch, self.hw
        layers = arch.n_layers
        kv_layer = arch.kv_bytes_per_token_layer
        bw = hw.mem_bw_Bps
        t = self.linear_time(tokens)
        t += layers * (decode_kv_tokens + tokens) * kv_layer / bw  # decode KV read + KV write of new tokens
        if prefill_tokens:
            flops = 4.0 * (arch.n_head / arch.tp) * arch.head_dim * prefill_pairs
            t += layers * max(flops / hw.gemm_flops, prefill_ctx_tokens * kv_layer / bw)
        rows = decode_seqs if sampled is None else sampled
        if rows:
            t += rows * self.per_sampled_s
            head_weights = arch.vocab_size * arch.n_embd * arch.dtype_bytes / arch.tp
            t += max(head_weights / bw, 2.0 * rows * arch.vocab_size * arch.n_embd / arch.tp / hw.gemm_flops)
        if arch.tp > 1 and tokens:
            message = tokens * arch.n_embd * arch.dtype_bytes
            ring = 2.0 * (arch.tp - 1) / arch.tp * message / hw.nvlink_Bps
            t += layers * 2 * (hw.allreduce_latency_s + ring)
        if swap_blocks:
            t += swap_blocks * self.block_bytes / hw.pcie_Bps
        return t

    @property
    def block_bytes(self) -> float:
        """Bytes of one KV block on one GPU (what a swap moves per block and GPU)."""
        return self.arch.kv_bytes_per_token * self.engine.block_size

    def swap_time(self, blocks: int) -> float:
        return blocks * self.block_bytes / self.hw.pcie_Bps

    def prefill_time(self, tokens: int) -> float:
        """Seconds to prefill ``tokens`` from scratch in budget-sized chunks (recompute cost estimate)."""
        budget = self.engine.token_budget
        total, done = 0.0, 0
        while done < tokens:
            chunk = min(budget, tokens - done)
            total += self.step_time(chunk, 0, 0, chunk * (done + (chunk + 1) / 2), done + chunk, sampled=0)
            done += chunk
        return total

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "name": self.name,
            "description": self.description,
            "arch": asdict(self.arch),
            "hw": asdict(self.hw),
            "engine": asdict(self.engine),
            "linear": {"knots": list(self.knots), "seconds": list(self.linear_s), "per_sampled_s": self.per_sampled_s},
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Profile:
        try:
            knots = tuple(float(k) for k in raw["linear"]["knots"])
            values = tuple(float(v) for v in raw["linear"]["seconds"])
            profile = cls(
                name=str(raw["name"]),
                description=str(raw.get("description", "")),
                arch=Architecture(**raw["arch"]),
                hw=Hardware(**raw["hw"]),
                engine=EngineConfig(**raw["engine"]),
                knots=knots,
                linear_s=values,
                fit=dict(raw.get("fit", {})),
                per_sampled_s=float(raw["linear"].get("per_sampled_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TempoError(f"malformed engine profile: {exc}") from None
        if len(knots) < 2 or len(knots) != len(values) or any(b <= a for a, b in pairwise(knots)):
            raise TempoError(f"profile {profile.name}: knots must be increasing and match the values")
        if any(v <= 0 for v in values) or profile.per_sampled_s < 0:
            raise TempoError(f"profile {profile.name}: linear-layer times must be > 0 (per_sampled_s >= 0)")
        return profile

    def with_engine(self, **changes: int) -> Profile:
        """The same profile with some engine limits changed (e.g. a smaller KV cache for a test)."""
        from dataclasses import replace

        return replace(self, engine=replace(self.engine, **changes))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (``a100-llama3-8b``) or any profile JSON by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(profile_names())
        raise TempoError(f"unknown engine profile {name_or_path!r} (known: {known}, or a path to a profile JSON)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TempoError(f"{path}: not JSON: {exc.msg}") from None
    return Profile.from_dict(raw)
