"""Tokenize task rows into model inputs, and collate them into right-padded batches.

Works with any Hugging Face fast tokenizer (the synthetic suite's WordPiece one, XLM-R's SentencePiece
one, mBERT's WordPiece one). One `featurize_*` per task format; every feature is a dict of plain lists
and ints, so datasets are cheap to shuffle and batch.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from eval.tasks import TaskSpec
from models import IGNORE

from . import distributed


def _pair_inputs(tokenizer, first, second, max_len: int) -> dict:
    enc = tokenizer(first, second, truncation="longest_first" if second is not None else True, max_length=max_len)
    out = {"input_ids": enc["input_ids"]}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    return out


def featurize_pair(task: TaskSpec, rows: list[dict], tokenizer, max_len: int) -> list[dict]:
    firsts = [r["sentence1"] for r in rows]
    seconds = [r["sentence2"] for r in rows] if rows and rows[0].get("sentence2") is not None else None
    enc = _pair_inputs(tokenizer, firsts, seconds, max_len)
    feats = []
    for i, row in enumerate(rows):
        if not 0 <= row["label"] < len(task.labels):
            raise ValueError(f"{task.name}: row {i}: label {row['label']} is not in 0..{len(task.labels) - 1}")
        feats.append({k: v[i] for k, v in enc.items()} | {"labels": row["label"], "example": i})
    return feats


def featurize_tagging(task: TaskSpec, rows: list[dict], tokenizer, max_len: int) -> list[dict]:
    """First subword of each word carries the word's label (XTREME's convention). A sentence longer than
    max_len subwords is split into word-aligned chunks whose predictions are merged back at decoding, so
    no word is ever truncated out of the score. Two batched tokenizer calls: subwords per word, then the
    chunks."""
    tag_id = {t: i for i, t in enumerate(task.labels)}
    budget = max_len - tokenizer.num_special_tokens_to_add(pair=False)
    for i, row in enumerate(rows):
        if len(row["tokens"]) != len(row["tags"]):
            raise ValueError(f"{task.name}: row {i}: {len(row['tokens'])} tokens but {len(row['tags'])} tags")
        unknown = sorted({t for t in row["tags"] if t not in tag_id})
        if unknown:
            raise ValueError(f"{task.name}: row {i}: unknown tag(s) {unknown}; expected {list(task.labels)}")
    words = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, add_special_tokens=False) if rows else None
    chunks = []  # (row, first word, end word)
    for i, row in enumerate(rows):
        sizes = [0] * len(row["tokens"])
        for w in words.word_ids(i):
            sizes[w] += 1
        sizes = [max(1, n) for n in sizes]  # a word with no subword still takes a slot, as before batching
        start = 0
        while True:
            end, used = start, 0
            while end < len(sizes) and (used + sizes[end] <= budget or end == start):
                used += sizes[end]
                end += 1
            chunks.append((i, start, end))
            if end >= len(sizes):
                break
            start = end
    if not chunks:
        return []
    enc = tokenizer([rows[i]["tokens"][a:b] for i, a, b in chunks], is_split_into_words=True, truncation=True,
                    max_length=max_len)
    feats = []
    for j, (i, start, _) in enumerate(chunks):
        tags = rows[i]["tags"]
        labels, first_of = [], []
        prev = None
        for w in enc.word_ids(j):
            is_first = w is not None and w != prev
            labels.append(tag_id[tags[start + w]] if is_first else IGNORE)
            first_of.append(start + w if is_first else -1)
            prev = w
        feats.append({"input_ids": enc["input_ids"][j], "labels": labels, "word_index": first_of, "example": i})
    return feats


def featurize_qa(task: TaskSpec, rows: list[dict], tokenizer, max_len: int, stride: int = 128) -> list[dict]:
    """SQuAD-style windows over long contexts (doc stride). The answer's first and last subword give the
    start and end positions; a window without the whole answer points at the first token (index 0)."""
    questions = [r["question"].lstrip() for r in rows]
    contexts = [r["context"] for r in rows]
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_len,
                    stride=min(stride, max_len // 2), return_overflowing_tokens=True, return_offsets_mapping=True)
    feats = []
    for j, example in enumerate(enc["overflow_to_sample_mapping"]):
        row = rows[example]
        seq_ids = enc.sequence_ids(j)
        offsets = [off if seq_ids[t] == 1 else None for t, off in enumerate(enc["offset_mapping"][j])]
        start_pos = end_pos = 0
        answers = row["answers"]
        if answers["text"]:
            a_start = answers["answer_start"][0]
            a_end = a_start + len(answers["text"][0])
            ctx = [t for t, off in enumerate(offsets) if off is not None]
            if ctx and offsets[ctx[0]][0] <= a_start and offsets[ctx[-1]][1] >= a_end:
                start_pos = next(t for t in ctx if offsets[t][1] > a_start)
                end_pos = max(t for t in ctx if offsets[t][0] < a_end)
        feat = {"input_ids": enc["input_ids"][j], "start_positions": start_pos, "end_positions": end_pos,
                "offsets": offsets, "example": example}
        if "token_type_ids" in enc:
            feat["token_type_ids"] = enc["token_type_ids"][j]
        feats.append(feat)
    return feats


def featurize_choice(task: TaskSpec, rows: list[dict], tokenizer, max_len: int) -> list[dict]:
    """One (context, ending) pair per choice; one batched tokenizer call over every row's pairs."""
    k = task.num_choices
    for i, row in enumerate(rows):
        if len(row["endings"]) != k:
            raise ValueError(f"{task.name}: row {i}: {len(row['endings'])} endings, expected {k}")
    if not rows or not k:
        return [{"choices": [], "labels": row["label"], "example": i} for i, row in enumerate(rows)]
    enc = _pair_inputs(tokenizer, [row["context"] for row in rows for _ in range(k)],
                       [ending for row in rows for ending in row["endings"]], max_len)
    return [{"choices": [{key: v[i * k + c] for key, v in enc.items()} for c in range(k)],
             "labels": row["label"], "example": i} for i, row in enumerate(rows)]


