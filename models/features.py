"""Request features with no fitted vocabulary: hashed character and word n-grams of the prompt (text capped,
so cost is bounded), prompt size, and one-hot source app / served model / SLO class.

Hashing is done with numpy on the UTF-8 bytes (polynomial hashes of spans from one prefix-hash array):
stable across processes (unlike ``hash()``) and ~20x faster than scikit-learn's HashingVectorizer on a
single prompt, which matters because feature time dominates a prediction. The only fitted part, a
truncated SVD projection of the hashed n-grams, lives in the artifact.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from tempo.models.text_score import TextScore

_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier: spreads the polynomial hash's bits
_BASE = np.uint64(1_000_003)
_BASE_INV = np.uint64(pow(1_000_003, -1, 1 << 64))
# bytes that belong to a word: ASCII letters, digits, '_' and every non-ASCII byte (UTF-8 letters)
_WORD_BYTE = np.array([(chr(b).isalnum() and b < 128) or b == 95 or b >= 128 for b in range(256)])

FloatArray = npt.NDArray[np.float64]


def app_key(app: str | None) -> str:
    """Normalised app name: the last path component (``chat/Alpaca`` and ``Alpaca`` are one app)."""
    return (app or "default").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class FeatureSpec:
    """How to turn a request into a vector; stored in the artifact manifest."""

    n_hash: int = 1 << 15  # hashed n-gram space (power of two)
    char_ngrams: tuple[int, ...] = (3, 4, 5)
    word_ngrams: tuple[int, ...] = (1, 2)
    max_chars: int = 2000  # head of the prompt that is hashed; bounds the cost per request
    svd_dims: int = 64
    apps: tuple[str, ...] = ()  # one-hot vocabularies of request metadata (not of text)
    models: tuple[str, ...] = ()
    slo_classes: tuple[str, ...] = ("latency", "deadline", "compound", "best_effort")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @property
    def meta_names(self) -> list[str]:
        return (
            ["log_prompt_tokens", "log_chars", "log_words", "newlines", "has_text"]
            + [f"app={a}" for a in self.apps]
            + [f"model={m}" for m in self.models]
            + [f"class={c}" for c in self.slo_classes]
        )

    @property
    def names(self) -> list[str]:
        return [*self.meta_names, *(f"svd{i}" for i in range(self.svd_dims)), "text_score"]


@dataclass(frozen=True, eq=False)
class PromptSketch:
    """What the estimator keeps of a prompt: hashed n-grams and a few counts, never the text itself.

    Completion records carry this (prompts are not stored raw unless configured), so a model can be
    retrained from records alone.
    """

    indices: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float64]
    n_chars: int
    n_words: int
    n_newlines: int

    @classmethod
    def of(cls, text: str | None, spec: FeatureSpec) -> PromptSketch:
        text = text or ""
        index, weights = hashed_ngrams(text, spec)
        return cls(index, weights, len(text), len(text.split()), text.count("\n"))

    def to_dict(self) -> dict[str, Any]:
        """JSON form for completion records (weights rounded: they only feed a projection)."""
        return {"indices": self.indices.tolist(), "weights": np.round(self.weights, 4).tolist(),
                "n_chars": self.n_chars, "n_words": self.n_words, "n_newlines": self.n_newlines}

    @classmethod
    def from_dict(cls, data: dict[str, Any], spec: FeatureSpec) -> PromptSketch:
        indices = np.asarray(data["indices"], dtype=np.int64)
        weights = np.asarray(data["weights"], dtype=np.float64)
        if indices.shape != weights.shape or (len(indices) and (indices.min() < 0 or indices.max() >= spec.n_hash)):
            raise ValueError("prompt sketch indices and weights disagree with the feature spec")
        return cls(indices, weights, int(data["n_chars"]), int(data["n_words"]), int(data["n_newlines"]))


def pack_sketch(sketch: PromptSketch, spec: FeatureSpec) -> dict[str, Any]:
    """Compact JSON form for the stream: indices as base64 uint16, weights as base64 float16 (~4 bytes per
    n-gram instead of ~13 as JSON lists; the weights only feed a projection)."""
    if spec.n_hash > 1 << 16:
        return dict(sketch.to_dict())
    return {"idx": base64.b64encode(sketch.indices.astype("<u2").tobytes()).decode(),
            "w": base64.b64encode(np.clip(sketch.weights, -6e4, 6e4).astype("<f2").tobytes()).decode(),
            "n_chars": sketch.n_chars, "n_words": sketch.n_words, "n_newlines": sketch.n_newlines}


def unpack_sketch(data: dict[str, Any], spec: FeatureSpec) -> PromptSketch:
    """A sketch from a record, packed or as lists; ValueError / KeyError / TypeError when malformed."""
    if "idx" in data:
        data = {**data, "indices": np.frombuffer(base64.b64decode(data["idx"], validate=True), dtype="<u2"),
                "weights": np.frombuffer(base64.b64decode(data["w"], validate=True), dtype="<f2")}
    sketch = PromptSketch.from_dict(data, spec)
    if not np.all(np.isfinite(sketch.weights)):
        raise ValueError("sketch weights must be finite")
    return sketch


def sketch_texts(texts: Sequence[str], spec: FeatureSpec) -> list[PromptSketch]:
    """Sketches of many texts, hashed in one pass (a fifth of the cost of hashing them one by one)."""
    if not texts:
        return []
    indptr, cols, weights = _hashed_rows(texts, spec)
    cols = cols.astype(np.int64)
    return [PromptSketch(cols[indptr[i]:indptr[i + 1]], weights[indptr[i]:indptr[i + 1]], len(text),
                         len(text.split()), text.count("\n")) for i, text in enumerate(texts)]


def sketch_all(requests: Sequence[RequestInfo], spec: FeatureSpec) -> list[PromptSketch]:
    """Sketches of many requests, each distinct prompt text hashed once (rows often share prompts)."""
    texts = list(dict.fromkeys(r.prompt or "" for r in requests if r.sketch is None))
    cache = dict(zip(texts, sketch_texts(texts, spec), strict=True))
    return [r.sketch if r.sketch is not None else cache[r.prompt or ""] for r in requests]


@dataclass(frozen=True)
class RequestInfo:
    """What the estimator may know about a request before it runs: a prompt sketch (or the text, sketched
    on use) and metadata."""

    prompt_tokens: int
    app: str | None = None
    model: str | None = None
    slo_class: str | None = None
    prompt: str | None = None
    sketch: PromptSketch | None = None

    def sketched(self, spec: FeatureSpec) -> PromptSketch:
        return self.sketch if self.sketch is not None else PromptSketch.of(self.prompt, spec)


def _prefix_hashes(data: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Prefix polynomial hashes H (H[i] = hash of data[:i]) and powers of the base, mod 2**64, vectorised.

    H[i] = sum_j data[j] * B**(i-1-j) = B**(i-1) * cumsum(data[j] * B**-j); B is odd, so its inverse
    mod 2**64 exists and uint64 wrap-around does the modular arithmetic.
    """
    n = len(data)
    powers = np.cumprod(np.full(n + 1, _BASE, dtype=np.uint64))  # B**1 .. B**(n+1)
    powers = np.concatenate([[np.uint64(1)], powers[:-1]])  # B**0 .. B**n
    inv_powers = np.cumprod(np.full(n, _BASE_INV, dtype=np.uint64))  # B**-1 .. B**-n
    inv_powers = np.concatenate([[np.uint64(1)], inv_powers[:-1]])  # B**0 .. B**-(n-1)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    prefix[1:] = np.cumsum(data * inv_powers, dtype=np.uint64) * powers[:n]
    return prefix, powers


