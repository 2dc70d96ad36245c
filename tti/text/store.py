"""A frozen text encoder's token states, computed once per caption into a memory-mapped store
that every rank maps read-only. A folder per encoder identity, under the data cache folder:

    text_<encoder>_len<max_length>_layer<k>_<weights>/    (see `store_folder`)
        tokens.npy     fp16 [T, D]  every stored caption's states, one caption after another
        hashes.npy     uint64 [N]   64-bit hash of each caption's UTF-8 bytes, sorted
        rows.npy       int64 [N, 2] (first row in tokens, token count) per caption, hash order
        text.npy       uint8 [B]    the captions' UTF-8 bytes, hash order, end to end
        text_ends.npy  int64 [N]    where each caption's bytes end in text.npy
        meta.json      what was encoded: encoder, weights fingerprint, layer, max_length, dim

A lookup hashes the caption, finds it with np.searchsorted and checks the stored bytes, so no
rank holds a dict of every caption and a hash collision cannot return another caption's
states. The folder appears by one rename when complete; a killed build resumes from
`<folder>.partial`. A run needing captions the store lacks rebuilds it, copying the states
it has. docs/text_store.md has the design.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from tti.infra.atomic_file import write_json
from tti.infra.build_progress import clear_progress, open_array, save_progress, swap_in
from tti.infra.cli import UserError
from tti.infra.run_lock import RunLock

FORMAT = 1
FILES = ("tokens.npy", "hashes.npy", "rows.npy", "text.npy", "text_ends.npy", "meta.json")
SAVE_EVERY_CHUNKS = 16  # a killed build loses at most this many chunks of work


class TextStoreError(UserError, ValueError):
    """A store folder that does not belong to the encoder asking for it, or states that fp16
    cannot hold; the message names the folder and what to do."""


def caption_hash(data: bytes) -> int:
    """64-bit hash of a caption's UTF-8 bytes (blake2b: stable across runs and machines)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _hashes(encoded: list[bytes]) -> np.ndarray:
    return np.fromiter((caption_hash(b) for b in encoded), dtype=np.uint64, count=len(encoded))


def encoder_identity(encoder) -> dict:
    """What the stored states depend on. Cheap: the weights fingerprint hashes only each
    weight's shape and end values (and the tokenizer's vocabulary)."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in encoder.model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        ends = torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + ends.tobytes())
    vocab = sorted(encoder.tokenizer.get_vocab().items())
    digest.update(json.dumps([type(encoder.tokenizer).__name__, vocab]).encode())
    return {"format": FORMAT, "encoder": encoder.name, "weights": digest.hexdigest(),
            "hidden_layer": encoder.hidden_layer, "max_length": encoder.max_length,
            "dim": encoder.dim}


def store_folder(cache_dir: str, identity: dict) -> str:
    """`<cache_dir>/text_<encoder>_len<max_length>_layer<k>_<weights fingerprint>`."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in identity["encoder"])
    safe = safe[-60:]  # a long local path keeps its informative end
    name = (f"text_{safe}_len{identity['max_length']}_layer{identity['hidden_layer']}_"
            f"{identity['weights'][:10]}")
    return os.path.join(cache_dir, name)


def is_built(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in FILES)


class TextStore:
    """Read-only view of a complete store folder; every array is memory-mapped."""

    def __init__(self, folder: str):
        self.folder = folder
        self.meta = json.loads(Path(folder, "meta.json").read_text(encoding="utf-8"))
        # Plain ndarray views of the maps: np.memmap indexes through slow Python-level code.
        load = lambda name: np.load(os.path.join(folder, name), mmap_mode="r").view(np.ndarray)
        self._tokens, self._hashes, self._rows = load("tokens.npy"), load("hashes.npy"), load("rows.npy")
        self._text, self._text_ends = load("text.npy"), load("text_ends.npy")

    def __len__(self) -> int:
        return len(self._hashes)

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def check_identity(self, identity: dict) -> None:
        """Raise TextStoreError unless this store holds states of the encoder `identity` describes."""
        theirs = {k: self.meta.get(k) for k in identity}
        if theirs != identity:
            differ = ", ".join(f"{k} {theirs[k]!r} (not {v!r})" for k, v in identity.items()
                               if theirs[k] != v)
            raise TextStoreError(f"{self.folder}: a text store of another encoder ({differ}); "
                                 f"delete the folder or point data.cache_dir elsewhere")

    def caption(self, row: int) -> str:
        return self._caption_bytes(row).decode("utf-8")

    def _caption_bytes(self, row: int) -> bytes:
        start = int(self._text_ends[row - 1]) if row else 0
        return self._text[start:int(self._text_ends[row])].tobytes()

    def find(self, captions: list[str]) -> np.ndarray:
        """int64 [len(captions)]: each caption's row, or -1 where the store lacks it."""
        encoded = [c.encode("utf-8") for c in captions]
        wanted = _hashes(encoded)
        positions = np.searchsorted(self._hashes, wanted)
        rows = np.full(len(captions), -1, dtype=np.int64)
        n = len(self._hashes)
        for i, (h, pos, data) in enumerate(zip(wanted, positions.tolist(), encoded)):
            while pos < n and self._hashes[pos] == h:  # equal hashes: compare the bytes
                if self._caption_bytes(pos) == data:
                    rows[i] = pos
                    break
                pos += 1
        return rows

    def states(self, row: int) -> np.ndarray:
        """fp16 [L, D], a view into the map: copy before writing."""
        start, length = (int(v) for v in self._rows[row])
        return self._tokens[start:start + length]


