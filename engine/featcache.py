"""On-disk cache of model inputs, so a second condition or a second run does not tokenize again.

`FeatureCache(root).get(task, split, lang, rows, tokenizer, max_len, doc_stride, make)` returns the
features of `engine.data.featurize` for those arguments: read from `root` when a file for the same key is
there, else `make()`, written to `root` and returned. The key covers everything that determines the
features: the task's name, format, labels and number of choices, the split and language, a digest of the
rows' content, a digest of the tokenizer's whole definition, max_len, doc_stride (QA only), a digest of
engine/data.py's source (the featurizers) and the tokenizers / transformers versions.

Storage (no pickle): one safetensors file per key, columnar. Each field of the features becomes flat
integer arrays, in the smallest integer type that holds them:
- a scalar int (`labels` of a pair, `example`, `start_positions`): one array with a value per feature;
- a list of ints (`input_ids`, `token_type_ids`, tagging `labels` with -100, `word_index` with -1): the
  concatenated values and the length of each feature's list;
- a list of (start, end) or None (QA `offsets`): an (n, 2) array with None written as (-1, -1), and the
  lengths;
- a list of dicts (multiple choice `choices`): the number of dicts per feature, and the dicts' own fields
  encoded the same way.
The file's metadata (JSON) holds the field names and kinds, the number of features, the full key and a
SHA-256 of the arrays. Files are written to a temp file in the same folder and renamed over the final
name (os.replace), so a killed process never leaves a half file under a valid name; a file that cannot
be read, does not match its key or fails its checksum is a miss: made again and rewritten.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import tempfile
import weakref
from itertools import chain
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from eval.tasks import TaskSpec

log = logging.getLogger("xlt.engine.featcache")

CACHE_VERSION = 1  # bump when the file layout or the key changes
_META = "xlt_featcache"
_INT_TYPES = (np.int8, np.int16, np.int32, np.int64)


# ----- digests -------------------------------------------------------------------------------------------
def rows_digest(rows: list[dict]) -> str:
    """SHA-256 of the rows' content as JSON (sorted keys), encoded in chunks to keep memory flat."""
    if not isinstance(rows, list):
        raise TypeError(f"rows_digest: rows must be a list of dicts, got {type(rows).__name__}")
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
    h = hashlib.sha256(f"rows:{len(rows)}:".encode())
    step = 4096
    for i in range(0, len(rows), step):
        try:
            h.update(encoder.encode(rows[i:i + step]).encode())
        except TypeError as e:
            raise TypeError(f"rows_digest: rows {i}..{min(i + step, len(rows)) - 1} are not JSON data ({e})") from e
    return h.hexdigest()