def _ngram_counts(texts: Sequence[str], spec: FeatureSpec) -> tuple[npt.NDArray[np.int64], ...]:
    """(row, bucket, count) of the hashed n-grams of many texts, sorted by row then bucket.

    The texts are hashed in one pass over their UTF-8 bytes joined by NUL: character n-grams that would
    span a NUL and word n-grams that would span two texts are dropped, so each text gets exactly the
    n-grams it has alone. Words are runs of ASCII letters, digits, '_' or non-ASCII bytes.
    """
    heads = [t[: spec.max_chars].lower().encode("utf-8") for t in texts]
    lengths = np.array([len(h) for h in heads], dtype=np.int64)
    data = np.frombuffer(b"\x00".join(heads), dtype=np.uint8)
    if len(data) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    row_of_byte = np.repeat(np.arange(len(heads)), lengths + 1)[: len(data)]
    is_sep = data == 0
    seps_before = np.concatenate([[0], np.cumsum(is_sep)])
    prefix, powers = _prefix_hashes(data.astype(np.uint64))

    def span_hash(starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64], tag: int) -> npt.NDArray[np.uint64]:
        h = prefix[ends] - prefix[starts] * powers[ends - starts]
        return (h + np.uint64(tag)) * _MIX

    mask = np.uint64(spec.n_hash - 1)
    buckets: list[npt.NDArray[np.int64]] = []
    rows: list[npt.NDArray[np.int64]] = []
    for n in spec.char_ngrams:
        if len(data) < n:
            continue
        # every span [s, s + n) at once, on contiguous slices; kept when it holds no separator
        inside = seps_before[n:] == seps_before[:-n]
        h = ((prefix[n:] - prefix[:-n] * powers[n]) + np.uint64(n)) * _MIX
        buckets.append(((h[inside] >> np.uint64(32)) & mask).astype(np.int64))
        rows.append(row_of_byte[: len(inside)][inside])
    edges = np.diff(np.concatenate([[False], _WORD_BYTE[data], [False]]).astype(np.int8))
    word_starts, word_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    for n in spec.word_ngrams:
        first, last = word_starts[: max(len(word_starts) - n + 1, 0)], word_ends[n - 1 :]
        same_text = row_of_byte[first] == row_of_byte[last - 1]
        h = span_hash(first[same_text], last[same_text], 100 + n)
        buckets.append(((h >> np.uint64(32)) & mask).astype(np.int64))
        rows.append(row_of_byte[first[same_text]])
    keys = np.concatenate(rows) * spec.n_hash + np.concatenate(buckets)
    if len(texts) * spec.n_hash < 1 << 31:  # int32 keys sort twice as fast
        keys = keys.astype(np.int32)
    keys = np.sort(keys)  # sorting beats counting over n_hash slots per text
    firsts = np.flatnonzero(np.concatenate((keys[:1] >= 0, keys[1:] != keys[:-1])))  # each key's first place
    counts = np.diff(np.append(firsts, len(keys)))
    present = keys[firsts].astype(np.int64)
    return present // spec.n_hash, present % spec.n_hash, counts


