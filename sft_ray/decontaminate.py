"""Decontamination: benchmark text kept out of prompts sent and rows trained on.

``decontaminate.against`` names benchmark sources. The driver reads them once and indexes them
once (:func:`build_index`) into an :class:`Index`: 64-bit hashes of every word n-gram of every
benchmark text, sorted, with the item each came from, and no benchmark text. The scan of the
input checks each prompt before anything is sent (:meth:`Index.check`); finalize checks each
rollout's prompt and reply in its worker processes, which load the index from one file
(:func:`load_index`).

Text is normalised the same way on both sides (:func:`canonical`): Unicode NFKC, case folded,
every punctuation, symbol, control and space character a word break, words joined by one
space. A *word* is a run of letters, digits and marks; in scripts written without spaces
(Han, Hiragana, Katakana, Bopomofo, Hangul, Thai, Lao, Khmer, Myanmar, Yi) each character is a
word of its own. A text matches a benchmark when it shares ``min_matches`` distinct n-grams
with it, or holds one of its short items (fewer than n words, at least ``min_words``) whole.

Hashing is vectorised with numpy over many texts at once: a polynomial hash of each n-gram's
bytes (``"w1 w2 ... wn"``) taken from prefix sums modulo 2**64, then mixed. Hand-written
because no maintained library offers hashed word n-gram lookup over numpy without a
tokenizer of its own (datatrove's and NeMo Curator's filters are whole pipelines).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import orjson

from sft_ray import tabular
from sft_ray.rows import InputError

# Scripts written without spaces between words: each character is a word there.
_NO_SPACE = ("\u0e00-\u0eff"  # Thai, Lao
             "\u1000-\u109f"  # Myanmar
             "\u1100-\u11ff"  # Hangul Jamo
             "\u1780-\u17ff"  # Khmer
             "\u2e80-\u2fdf"  # CJK radicals, Kangxi
             "\u3040-\u30ff"  # Hiragana, Katakana
             "\u3100-\u312f\u31a0-\u31bf"  # Bopomofo
             "\u3130-\u318f"  # Hangul compatibility Jamo
             "\u31f0-\u31ff"  # Katakana extension
             "\u3400-\u4dbf\u4e00-\u9fff"  # Han
             "\ua000-\ua4cf"  # Yi
             "\ua960-\ua97f\uac00-\ud7ff"  # Hangul
             "\uf900-\ufaff"  # Han compatibility
             "\U00020000-\U0003134f")  # Han extensions B-G
_SPLIT = re.compile(f"([{_NO_SPACE}])")
# ASCII fast path: letters lowered, digits kept, everything else a word break.
_ASCII = bytes((c + 32) if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122) else 32 for c in range(256))
_ASCII_NUL = bytes(10 if c == 0 else b for c, b in enumerate(_ASCII))  # NUL: a newline (texts joined by it)

_P = np.uint64(0x100000001B3)  # the hash's base (odd: invertible modulo 2**64)
_SEP = 32  # the byte between words; texts of a batch are joined by a newline
BATCH_BYTES = 1 << 20  # canonical bytes hashed at once (bounds the arrays of powers)
MAX_EXAMPLES = 5  # examples per benchmark in stats.json
DROP_REASON = "contaminated"  # finalize's drop reason for a row whose prompt or reply holds benchmark text


@functools.cache
def _breaks() -> re.Pattern[str]:
    """Every character that is not part of a word (categories P, S, Z, C): a class of ranges built
    once from the Unicode database this Python ships."""
    ranges, start = [], None
    for cp in range(0x110000):
        brk = unicodedata.category(chr(cp))[0] in "PSZC"
        if brk and start is None:
            start = cp
        elif not brk and start is not None:
            ranges.append((start, cp - 1))
            start = None
    if start is not None:
        ranges.append((start, 0x10FFFF))
    cls = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return re.compile(f"[{cls}]+")


def canonical(text: str) -> bytes:
    """``text`` normalised as every check sees it: its words, lower case (NFKC, case folded), joined
    by single spaces, as UTF-8."""
    if text.isascii():
        return b" ".join(text.encode().translate(_ASCII).split())
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _breaks().sub(" ", text)
    text = _SPLIT.sub(r" \1 ", text)
    return " ".join(text.split()).encode()


def words(text: str) -> list[str]:
    """The words of ``text`` after normalisation (what an n-gram counts)."""
    c = canonical(text)
    return c.decode().split(" ") if c else []


# -- hashing --------------------------------------------------------------------------------


class _Powers:
    """P**k and P**-k modulo 2**64 for k below a length, grown on demand."""

    def __init__(self) -> None:
        self.pow = np.ones(1, np.uint64)
        self.inv = np.ones(1, np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pow) < n:
            n = max(n, 2 * len(self.pow))
            inv_p = np.uint64(pow(int(_P), -1, 1 << 64))
            with np.errstate(over="ignore"):
                self.pow = np.concatenate(([np.uint64(1)], np.cumprod(np.full(n - 1, _P, np.uint64))))
                self.inv = np.concatenate(([np.uint64(1)], np.cumprod(np.full(n - 1, inv_p, np.uint64))))
        return self.pow[:n], self.inv[:n]


_POWERS = _Powers()


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every bit of the polynomial hash spread over the 64 (in place)."""
    t = np.empty_like(h)
    with np.errstate(over="ignore"):
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            np.right_shift(h, np.uint64(shift), out=t)
            h ^= t
            h *= np.uint64(factor)
        np.right_shift(h, np.uint64(31), out=t)
        h ^= t
    return h


