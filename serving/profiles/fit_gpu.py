"""Fit the engine profiles in ``serving/profiles/`` from Vidur's measured GPU layer times.

    tempo profile fit            # re-fit every shipped profile (these and the measured CPU ones), print the errors
    tempo profile fit --check    # fit and compare with the shipped files, write nothing

Measured (``data/gpu_profiles/*_mlp.csv.gz``, Vidur @ 7d47513): the median time of each non-attention
operation of one transformer layer by batch token count and tensor-parallel degree. As in Vidur's
``ExecutionTime.model_time`` the linear part of a step is the sum of the per-layer operations (norms,
QKV and output projections, rotary, MLP up/act/down, residual add) times the number of layers; the
embedding lookup is left out (Vidur leaves it out too). That sum is fitted as a continuous piecewise-linear
function of the token count: the values at fixed knots are the weighted least-squares solution (weights
1/y, so the fit minimises relative error). Every fifth distinct token count is held back and the
shipped model is the one fitted without those rows, so the reported error applies to it.

Not measured (datasheet figures and stated assumptions, written into each profile's ``notes``): HBM
bandwidth (A100-80GB SXM 2.039 TB/s, H100 SXM 3.35 TB/s, both derated to 90%, the ratio of the ~3.0 TB/s
copy measured on an H100 to its datasheet); NVLink per direction (A100 300 GB/s, H100 450 GB/s) and 10 us
per all-reduce; PCIe for swap (A100 Gen4 25 GB/s, H100 Gen5 50 GB/s, achieved); KV cache = 90% of GPU
memory minus weights minus a 2 GiB activation reserve; 4 GiB CPU swap space per GPU (vLLM's default).
The GEMM rate used for prefill attention and the LM head is *derived from the measurements*: the FLOPs of
the projections at the largest profiled token count over their measured time.
"""

from __future__ import annotations

import csv
import gzip
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tempo.data import data_path
from tempo.serving.profiles.profile import (
    Architecture,
    EngineConfig,
    Hardware,
    Profile,
)

LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
GiB = 1024**3
HBM_DERATE = 3.0 / 3.35  # measured copy / datasheet on an H100 (data/README.md), applied to both GPUs
HELD_BACK_EVERY = 5

HARDWARE = {
    "A100-80GB-SXM": dict(
        memory_bytes=80 * GiB, mem_bw_Bps=2.039e12 * HBM_DERATE, nvlink_Bps=300e9, allreduce_latency_s=10e-6,
        pcie_Bps=25e9,
    ),
    "H100-80GB-SXM": dict(
        memory_bytes=80 * GiB, mem_bw_Bps=3.35e12 * HBM_DERATE, nvlink_Bps=450e9, allreduce_latency_s=10e-6,
        pcie_Bps=50e9,
    ),
}


@dataclass(frozen=True)
class ProfileSpec:
    name: str
    csv_stem: str
    model: str
    gpu: str
    n_layers: int
    tp: int
    token_budget: int = 2048
    max_running: int = 256


SPECS = (
    ProfileSpec(
        "a100-llama3-8b", "a100_meta-llama_Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B", "A100-80GB-SXM", 32, 1
    ),
    ProfileSpec(
        "a100-llama3-70b-tp4", "a100_meta-llama_Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B", "A100-80GB-SXM", 80, 4
    ),
    ProfileSpec("h100-llama2-7b", "h100_meta-llama_Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", "H100-80GB-SXM", 32, 1),
    ProfileSpec(
        "h100-llama2-70b-tp4", "h100_meta-llama_Llama-2-70b-hf", "meta-llama/Llama-2-70b-hf", "H100-80GB-SXM", 80, 4
    ),
)