_TOKENIZER_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of a fast tokenizer's full definition (backend_tokenizer.to_str(): normalizer, pre-tokenizer,
    model with its vocabulary, post-processor, added tokens; not the truncation / padding settings of its
    last call), its special tokens, the settings of the transformers wrapper that change encodings, and its
    class name. Memoised per tokenizer object (XLM-R's definition is ~17 MB of JSON); recomputed if the
    tokenizer's length changes (tokens added)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"tokenizer_digest: {type(tokenizer).__name__} is not a fast tokenizer (no "
                        "backend_tokenizer); load it with use_fast=True")
    size = len(tokenizer)
    memo = _TOKENIZER_DIGESTS.get(id(tokenizer))
    if memo is not None and memo[0]() is tokenizer and memo[1] == size:
        return memo[2]
    # The backend's JSON also holds its current truncation / padding settings, which every call with
    # truncation=True / max_length overwrites: they are call state, not the definition, so they are dropped.
    definition = json.loads(backend.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    h = hashlib.sha256()
    h.update(json.dumps(definition, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    wrapper = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
               "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
               "special_ids": list(tokenizer.all_special_ids),
               "truncation_side": getattr(tokenizer, "truncation_side", None),
               "padding_side": getattr(tokenizer, "padding_side", None),
               "model_input_names": list(getattr(tokenizer, "model_input_names", [])),
               "len": size}
    h.update(json.dumps(wrapper, sort_keys=True, default=str).encode())
    digest = h.hexdigest()
    key = id(tokenizer)
    try:
        ref = weakref.ref(tokenizer, lambda _: _TOKENIZER_DIGESTS.pop(key, None))
    except TypeError:  # not weak-referenceable: no memo
        return digest
    _TOKENIZER_DIGESTS[key] = (ref, size, digest)
    return digest


_FEATURIZER_DIGEST: list[str] = []


def featurizer_digest() -> str:
    """SHA-256 of engine/data.py's source and the ignore label it writes: the featurizer code."""
    if not _FEATURIZER_DIGEST:
        from models import IGNORE

        from . import data
        h = hashlib.sha256(Path(data.__file__).read_bytes())
        h.update(f"IGNORE={IGNORE}".encode())
        _FEATURIZER_DIGEST.append(h.hexdigest())
    return _FEATURIZER_DIGEST[0]


def _versions() -> dict:
    import tokenizers
    import transformers
    return {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__}


# ----- columnar encoding ---------------------------------------------------------------------------------
class CacheFileError(ValueError):
    """A cache file that does not decode to features (truncated, corrupted, another layout)."""


def _smallest(values: np.ndarray) -> np.ndarray:
    if values.size == 0:
        return values.astype(np.int8)
    lo, hi = int(values.min()), int(values.max())
    for t in _INT_TYPES:
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return values.astype(t, copy=False)
    raise AssertionError("unreachable: int64 holds every value")


def _types(values) -> set:
    return set(map(type, values))


def _encode(feats: list[dict], prefix: str, tensors: dict, where: str) -> list:
    """Encode a list of dicts sharing the same keys into `tensors`; returns the schema
    [[name, kind, sub-schema or None], ...] (kinds: int, ints, spans, records)."""
    if not feats:
        return []
    names = list(feats[0])
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise TypeError(f"{where}: feature {i} is a {type(f).__name__}, expected a dict")
        if f.keys() != feats[0].keys():
            raise ValueError(f"{where}: feature {i} has fields {sorted(f)}, feature 0 has {sorted(names)}")
    schema = []
    for j, name in enumerate(names):
        base, field = f"{prefix}{j}", f"{where}.{name}"
        column = [f[name] for f in feats]
        kinds = _types(column)
        if kinds == {int}:
            tensors[base] = _smallest(np.array(column, dtype=np.int64))
            schema.append([name, "int", None])
            continue
        if kinds != {list}:
            raise TypeError(f"{field}: values of type {sorted(t.__name__ for t in kinds)}; the cache stores "
                            "ints, lists of ints, lists of (int, int) or None, and lists of dicts")
        lengths = np.fromiter(map(len, column), dtype=np.int64, count=len(column))
        flat = list(chain.from_iterable(column))
        inner = _types(flat)
        tensors[base + ".lengths"] = _smallest(lengths)
        if inner <= {int}:
            tensors[base + ".values"] = _smallest(np.array(flat, dtype=np.int64))
            schema.append([name, "ints", None])
        elif inner <= {tuple, type(None)}:
            filled = [(-1, -1) if s is None else s for s in flat]
            members = list(chain.from_iterable(filled))
            if not set(map(len, filled)) <= {2} or not _types(members) <= {int}:
                raise TypeError(f"{field}: spans must be (int, int) tuples or None")
            arr = np.array(members, dtype=np.int64).reshape(-1, 2)
            if int((arr < 0).any(axis=1).sum()) != flat.count(None):
                raise ValueError(f"{field}: negative span bounds cannot be told apart from None (-1, -1)")
            tensors[base + ".values"] = _smallest(arr)
            schema.append([name, "spans", None])
        elif inner == {dict}:
            sub = _encode(flat, base + "/", tensors, field)
            schema.append([name, "records", sub])
        else:
            raise TypeError(f"{field}: list items of type {sorted(t.__name__ for t in inner)}; the cache stores "
                            "lists of ints, of (int, int) or None, or of dicts")
    return schema


def _split(flat: list, lengths: np.ndarray, field: str) -> list[list]:
    if lengths.size and int(lengths.min()) < 0:
        raise CacheFileError(f"{field}: negative lengths")
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
    if bounds[-1] != len(flat):
        raise CacheFileError(f"{field}: lengths sum to {bounds[-1]}, but there are {len(flat)} values")
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _decode(schema: list, n: int, prefix: str, tensors: dict) -> list[dict]:
    if not schema:
        if n:
            raise CacheFileError(f"{n} features without fields")
        return []
    columns = []
    for j, (name, kind, sub) in enumerate(schema):
        base = f"{prefix}{j}"
        if kind == "int":
            values = tensors[base]
            if values.shape != (n,):
                raise CacheFileError(f"{name}: {values.shape} values for {n} features")
            columns.append(values.tolist())
            continue
        lengths = tensors[base + ".lengths"]
        if lengths.shape != (n,):
            raise CacheFileError(f"{name}: {lengths.shape} lengths for {n} features")
        if kind == "ints":
            values = tensors[base + ".values"]
            if values.ndim != 1:
                raise CacheFileError(f"{name}: values of shape {values.shape}")
            columns.append(_split(values.tolist(), lengths, name))
        elif kind == "spans":
            values = tensors[base + ".values"]
            if values.ndim != 2 or values.shape[1] != 2:
                raise CacheFileError(f"{name}: spans of shape {values.shape}")
            flat = list(zip(values[:, 0].tolist(), values[:, 1].tolist()))
            for i in np.flatnonzero(values[:, 0] < 0).tolist():
                flat[i] = None
            columns.append(_split(flat, lengths, name))
        elif kind == "records":
            inner = _decode(sub, int(lengths.sum()), base + "/", tensors)
            columns.append(_split(inner, lengths, name))
        else:
            raise CacheFileError(f"{name}: unknown kind {kind!r}")
    names = [s[0] for s in schema]
    return [dict(zip(names, values)) for values in zip(*columns)]


def _checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.data)
    return h.hexdigest()


def write_features(path: Path, feats: list[dict], key: dict) -> None:
    """Write `feats` to `path` atomically (temp file in the same folder, then os.replace)."""
    if not isinstance(feats, list):
        raise TypeError(f"features must be a list of dicts, got {type(feats).__name__}")
    tensors: dict[str, np.ndarray] = {}
    schema = _encode(feats, "", tensors, "features")
    meta = {"version": CACHE_VERSION, "n": len(feats), "schema": schema, "key": key,
            "checksum": _checksum(tensors)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_features(path: Path, key: dict | None = None) -> list[dict]:
    """Features from a cache file; raises CacheFileError when it is not a complete, valid file for `key`."""
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {})[_META])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # the safetensors reader's errors (truncated header, short buffer), bad metadata
        raise CacheFileError(f"{path}: {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        raise CacheFileError(f"{path}: cache layout {meta.get('version') if isinstance(meta, dict) else meta!r}, "
                             f"expected {CACHE_VERSION}")
    if key is not None and meta.get("key") != key:
        raise CacheFileError(f"{path}: written for another key")
    if _checksum(tensors) != meta.get("checksum"):
        raise CacheFileError(f"{path}: checksum mismatch (corrupted file)")
    # Decoding makes millions of small lists and tuples, none of them in a cycle: the cyclic garbage
    # collector would scan every live object (the caller's other features too) many times over for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _decode(meta["schema"], int(meta["n"]), "", tensors)
    except CacheFileError:
        raise
    except Exception as e:  # missing arrays, malformed schema
        raise CacheFileError(f"{path}: {type(e).__name__}: {e}") from e
    finally:
        if collecting:
            gc.enable()