@dataclass
class _Words:
    """The words of a batch of canonical texts joined by newlines."""

    start: np.ndarray  # int64: each word's first byte in ``buf``
    end: np.ndarray  # int64: the byte after it
    text: np.ndarray  # int64: which text of the batch it is in
    buf: bytes


@dataclass
class _Hashed:
    """The word n-grams of a batch: the hash of every run of n consecutive words of the joined
    batch (run ``j``: words ``j`` to ``j + n - 1``). A run that crosses from one text into the next
    is hashed too, which costs less than cutting it out of every length's arrays; :meth:`inside`
    tells the runs of one text, and is asked only of the few runs that match."""

    n: int
    hashes: np.ndarray  # uint64
    words: _Words

    def inside(self, j: np.ndarray) -> np.ndarray:
        """For runs ``j``: whether each lies within one text."""
        return self.words.text[j] == self.words.text[j + (self.n - 1)]

    def text_of(self, j: int) -> int:
        return int(self.words.text[j])

    def span(self, j: int) -> str:
        """Run ``j``'s text."""
        w = self.words
        return w.buf[int(w.start[j]):int(w.end[j + self.n - 1])].decode("utf-8", "replace")


def _ascii_joined(texts: list[str]) -> bytes | None:
    """``b"\\n".join(canonical(t) for t in texts)`` made at once, for texts all ASCII, with no NUL, at
    most :data:`BATCH_BYTES` together (None otherwise): one encode and one translation for them all,
    runs of word breaks collapsed with numpy, where :func:`canonical` splits and joins each text."""
    joined = "\0".join(texts)
    if len(joined) > BATCH_BYTES or not joined.isascii() or joined.count("\0") != len(texts) - 1:
        return None
    a = np.frombuffer(joined.encode().translate(_ASCII_NUL), np.uint8)
    if not len(a):
        return b""
    word = a > _SEP
    # A break is kept (as one space) when it follows a word character: the first of each run.
    keep = word.copy()
    keep[1:] |= (a[1:] == _SEP) & word[:-1]
    keep |= a == 10  # the texts' separators
    b = a[keep]
    # A space then kept that ends its text (before a separator or at the end) goes too.
    ends = np.ones(len(b), np.bool_)
    ends[:-1] = b[1:] == 10
    drop = (b == _SEP) & ends
    return (b[~drop] if drop.any() else b).tobytes()


def _hash_batch(canons: list[bytes], lengths: Iterable[int]) -> dict[int, _Hashed]:
    """For each n in ``lengths``, every run of n consecutive words within one text of ``canons``
    (non-empty canonical texts, joined by newlines, at most :data:`BATCH_BYTES` together but for a
    single one), hashed."""
    return _hash_joined(b"\n".join(canons), lengths)