def read_layer_times(path: Path, tp: int) -> tuple[dict[str, int], dict[int, float], dict[int, float]]:
    """Model shape, and per token count: summed per-layer op time (s) and summed GEMM time (s) at ``tp``."""
    sums: dict[int, list[float]] = defaultdict(list)
    gemms: dict[int, list[float]] = defaultdict(list)
    shape: dict[str, int] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if int(row["num_tensor_parallel_workers"]) != tp:
                continue
            shape = {k: int(row[k]) for k in ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size")}
            shape["gated"] = int(row["use_gated_mlp"].strip().lower() == "true")
            n = int(row["num_tokens"])
            sums[n].append(sum(float(row[f"time_stats.{op}.median"]) for op in LAYER_OPS) / 1e3)
            gemms[n].append(sum(float(row[f"time_stats.{op}.median"]) for op in GEMM_OPS) / 1e3)
    if not sums:
        raise ValueError(f"{path}: no rows for tensor-parallel degree {tp}")
    return (
        shape,
        {n: float(np.mean(v)) for n, v in sorted(sums.items())},
        {n: float(np.mean(v)) for n, v in sorted(gemms.items())},
    )


def choose_knots(max_tokens: int) -> list[int]:
    """Dense where GEMM tiling makes the curve step (small batches), sparse where it is smooth."""
    base = [
        1, 8, 16,
        *range(32, 512, 32), *range(512, 1024, 64), *range(1024, 4096, 128),
        *range(4096, 8192, 1024), 8192, 12288, 16384, 24576,
    ]
    knots = [k for k in base if k < max_tokens]
    return [*knots, max_tokens]


def hat_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Design matrix of linear interpolation between knots: row i holds the weights of x[i] on each knot."""
    basis = np.zeros((len(x), len(knots)))
    idx = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, len(knots) - 2)
    left, right = knots[idx], knots[idx + 1]
    frac = (x - left) / (right - left)
    basis[np.arange(len(x)), idx] = 1 - frac
    basis[np.arange(len(x)), idx + 1] = frac
    return basis


def fit_piecewise(x: np.ndarray, y: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Values at the knots minimising the relative squared error of the interpolant."""
    weights = 1.0 / y
    design = hat_basis(x, knots) * weights[:, None]
    values, *_ = np.linalg.lstsq(design, y * weights, rcond=None)
    return values


def parameter_count(shape: dict[str, int], n_layers: int) -> int:
    head_dim = shape["n_embd"] // shape["n_head"]
    attn = shape["n_embd"] * head_dim * (2 * shape["n_head"] + 2 * shape["n_kv_head"])
    mlp = shape["n_embd"] * shape["n_expanded_embd"] * (3 if shape["gated"] else 2)
    norms = 2 * shape["n_embd"]
    return n_layers * (attn + mlp + norms) + 2 * shape["vocab_size"] * shape["n_embd"] + shape["n_embd"]


def fit_profile(spec: ProfileSpec, data_dir: Path | None = None) -> Profile:
    name = f"{spec.csv_stem}_mlp.csv.gz"
    path = (data_dir / name) if data_dir else data_path("gpu_profiles", name)
    shape, layer_s, gemm_s = read_layer_times(path, spec.tp)
    tokens = np.array(sorted(layer_s), dtype=float)
    total = np.array([layer_s[int(n)] * spec.n_layers for n in tokens])
    held = np.zeros(len(tokens), dtype=bool)
    held[HELD_BACK_EVERY // 2 :: HELD_BACK_EVERY] = True
    held[0] = held[-1] = False  # keep the ends in the fit: no extrapolation on either side
    knots = np.array(choose_knots(int(tokens.max())), dtype=float)
    values = fit_piecewise(tokens[~held], total[~held], knots)

    def rel_errors(mask: np.ndarray) -> np.ndarray:
        predicted = hat_basis(tokens[mask], knots) @ values
        errors: np.ndarray = np.abs(predicted - total[mask]) / total[mask]
        return errors

    held_err, train_err = rel_errors(held), rel_errors(~held)
    budget_mask = held & (tokens <= spec.token_budget + spec.max_running)

    head_dim = shape["n_embd"] // shape["n_head"]
    n_max = int(tokens.max())
    gemm_flops_per_token = 2 * (
        shape["n_embd"] * head_dim * (shape["n_head"] + 2 * shape["n_kv_head"])
        + shape["n_head"] * head_dim * shape["n_embd"]
        + shape["n_embd"] * shape["n_expanded_embd"] * (3 if shape["gated"] else 2)
    ) / spec.tp
    gemm_rate = gemm_flops_per_token * n_max / gemm_s[n_max]

    arch = Architecture(
        n_layers=spec.n_layers,
        n_head=shape["n_head"],
        n_kv_head=shape["n_kv_head"],
        head_dim=head_dim,
        n_embd=shape["n_embd"],
        n_expanded_embd=shape["n_expanded_embd"],
        vocab_size=shape["vocab_size"],
        dtype_bytes=2,
        tp=spec.tp,
    )
    hw = Hardware(name=spec.gpu, gemm_flops=round(gemm_rate, -9), **HARDWARE[spec.gpu])
    weights_bytes = parameter_count(shape, spec.n_layers) * arch.dtype_bytes / spec.tp
    block_size = 16
    block_bytes = arch.kv_bytes_per_token * block_size
    kv_bytes = 0.9 * hw.memory_bytes - weights_bytes - 2 * GiB
    engine = EngineConfig(
        block_size=block_size,
        kv_blocks=int(kv_bytes // block_bytes),
        swap_blocks=int(4 * GiB // block_bytes),
        token_budget=spec.token_budget,
        max_running=spec.max_running,
    )
    fit = {
        "source": f"data/gpu_profiles/{spec.csv_stem}_mlp.csv.gz (Vidur, microsoft/vidur @ 7d47513, MIT)",
        "model": spec.model,
        "measured": "median per-layer op times: " + ", ".join(LAYER_OPS) + f"; x {spec.n_layers} layers; TP={spec.tp}",
        "method": "piecewise-linear in batch tokens, values at knots by least squares on relative error",
        "token_counts": len(tokens),
        "fit_rows": int((~held).sum()),
        "held_back_rows": int(held.sum()),
        "held_back_rule": f"every {HELD_BACK_EVERY}th distinct token count (ends kept)",
        "held_back_mape_pct": round(100 * float(held_err.mean()), 3),
        "held_back_max_ape_pct": round(100 * float(held_err.max()), 3),
        "held_back_mape_within_budget_pct": round(100 * float(rel_errors(budget_mask).mean()), 3),
        "fit_rows_mape_pct": round(100 * float(train_err.mean()), 3),
        "gemm_rate_tflops": round(gemm_rate / 1e12, 1),
        "weights_gib_per_gpu": round(weights_bytes / GiB, 2),
        "kv_tokens": engine.kv_blocks * block_size,
        "notes": (
            "Linear layers: measured (fit above). Attention, LM head, KV write, TP all-reduce and swap: analytic, "
            "from the hardware figures in 'hw' (datasheet HBM x 0.896, NVLink per direction, PCIe achieved, "
            "10 us per all-reduce) and the GEMM rate derived from the measured projections. KV cache: 90% of GPU "
            "memory minus weights minus 2 GiB activations; swap space 4 GiB per GPU. CPU overheads (scheduling, "
            "sampling, input preparation) are not modelled."
        ),
    }
    description = f"{spec.model} on {spec.gpu}" + (f" x{spec.tp} (tensor parallel)" if spec.tp > 1 else "")
    return Profile(
        name=spec.name,
        description=description,
        arch=arch,
        hw=hw,
        engine=engine,
        knots=tuple(float(k) for k in knots),
        linear_s=tuple(round(float(v), 9) for v in values),
        fit=fit,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m tempo.serving.profiles.fit_gpu [--check]``: the same as ``tempo profile fit [--check]``."""
    from tempo.cli import main as tempo_main

    return tempo_main(["profile", "fit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