def _hashed_rows(texts: Sequence[str], spec: FeatureSpec) -> tuple[npt.NDArray[np.int64], ...]:
    """(indptr, bucket, weight) of the hashed n-grams of many texts, in CSR layout: log1p counts, each row
    L2-normalised (the arrays without scipy's matrix, which costs more to build than one prompt to hash)."""
    rows, cols, counts = _ngram_counts(texts, spec)
    weights = np.log1p(counts.astype(np.float64))
    norms = np.sqrt(np.bincount(rows, weights * weights, minlength=len(texts)))
    weights = weights / norms[rows] if len(rows) else weights
    return np.searchsorted(rows, np.arange(len(texts) + 1)), cols, weights


def hashed_batch(texts: Sequence[str], spec: FeatureSpec) -> sp.csr_matrix:
    """Hashed n-grams of many texts as a sparse matrix: log1p counts, each row L2-normalised."""
    indptr, cols, weights = _hashed_rows(texts, spec)
    return sp.csr_matrix((weights, cols, indptr), shape=(len(texts), spec.n_hash))


def hashed_ngrams(text: str, spec: FeatureSpec) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """(indices, weights) of one prompt's hashed n-grams (see ``hashed_batch``)."""
    _, cols, weights = _hashed_rows([text], spec)
    return cols.astype(np.int64), weights


def hashed_matrix(sketches: Sequence[PromptSketch], spec: FeatureSpec) -> sp.csr_matrix:
    """Sparse matrix of hashed n-grams, one row per sketch (an empty row when there was no text)."""
    indptr = np.cumsum([0] + [len(k.indices) for k in sketches])
    indices = np.concatenate([k.indices for k in sketches]) if sketches else np.zeros(0, dtype=np.int64)
    values = np.concatenate([k.weights for k in sketches]) if sketches else np.zeros(0)
    return sp.csr_matrix((values, indices, indptr), shape=(len(sketches), spec.n_hash))