def _hash_joined(buf: bytes, lengths: Iterable[int]) -> dict[int, _Hashed]:
    """:func:`_hash_batch` of canonical texts already joined by newlines (an empty one has no n-gram)."""
    a = np.frombuffer(buf, np.uint8)
    size = len(a)
    pw, inv = _POWERS.get(size + 1)
    with np.errstate(over="ignore"):
        prefix = np.empty(size + 1, np.uint64)
        prefix[0] = 0
        np.cumsum(a.astype(np.uint64) * pw[:size], out=prefix[1:])
    gaps = np.flatnonzero(a <= _SEP)  # spaces and newlines: one between each two words
    starts = np.concatenate(([0], gaps + 1))
    ends = np.concatenate((gaps, [size]))
    # A word's text: newlines before it.
    words = _Words(starts, ends, np.concatenate(([0], np.cumsum(a[gaps] == 10))), buf)
    # Each word's prefix sums and inverse power, gathered once: each length's hashes are then slices.
    at_start, inv_start, at_end = prefix[starts], inv[starts], prefix[ends]
    out = {}
    for n in lengths:
        m = max(0, len(starts) - n + 1)
        with np.errstate(over="ignore"):
            h = np.subtract(at_end[n - 1:n - 1 + m], at_start[:m])
            h *= inv_start[:m]
        out[n] = _Hashed(n, _mix(h), words)
    return out