def featurize_ranking(task: TaskSpec, rows: list[dict], tokenizer, max_len: int, query_max_len: int = 0) -> list[dict]:
    """Dual-encoder training pairs from ranking rows (query rows, then the candidate pool; eval.tasks): one
    (query, its first gold candidate) pair per query whose gold is in the pool, laid out as two "choices" so that
    collate flattens a batch into q0 c0 q1 c1 ...; `labels` is the candidate's index in the pool (a batch holding
    one candidate twice must not treat the copy as a negative). Queries are cut at query_max_len (0 = max_len)."""
    pool = {r["id"]: i for i, r in enumerate(r for r in rows if "candidate" in r)}
    texts = [r["candidate"] for r in rows if "candidate" in r]
    queries = [r for r in rows if "query" in r and r["answers"] and r["answers"][0] in pool]
    if not queries:
        return []
    q = tokenizer([r["query"] for r in queries], truncation=True, max_length=query_max_len or max_len)["input_ids"]
    gold = [pool[r["answers"][0]] for r in queries]
    c = tokenizer([texts[g] for g in gold], truncation=True, max_length=max_len)["input_ids"]
    return [{"choices": [{"input_ids": qi}, {"input_ids": ci}], "labels": g, "example": i}
            for i, (qi, ci, g) in enumerate(zip(q, c, gold))]


FEATURIZERS = {"pair": featurize_pair, "tagging": featurize_tagging, "qa": featurize_qa,
               "choice": featurize_choice, "ranking": featurize_ranking}


def featurize(task: TaskSpec, rows: list[dict], tokenizer, max_len: int, doc_stride: int = 128,
              query_max_len: int = 0) -> list[dict]:
    """Model inputs for `rows`; doc_stride is the overlap of QA windows over long contexts, query_max_len the
    length of a dual encoder's queries (ranking)."""
    if task.format not in FEATURIZERS:
        raise ValueError(f"{task.name}: format {task.format!r} is not trained (retrieval needs no features)")
    if task.format == "qa":
        return featurize_qa(task, rows, tokenizer, max_len, doc_stride)
    if task.format == "ranking":
        return featurize_ranking(task, rows, tokenizer, max_len, query_max_len)
    return FEATURIZERS[task.format](task, rows, tokenizer, max_len)


# ----- batching ----------------------------------------------------------------------------------------
_SEQUENCE_KEYS = ("input_ids", "token_type_ids", "labels", "special_tokens_mask")


def collate(feats: list[dict], pad_id: int) -> dict:
    """Right-pad sequences into tensors; 'lengths' gives each sequence's real length."""
    if "choices" in feats[0]:  # multiple choice: flatten (batch, choice) into rows
        batch = collate([c for f in feats for c in f["choices"]], pad_id)
        batch["labels"] = torch.tensor([f["labels"] for f in feats])
        batch["num_choices"] = len(feats[0]["choices"])
        batch["example"] = [f["example"] for f in feats]
        return batch
    width = max(len(f["input_ids"]) for f in feats)
    batch: dict = {"lengths": torch.tensor([len(f["input_ids"]) for f in feats])}
    for key in feats[0]:
        values = [f[key] for f in feats]
        if key in _SEQUENCE_KEYS and isinstance(values[0], list):
            fill = pad_id if key == "input_ids" else IGNORE if key == "labels" else 0
            batch[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values])
        elif isinstance(values[0], int) and key != "example":
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values  # bookkeeping (example index, offsets, word index) stays on the host
    return batch


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a collated batch's tensors to `device` (bookkeeping lists stay on the host)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _size(f: dict) -> int:
    return len(f["input_ids"]) if "input_ids" in f else max(len(c["input_ids"]) for c in f["choices"])