def build_store(encoder, captions, folder: str, chunk: int = 256, progress: bool = False) -> int:
    """Make `folder` a store of the states of every caption in `captions` and of "": those it
    holds are copied, the others encoded by the TextEncoder's `encode_live` in chunks sorted
    by length (little padding). Returns how many were encoded (0 if it held them all)."""
    identity = encoder_identity(encoder)
    parent, name = os.path.split(os.path.abspath(folder))
    # One builder at a time (two runs on a node, or nodes sharing a disk): the others wait.
    with RunLock(parent, f"{name}.lock").acquire(wait_s=math.inf):
        for stale in glob.glob(glob.escape(folder) + ".old-*"):  # a swap that was killed
            shutil.rmtree(stale, ignore_errors=True)
        base = TextStore(folder) if is_built(folder) else None
        if base is not None:
            base.check_identity(identity)
        distinct = sorted(set(captions) | {""}, key=lambda c: (len(c), c))
        new = distinct if base is None else [c for c, r in zip(distinct, base.find(distinct)) if r < 0]
        if not new:
            return 0
        partial = f"{folder}.partial"
        _write_partial(encoder, identity, base, new, partial, chunk, progress)
        del base  # its maps are closed before its folder is replaced
        swap_in(partial, folder)
    return len(new)


def _token_counts(encoder, captions: list[str], chunk: int = 4096) -> np.ndarray:
    """Tokens each caption gets from the encoder (truncated at max_length, specials included)."""
    counts = []
    for start in range(0, len(captions), chunk):
        ids = encoder.tokenizer(captions[start:start + chunk], truncation=True,
                                max_length=encoder.max_length)["input_ids"]
        counts += [len(x) for x in ids]
    return np.asarray(counts, dtype=np.int64)


def _write_partial(encoder, identity: dict, base: TextStore | None, new: list[str], partial: str,
                   chunk: int, progress: bool) -> None:
    """tokens.npy = the base store's states, then those of `new` in order, encoded chunk by
    chunk with progress saved as it goes; then the index."""
    from tqdm import tqdm

    counts = _token_counts(encoder, new)
    base_tokens = base.num_tokens if base is not None else 0
    starts = base_tokens + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    shape = (base_tokens + int(counts.sum()), identity["dim"])
    job = _job_id(identity, base, new, chunk)
    tokens, done = open_array(partial, job, "tokens.npy", shape)
    if done is None:
        for s in range(0, base_tokens, 1 << 20):  # copied, not encoded again
            end = min(s + (1 << 20), base_tokens)
            tokens[s:end] = base._tokens[s:end]
        done = 0
    bar = tqdm(total=len(new), initial=done, desc="text store: encoding captions", unit="caption",
               disable=not progress, dynamic_ncols=True)
    try:
        for index, start in enumerate(range(done, len(new), chunk)):
            batch = encoder.encode_live(new[start:start + chunk])
            states = batch.tokens.to(torch.float16).cpu().numpy()
            lengths = batch.mask.sum(1).tolist()
            for i, n in enumerate(lengths):
                if n != counts[start + i]:  # right padding and one tokenizer, so never
                    raise RuntimeError(f"caption {new[start + i]!r}: {n} states, {counts[start + i]} tokens")
                tokens[starts[start + i]:starts[start + i] + n] = states[i, :n]
            if not np.isfinite(states).all():
                raise TextStoreError(f"text encoder {encoder.name!r}: states of a caption in "
                                     f"{new[start:start + chunk][:3]}... overflow fp16; set "
                                     f"text.cache=false to run the encoder at every step")
            bar.update(len(lengths))
            done = start + len(lengths)
            if (index + 1) % SAVE_EVERY_CHUNKS == 0 or done == len(new):
                tokens.flush()
                save_progress(partial, job, done)
    finally:
        bar.close()
    del tokens
    _write_index(partial, identity, base, new, counts, starts, shape[0])


def _job_id(identity: dict, base: TextStore | None, new: list[str], chunk: int) -> str:
    """Names one build exactly: the encoder, the store it extends, the captions it adds and
    how they are chunked (a resumed build must batch them as the killed one did)."""
    key = json.dumps([identity, chunk], sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=16)
    if base is not None:
        digest.update(np.asarray(base._hashes).tobytes())
    for caption in new:
        digest.update(caption.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _write_index(partial: str, identity: dict, base: TextStore | None, new: list[str],
                 counts: np.ndarray, starts: np.ndarray, num_tokens: int) -> None:
    """hashes, rows and caption bytes of every stored caption (base ones first), hash order."""
    encoded = [base._caption_bytes(r) for r in range(len(base))] if base is not None else []
    encoded += [c.encode("utf-8") for c in new]
    rows = np.concatenate([np.asarray(base._rows) if base is not None else np.zeros((0, 2), np.int64),
                           np.stack([starts, counts], axis=1)]).astype(np.int64)
    hashes = _hashes(encoded)
    order = np.lexsort((np.arange(len(hashes)), hashes))  # by hash; ties keep their order
    text = b"".join(encoded[i] for i in order)
    ends = np.cumsum([len(encoded[i]) for i in order], dtype=np.int64)
    for name, array in (("hashes", hashes[order]), ("rows", rows[order]),
                        ("text", np.frombuffer(text, dtype=np.uint8)), ("text_ends", ends)):
        np.save(os.path.join(partial, f"{name}.npy"), array)
    meta = dict(identity, captions=len(hashes), tokens=num_tokens)
    write_json(os.path.join(partial, "meta.json"), meta)
    clear_progress(partial)