def _batches(canons: list[bytes], n: int) -> Iterator[tuple[list[int], list[bytes]]]:
    """(indices, texts) in groups of about :data:`BATCH_BYTES`; a longer text is cut into windows of
    words overlapping by n - 1 words (so no n-gram is lost), each a text of its own index."""
    group: list[int] = []
    texts: list[bytes] = []
    size = 0
    for i, c in enumerate(canons):
        if not c:
            continue
        if len(c) > BATCH_BYTES:
            ws = c.split(b" ")
            step = max(1, BATCH_BYTES // 16)  # words per window (a window well under BATCH_BYTES on average)
            for lo in range(0, max(1, len(ws) - n + 1), step):
                yield [i], [b" ".join(ws[lo:lo + step + n - 1])]
            continue
        if size + len(c) > BATCH_BYTES and group:
            yield group, texts
            group, texts, size = [], [], 0
        group.append(i)
        texts.append(c)
        size += len(c) + 1
    if group:
        yield group, texts


# -- the index ------------------------------------------------------------------------------


@dataclass
class Benchmark:
    """One benchmark as indexed: its name, where it came from and what was found in it."""

    name: str
    source: str
    items: int = 0  # rows with at least one text indexed
    rows: int = 0  # rows read
    too_short: int = 0  # texts with fewer than min_words words (not indexed)
    digest: str = ""  # of the text read, row by row, normalised (what the run fingerprint holds)


@dataclass
class Index:
    """Every benchmark n-gram as a sorted array of 64-bit hashes, with the item (a global row
    number) of each; short items (fewer than n words) as whole phrases, per length. Items of
    benchmark ``b`` are numbered from ``first[b]``."""

    ngram: int
    min_matches: int
    benchmarks: list[Benchmark]
    first: np.ndarray  # int64, per benchmark: its first item number
    hashes: np.ndarray  # uint64, sorted, unique
    owners: np.ndarray  # uint32: the item of each hash (the first that has it)
    phrases: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # length -> (hashes, owners)
    _filter: dict[int, tuple[np.ndarray, np.uint64]] | None = field(default=None, repr=False)

    @property
    def digests(self) -> dict[str, str]:
        """Per benchmark (by name), a digest of its text as read: what a run's fingerprint holds, so
        that a benchmark edited between a run and its resume is a change the resume names."""
        return {b.name: b.digest for b in self.benchmarks}

    @functools.cached_property
    def digest(self) -> str:
        """A digest of the index itself (every hash and its item, n, min_matches): two indexes with the
        same digest give every text the same answer."""
        h = hashlib.blake2b(orjson.dumps([self.ngram, self.min_matches, sorted(self.phrases)]), digest_size=16)
        for a in (self.first, self.hashes, self.owners, *(x for pair in self.phrases.values() for x in pair)):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        """The size of what is shipped to workers."""
        return int(self.hashes.nbytes + self.owners.nbytes + self.first.nbytes
                   + sum(h.nbytes + o.nbytes for h, o in self.phrases.values()))

    def owner(self, item: int) -> tuple[int, int]:
        """(benchmark, row within it) of an item number."""
        b = int(np.searchsorted(self.first, item, side="right")) - 1
        return b, int(item - self.first[b])

    def _filters(self) -> dict[int, tuple[np.ndarray, np.uint64]]:
        """Per n-gram length, a table of bits indexed by a hash's top bits (about 32 slots per hash,
        one byte per eight): one memory access rules out almost every n-gram of a text, where a
        binary search of the sorted hashes takes twenty. Packed as bits so that it stays in the
        processor's cache (a byte per slot measured 2-3x slower). Built where it is used, never shipped."""
        if self._filter is None:
            self._filter = {}
            for n, table in [(self.ngram, self.hashes), *((k, h) for k, (h, _) in self.phrases.items())]:
                bits = int(min(max(10, (max(1, len(table)) * 32 - 1).bit_length()), 28))
                shift = np.uint64(64 - bits)
                slots = table >> shift
                packed = np.zeros(1 << (bits - 3), np.uint8)
                np.bitwise_or.at(packed, slots >> np.uint64(3), np.left_shift(1, slots & np.uint64(7)).astype(np.uint8))
                self._filter[n] = (packed, shift)
        return self._filter

    def check(self, texts: list[str]) -> list["Hit | None"]:
        """For each text, its first match (or None)."""
        joined = _ascii_joined(texts)
        if joined is None:
            return self.check_canonical([canonical(t) for t in texts])
        out: list[Hit | None] = [None] * len(texts)
        self._match(range(len(texts)), _hash_joined(joined, [self.ngram, *self.phrases]), out)
        return out

    def check_canonical(self, canons: list[bytes]) -> list["Hit | None"]:
        out: list[Hit | None] = [None] * len(canons)
        for group, texts in _batches(canons, self.ngram):
            self._match(group, _hash_batch(texts, [self.ngram, *self.phrases]), out)
        return out

    def _match(self, group: Sequence[int], hashed: dict[int, _Hashed], out: list["Hit | None"]) -> None:
        """Record in ``out`` (at ``group[text]``) each hashed text's first match."""
        need = self.min_matches
        filters = self._filters()
        for n in hashed:
            table, owners = (self.hashes, self.owners) if n == self.ngram else self.phrases[n]
            hg = hashed[n]
            if not len(table) or not len(hg.hashes):
                continue
            packed, shift = filters[n]
            slots = hg.hashes >> shift
            maybe = np.flatnonzero((packed[slots >> np.uint64(3)] >> (slots & np.uint64(7)).astype(np.uint8)) & 1)
            if not len(maybe):
                continue
            pos = np.searchsorted(table, hg.hashes[maybe])
            pos[pos == len(table)] = 0
            hit = table[pos] == hg.hashes[maybe]
            found, pos = maybe[hit], pos[hit]
            inside = hg.inside(found)
            counts: dict[tuple[int, int], set[int]] = {}
            for j, p in zip(found[inside].tolist(), pos[inside].tolist()):
                i = group[hg.text_of(j)]
                if out[i] is not None:
                    continue
                b, row = self.owner(int(owners[p]))
                if n == self.ngram and need > 1:
                    seen = counts.setdefault((i, b), set())
                    seen.add(int(hg.hashes[j]))
                    if len(seen) < need:
                        continue
                out[i] = Hit(b, self.benchmarks[b].name, row, hg.span(j))

    def save(self, path: str) -> None:
        arrays = {"hashes": self.hashes, "owners": self.owners, "first": self.first}
        for n, (h, o) in self.phrases.items():
            arrays[f"ph{n}"], arrays[f"po{n}"] = h, o
        meta = orjson.dumps({"ngram": self.ngram, "min_matches": self.min_matches,
                             "benchmarks": [b.__dict__ for b in self.benchmarks]})
        np.savez(path, meta=np.frombuffer(meta, np.uint8), **arrays)

    def summary(self) -> dict[str, Any]:
        """What stats.json says about the index."""
        return {"ngram": self.ngram, "min_matches": self.min_matches, "index_bytes": self.nbytes,
                "benchmarks": {b.name: {"source": b.source, "items": b.items, "texts_too_short": b.too_short}
                               for b in self.benchmarks}}


@functools.lru_cache(maxsize=2)
def load_index(path: str) -> Index:
    """An index :meth:`Index.save` wrote (once per process)."""
    with np.load(path) as z:
        meta = orjson.loads(z["meta"].tobytes())
        phrases = {int(k[2:]): (z[k], z["po" + k[2:]]) for k in z.files if k.startswith("ph")}
        return Index(meta["ngram"], meta["min_matches"], [Benchmark(**b) for b in meta["benchmarks"]],
                     z["first"], z["hashes"], z["owners"], phrases)


@dataclass
class Hit:
    benchmark: int
    name: str
    item: int  # the row of the benchmark (0-based, in reading order)
    text: str  # the matched words, normalised

    def as_json(self) -> dict[str, Any]:
        return {"benchmark": self.name, "benchmark_row": self.item, "matched": self.text}


# -- reading benchmarks ---------------------------------------------------------------------


class BenchmarkError(ValueError):
    """A benchmark source that cannot be used, named in the message."""


@dataclass
class Source:
    path: str
    name: str
    fields: list[str] | None  # None: every string column


def sources(against: list[Any]) -> list[Source]:
    """``decontaminate.against`` as sources with their names (a name given twice is refused)."""
    out = []
    for entry in against:
        if isinstance(entry, str):
            path, name, fields = entry, None, None
        else:
            path, name, fields = entry.path, entry.name, entry.fields
        if not name:
            base = path.rstrip("/").rsplit("/", 1)[-1]
            name = re.sub(r"(\.jsonl|\.json|\.parquet|\.arrow)?(\.gz)?$", "", base) or base
            name = re.sub(r"[*?\[\]]", "", name) or path
        out.append(Source(path, name, list(fields) if fields is not None else None))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchmarkError(f"decontaminate.against: two sources are named {dup[0]!r}; give each a `name`")
    return out


def _texts(row: dict[str, Any], fields: list[str] | None, where: str, seen: set[str]) -> list[str]:
    """The benchmark text of one row: the named fields (each a string; a row may lack one, as a null
    Parquet cell is an absent key), or every string value. ``seen``: the named fields found."""
    if fields is None:
        return [v for v in row.values() if isinstance(v, str)]
    out = []
    for f in fields:
        v = row.get(f)
        if v is None:
            continue
        seen.add(f)
        if not isinstance(v, str):
            raise BenchmarkError(f"{where}: field {f!r} is {type(v).__name__}, not a string")
        out.append(v)
    return out


def _rows(src: Source) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of every row of a benchmark source (JSONL, Parquet, save_to_disk folders: the
    one reader of tabular files, :mod:`sft_ray.tabular`; only the ``fields`` columns are read)."""
    try:
        files = tabular.list_files(src.path, what="file")
    except FileNotFoundError as e:
        raise BenchmarkError(f"benchmark {src.name!r}: {e}") from None
    except InputError as e:
        raise BenchmarkError(f"benchmark {src.name!r}: {e}") from None
    try:
        for rec in tabular.iter_records(src.path, src.fields, files):
            yield f"{rec.file}:{rec.row}", rec.value
    except InputError as e:
        raise BenchmarkError(f"benchmark {src.name!r}: {e}") from None


def build_index(against: list[Any], ngram: int = 13, min_matches: int = 1, min_words: int = 8) -> Index:
    """Read every source once and index it. A source that does not exist, has no rows, or has no
    text to index (no string column, or every text shorter than ``min_words`` words) is refused
    with :class:`BenchmarkError` naming it."""
    benches: list[Benchmark] = []
    firsts: list[int] = []
    grams: list[np.ndarray] = []
    gram_owner: list[np.ndarray] = []
    phrase: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    item = 0
    for src in sources(against):
        bench = Benchmark(src.name, src.path)
        firsts.append(item)
        strings = 0
        canons: list[bytes] = []
        owners: list[int] = []

        seen: set[str] = set()
        digest = hashlib.blake2b(digest_size=16)
        for where, row in _rows(src):
            bench.rows += 1
            texts = _texts(row, src.fields, f"benchmark {src.name!r}: {where}", seen)
            indexed = False
            digest.update(b"\x1e")  # a row (its number is an item's, so rows without text count)
            for t in texts:
                strings += 1
                c = canonical(t)
                digest.update(c + b"\x1f")
                if not c or c.count(b" ") + 1 < min(min_words, ngram):
                    bench.too_short += 1
                    continue
                canons.append(c)
                owners.append(item)
                indexed = True
            if indexed:
                bench.items += 1
            item += 1
            if len(canons) >= 4096:
                _index_texts(canons, owners, ngram, grams, gram_owner, phrase)
        _index_texts(canons, owners, ngram, grams, gram_owner, phrase)
        if bench.rows == 0:
            raise BenchmarkError(f"benchmark {src.name!r}: {src.path} has no rows")
        missing = [f for f in src.fields or () if f not in seen]
        if missing:
            raise BenchmarkError(f"benchmark {src.name!r}: {src.path}: no row has field(s) {', '.join(map(repr, missing))} "
                                 "(decontaminate.against fields)")
        if strings == 0:
            raise BenchmarkError(f"benchmark {src.name!r}: {src.path} has no string field"
                                 + (f" among {src.fields}" if src.fields else "")
                                 + " (give `fields`: the columns that hold the benchmark text)")
        if bench.items == 0:
            raise BenchmarkError(f"benchmark {src.name!r}: {src.path}: every text is shorter than {min_words} words "
                                 "(decontaminate.min_words); nothing to index")
        bench.digest = digest.hexdigest()
        benches.append(bench)
    hashes, owner = _unique(grams, gram_owner)
    phrases = {n: _unique(*phrase[n]) for n in sorted(phrase)}
    return Index(ngram, min_matches, benches, np.asarray(firsts, np.int64), hashes, owner, phrases)


def _index_texts(canons: list[bytes], owners: list[int], ngram: int, grams: list[np.ndarray],
                 gram_owner: list[np.ndarray], phrase: dict[int, tuple[list[np.ndarray], list[np.ndarray]]]) -> None:
    """Hash a batch of canonical benchmark texts (each of item ``owners[i]``) into ``grams`` (every
    n-gram) and ``phrase`` (a text shorter than n words: its whole phrase, by length); empties the batch."""
    for group, texts in _batches(canons, ngram):
        lens = {ngram, *{min(t.count(b" ") + 1, ngram) for t in texts}}
        hashed = _hash_batch(texts, sorted(lens))
        owner_of = np.asarray([owners[g] for g in group], np.uint32)
        for n, hg in hashed.items():
            runs = np.flatnonzero(hg.inside(np.arange(len(hg.hashes))))
            if not len(runs):
                continue
            hashes, text = hg.hashes[runs], hg.words.text[runs]
            if n == ngram:
                grams.append(hashes)
                gram_owner.append(owner_of[text])
                continue
            # The phrase of a text of exactly n words: its one n-gram (other texts' n-grams are not indexed).
            whole = np.asarray([texts[t].count(b" ") + 1 == n for t in text.tolist()], bool)
            if whole.any():
                hs, os_ = phrase.setdefault(n, ([], []))
                hs.append(hashes[whole])
                os_.append(owner_of[text[whole]])
    canons.clear()
    owners.clear()


def _unique(hs: list[np.ndarray], os_: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not hs:
        return np.empty(0, np.uint64), np.empty(0, np.uint32)
    h, o = np.concatenate(hs), np.concatenate(os_)
    uniq, first = np.unique(h, return_index=True)
    return uniq, o[first]


# -- what a run checks ----------------------------------------------------------------------


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The text of a prompt's messages (string contents, and the text parts of list contents)."""
    parts = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts += [p.get("text") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(parts)


@dataclass
class Matches:
    """Per benchmark: prompts held back, rows dropped, a few examples (merged across workers in order)."""

    prompts: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, kind: str, hit: Hit, example: dict[str, Any]) -> None:
        counts = self.prompts if kind == "prompt" else self.rows
        counts[hit.name] = counts.get(hit.name, 0) + 1
        ex = self.examples.setdefault(hit.name, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append({**example, "matched": hit.text[:200]})

    def merge(self, other: "Matches") -> None:
        for mine, theirs in ((self.prompts, other.prompts), (self.rows, other.rows)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for k, ex in other.examples.items():
            have = self.examples.setdefault(k, [])
            have += ex[:MAX_EXAMPLES - len(have)]


class RowCheck:
    """Finalize's check of rollouts (in a worker): each prompt once per prompt id, and each reply,
    checked many rows at a time (hashing one text at a time would cost its numpy calls per row)."""

    CHUNK = 1024  # rows parsed and checked together

    def __init__(self, index_path: str, check_prompts: bool = True) -> None:
        self.index = load_index(index_path)
        self.check_prompts = check_prompts  # False: the scan checked them (:func:`prompts_checked`)
        self.prompts: dict[str, Hit | None] = {}
        self.tally = Matches()

    def rows(self, lines: Iterable[bytes], prompt_of: Callable[[dict[str, Any]], str],
             reply_of: Callable[[dict[str, Any]], str]) -> Iterator[tuple[bytes, Any, Hit | None, str | None]]:
        """``(line, row, hit, reply)`` for each line: the row parsed (None when it is not JSON) and, for a
        row with a reward and no error, its first match (prompt first, then reply) or None, and
        ``reply_of(row)`` (None for the rows not checked)."""
        chunk: list[bytes] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) >= self.CHUNK:
                yield from self._chunk(chunk, prompt_of, reply_of)
                chunk = []
        if chunk:
            yield from self._chunk(chunk, prompt_of, reply_of)

    def _chunk(self, lines: list[bytes], prompt_of: Callable[[dict[str, Any]], str],
               reply_of: Callable[[dict[str, Any]], str]) -> Iterator[tuple[bytes, Any, Hit | None, str | None]]:
        # Each line is parsed twice: once for its texts, checked together, and again as it is handed
        # on. Holding the chunk's parsed rows until their check was done pushed them out of the
        # processor's cache before the scan used them, which cost more than the second parse
        # (_scan of 100,000 rows: 5.0 s against 5.5 s at best over ten rounds, 4.1 s without a check).
        loads, check_prompts = orjson.loads, self.check_prompts
        want: list[int] = []
        ids: list[str] = []
        texts: list[str] = []
        new_prompts: dict[str, str] = {}
        for i, line in enumerate(lines):
            try:
                r = loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(r, dict) or r.get("error") or r.get("reward") is None:
                continue
            want.append(i)
            texts.append(reply_of(r))
            if check_prompts:
                rid = str(r.get("id"))
                ids.append(rid)
                if rid not in self.prompts and rid not in new_prompts:
                    new_prompts[rid] = prompt_of(r)
        if new_prompts:
            for rid, hit in zip(new_prompts, self.index.check(list(new_prompts.values()))):
                self.prompts[rid] = hit
        hits: list[Hit | None] = [None] * len(lines)
        replies: list[str | None] = [None] * len(lines)
        for n, (i, text, reply_hit) in enumerate(zip(want, texts, self.index.check(texts))):
            hits[i] = (self.prompts[ids[n]] if check_prompts else None) or reply_hit
            replies[i] = text
        for line, hit, text in zip(lines, hits, replies):
            try:
                yield line, loads(line), hit, text
            except orjson.JSONDecodeError:
                yield line, None, None, None

    def count(self, hit: Hit, rid: str, sample_index: int) -> None:
        """A row dropped for ``hit``."""
        self.tally.add("row", hit, {"id": rid, "sample_index": sample_index})


def write_index(index: Index, folder: str) -> str:
    path = os.path.join(folder, "decontaminate.npz")
    index.save(path)
    return path


def held_back_record(index: Index, contaminated: list[dict[str, Any]]) -> dict[str, Any]:
    """What run.json keeps of the scan's check: the index's summary, and per benchmark the prompts
    held back with a few examples."""
    tally = Matches()
    names = {b.name: i for i, b in enumerate(index.benchmarks)}
    for c in contaminated:
        hit = Hit(names.get(c["benchmark"], -1), c["benchmark"], c["benchmark_row"], c["matched"])
        tally.add("prompt", hit, {"id": c["id"], "input_line": c["input_line"], "benchmark_row": c["benchmark_row"]})
    return {**index.summary(), "index_digest": index.digest, "prompts_held_back": len(contaminated),
            "prompts": tally.prompts, "examples": tally.examples}


def prompts_checked(index: Index, held: dict[str, Any] | None) -> bool:
    """Whether the run's scan checked every prompt against this very index (``held``: its record in
    run.json, :func:`held_back_record`): then finalize need not check them again (a prompt that
    matched was never sent, so no rollout has it), only the replies."""
    return bool(held) and held.get("index_digest") == index.digest  # type: ignore[union-attr]


def decontamination_stats(index: Index, held: dict[str, Any] | None, rows: Matches | None) -> dict[str, Any]:
    """stats.json's ``decontamination``: per benchmark (by name) its items indexed, the prompts the
    run's scan held back (from run.json, when it checked against that benchmark), the rows finalize
    dropped, and a few examples of each."""
    out = index.summary()
    held = held or {}
    rows = rows or Matches()
    for name, b in out["benchmarks"].items():
        b["prompts_matched"] = int((held.get("prompts") or {}).get(name, 0))
        b["rows_dropped"] = int(rows.rows.get(name, 0))
        b["examples"] = {"prompts": (held.get("examples") or {}).get(name, [])[:MAX_EXAMPLES],
                         "rows": rows.examples.get(name, [])[:MAX_EXAMPLES]}
    out["prompts_matched"] = sum(b["prompts_matched"] for b in out["benchmarks"].values())
    out["rows_dropped"] = sum(b["rows_dropped"] for b in out["benchmarks"].values())
    return out


def report_lines(stats: dict[str, Any]) -> list[str]:
    """The text report's lines on decontamination (none when it was off)."""
    d = stats.get("decontamination")
    if not d:
        return []
    lines = [f"decontamination: {len(d['benchmarks'])} benchmark(s), {d['ngram']}-grams, min_matches "
             f"{d['min_matches']}, index {d['index_bytes'] / 1e6:.1f} MB: {d['prompts_matched']} prompt(s) held back "
             f"(never sent), {d['rows_dropped']} row(s) dropped"]
    for name, b in d["benchmarks"].items():
        lines.append(f"  {name}: {b['items']} items indexed, {b['prompts_matched']} prompts matched, "
                     f"{b['rows_dropped']} rows dropped"
                     + (f", {b['texts_too_short']} texts too short to index" if b.get("texts_too_short") else ""))
    return lines


def card_section(stats: dict[str, Any]) -> str:
    """The dataset card's decontamination section (Markdown; empty when it was off)."""
    d = stats.get("decontamination")
    if not d:
        return ""
    rows = "\n".join(f"| {name} | {b['items']} | {b['prompts_matched']} | {b['rows_dropped']} |"
                     for name, b in d["benchmarks"].items())
    return ("## Decontamination\n\n"
            f"Checked against {len(d['benchmarks'])} benchmark(s) with word {d['ngram']}-grams (NFKC, case folded, "
            f"punctuation removed; {d['min_matches']} shared n-gram(s) make a match). Prompts that matched were never "
            "sent; rows whose prompt or reply matched were dropped.\n\n"
            "| benchmark | items indexed | prompts held back | rows dropped |\n|---|---|---|---|\n" + rows + "\n")