def batch_groups(feats: list[dict], batch_size: int, shuffle_rng: random.Random | None = None) -> list[list[int]]:
    """Feature indices of each batch, batches of similar length (less padding). With an rng: shuffled, then
    sorted by length within windows of 50 batches, and the batch order shuffled again; without: by length."""
    order = list(range(len(feats)))
    if shuffle_rng is None:
        order.sort(key=lambda i: _size(feats[i]))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    shuffle_rng.shuffle(order)
    window = batch_size * 50
    groups = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: _size(feats[i]))
        groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffle_rng.shuffle(groups)
    return groups


def batches(feats: list[dict], batch_size: int, pad_id: int, shuffle_rng: random.Random | None = None,
            ) -> Iterator[dict]:
    """Collated batches of batch_groups (evaluation: by length, no rng)."""
    for g in batch_groups(feats, batch_size, shuffle_rng):
        yield collate([feats[i] for i in g], pad_id)


class EpochStream:
    """An endless stream of training batches, epoch after epoch. Epoch e's batches are `groups(e)`, drawn from
    (seed, e) alone, and `make(group, epoch, index)` builds each one, so the position (epoch, index) is the
    whole state: a resumed run regenerates the epoch and goes on from the same batch."""

    def __init__(self, groups, make):
        self.groups_of, self.make = groups, make
        self.epoch, self.index, self._groups = 0, 0, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._groups is None:
            self._groups = self.groups_of(self.epoch)
            if not self._groups:
                raise ValueError("EpochStream: an epoch with no batches")
        if self.index >= len(self._groups):
            self.epoch, self.index, self._groups = self.epoch + 1, 0, self.groups_of(self.epoch + 1)
        batch = self.make(self._groups[self.index], self.epoch, self.index)
        self.index += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index, self._groups = int(state["epoch"]), int(state["index"]), None


def micro_groups(group: list, micro_batches: int = 1) -> list[tuple[list, bool]]:
    """This rank's share of a global batch's items, cut into micro-batches: [(items, dummy)]. Every rank gets
    the same number of micro-batches, k, set by the largest share: FSDP2 gathers each layer's weights in every
    forward, so ranks that ran different numbers of forwards would wait on each other's collectives for ever.
    A rank with fewer pieces (a smaller share; none, when a last batch is smaller than the world) fills up with
    dummy micro-batches, which the step weighs 0 but runs."""
    d = distributed.current()
    local = distributed.local_part(group, d)
    largest = -(-len(group) // d.world) if d.active else len(group)  # the first rank's share (strided)
    k = max(1, min(micro_batches, largest))
    size = -(-len(local) // k) if local else 1
    parts = [(local[i:i + size], False) for i in range(0, len(local), size)]
    return parts + [(group[:1], True)] * (k - len(parts))


def training_stream(feats: list[dict], batch_size: int, pad_id: int, seed: int, micro_batches: int = 1,
                    ) -> EpochStream:
    """Shuffled training batches of `feats` (batch_groups with an rng drawn from (seed, epoch)); batch_size is
    the global batch: under torchrun each rank collates its own share, in `micro_batches` pieces."""
    def make(group, e, i):
        parts = micro_groups(group, micro_batches)
        if len(parts) == 1 and not distributed.current().active:
            return collate([feats[j] for j in parts[0][0]], pad_id)
        return [collate([feats[j] for j in items], pad_id) | ({"dummy": True} if dummy else {})
                for items, dummy in parts]

    return EpochStream(lambda e: batch_groups(feats, batch_size, random.Random(f"xlt-batches-{seed}-{e}")), make)


def split_rows(batch: dict, micro_batches: int = 1):
    """A collated global batch (e.g. masked LM, masked as a whole so the masks do not depend on the split) cut
    into this rank's micro-batches: the tensors' rows of micro_groups."""
    n = len(batch["lengths"])
    parts = micro_groups(list(range(n)), micro_batches)
    if len(parts) == 1 and not distributed.current().active:
        return batch
    def rows_of(v, rows):
        return v[torch.tensor(rows)] if torch.is_tensor(v) and v.dim() and len(v) == n else v

    return [{k: rows_of(v, rows) for k, v in batch.items()} | ({"dummy": True} if dummy else {})
            for rows, dummy in parts]


class MixtureStream:
    """Batches from several streams, each step's stream drawn with the given probabilities (multi-task
    training); the batch carries its stream's name as "task". State: the draw's rng and every stream's."""

    def __init__(self, streams: dict, weights: dict[str, float], seed: int):
        self.streams, self.names = streams, list(weights)
        self.probs = [weights[n] for n in self.names]
        self.rng = random.Random(f"xlt-mixture-{seed}")

    def __iter__(self):
        return self

    def __next__(self):
        name = self.rng.choices(self.names, self.probs)[0]
        item = next(self.streams[name])
        return [m | {"task": name} for m in item] if isinstance(item, list) else item | {"task": name}

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "streams": {n: s.state() for n, s in self.streams.items()}}

    def restore(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for name, s in state["streams"].items():
            self.streams[name].restore(s)


def num_batches(num_feats: int, batch_size: int) -> int:
    return -(-num_feats // batch_size)