# ----- the cache -----------------------------------------------------------------------------------------
def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(part))[:60] or "_"


class FeatureCache:
    """Features by key under `root` (None: no caching, make() is always called). `hits` and `misses`
    count the calls of get() that read a file and that called make()."""

    def __init__(self, root: Path | None):
        self.root = None if root is None else Path(root)
        self.hits = 0
        self.misses = 0

    def key(self, task: TaskSpec, split: str, lang: str, rows: list[dict], tokenizer, max_len: int,
            doc_stride: int, query_max_len: int = 0) -> dict:
        """Everything that determines the features of `engine.data.featurize` for these arguments."""
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"{task.name}: max_len must be a positive int, got {max_len!r}")
        if task.format == "qa" and (not isinstance(doc_stride, int) or doc_stride < 0):
            raise ValueError(f"{task.name}: doc_stride must be an int >= 0, got {doc_stride!r}")
        return {"cache_version": CACHE_VERSION, "task": task.name, "format": task.format,
                "labels": list(task.labels), "num_choices": task.num_choices, "split": split, "lang": lang,
                "rows": rows_digest(rows), "tokenizer": tokenizer_digest(tokenizer), "max_len": max_len,
                "doc_stride": doc_stride if task.format == "qa" else None,
                "query_max_len": query_max_len if task.format == "ranking" else None, "featurizer": featurizer_digest(),
                "versions": _versions()}

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        name = f"{_safe(key['task'])}-{_safe(key['split'])}-{_safe(key['lang'])}-{digest[:20]}.safetensors"
        return self.root / name

    def get(self, task: TaskSpec, split: str, lang: str, rows: list[dict], tokenizer, max_len: int,
            doc_stride: int, make: Callable[[], list[dict]], query_max_len: int = 0) -> list[dict]:
        if self.root is None:
            self.misses += 1
            return make()
        key = self.key(task, split, lang, rows, tokenizer, max_len, doc_stride, query_max_len)
        path = self.path(key)
        if path.exists():
            try:
                feats = read_features(path, key)
                self.hits += 1
                return feats
            except CacheFileError as e:
                log.warning("feature cache: %s; making the features again", e)
        self.misses += 1
        feats = make()
        try:
            write_features(path, feats, key)
        except OSError as e:  # a full or read-only disk costs the cache, not the run
            log.warning("feature cache: could not write %s (%s); continuing without it", path, e)
        return feats