def meta_matrix(requests: Sequence[RequestInfo], sketches: Sequence[PromptSketch], spec: FeatureSpec) -> FloatArray:
    """Dense metadata features, in ``spec.meta_names`` order."""
    app_index = {a: i for i, a in enumerate(spec.apps)}
    model_index = {m: i for i, m in enumerate(spec.models)}
    class_index = {c: i for i, c in enumerate(spec.slo_classes)}
    out = np.zeros((len(requests), len(spec.meta_names)))
    base_app = 5
    base_model = base_app + len(spec.apps)
    base_class = base_model + len(spec.models)
    for row, (r, k) in enumerate(zip(requests, sketches, strict=True)):
        out[row, 0] = np.log1p(max(r.prompt_tokens, 0))
        out[row, 1] = np.log1p(k.n_chars)
        out[row, 2] = np.log1p(k.n_words)
        out[row, 3] = min(k.n_newlines, 200)
        out[row, 4] = 1.0 if k.n_chars else 0.0
        if (i := app_index.get(app_key(r.app))) is not None:
            out[row, base_app + i] = 1.0
        if r.model is not None and (i := model_index.get(r.model)) is not None:
            out[row, base_model + i] = 1.0
        if r.slo_class is not None and (i := class_index.get(r.slo_class)) is not None:
            out[row, base_class + i] = 1.0
    return out


@dataclass
class Featurizer:
    """Metadata, SVD-projected hashed n-grams and a ridge text score (see ``text_score``).

    ``fit_transform`` learns the projection and the score from training requests and their mean log
    lengths, returning training features whose text score is out-of-fold.
    """

    spec: FeatureSpec = field(default_factory=FeatureSpec)
    components_: npt.NDArray[np.float32] | None = None  # (n_hash, svd_dims), fitted
    text_score_: TextScore | None = None

    def fit_transform(
        self, requests: Sequence[RequestInfo], mean_log_length: FloatArray, seed: int = 0
    ) -> FloatArray:
        from sklearn.decomposition import TruncatedSVD

        sketches = sketch_all(requests, self.spec)
        hashed = hashed_matrix(sketches, self.spec)
        svd = TruncatedSVD(n_components=self.spec.svd_dims, random_state=seed, algorithm="randomized", n_iter=4)
        projected = svd.fit_transform(hashed)
        self.components_ = svd.components_.T.astype(np.float32)
        meta = meta_matrix(requests, sketches, self.spec)
        groups = _group_ids(sketches)  # rows that share a prompt share a fold
        self.text_score_ = TextScore()
        score = self.text_score_.fit_oof(hashed, meta, mean_log_length, groups)
        return np.hstack([meta, projected, score[:, None]])

    def _fitted(self) -> tuple[npt.NDArray[np.float32], TextScore]:
        if self.components_ is None or self.text_score_ is None:
            raise RuntimeError("Featurizer is not fitted")
        return self.components_, self.text_score_

    def transform(self, requests: Sequence[RequestInfo]) -> FloatArray:
        components, text_score = self._fitted()
        sketches = sketch_all(requests, self.spec)
        meta = meta_matrix(requests, sketches, self.spec)
        if len(requests) == 1:  # the single-prediction hot path: no sparse matrix
            k = sketches[0]
            coef = text_score.coef_
            assert coef is not None
            projected = k.weights.astype(np.float32) @ components[k.indices] if len(k.indices) else np.zeros(
                self.spec.svd_dims
            )
            score = k.weights @ coef[k.indices] + meta[0] @ coef[self.spec.n_hash :] + text_score.intercept_
            return np.hstack([meta[0], projected, [score]])[None, :]
        hashed = hashed_matrix(sketches, self.spec)
        # in float32 like the components: a float64 product would first copy the whole (n_hash x dims) matrix
        projected = np.asarray(hashed.astype(np.float32) @ components, dtype=np.float64)
        return np.hstack([meta, projected, text_score.predict(hashed, meta)[:, None]])


def _group_ids(sketches: Sequence[PromptSketch]) -> list[int]:
    """One id per distinct sketch object (sketch_all shares one object per distinct prompt)."""
    ids: dict[int, int] = {}
    return [ids.setdefault(id(k), len(ids)) for k in sketches]
