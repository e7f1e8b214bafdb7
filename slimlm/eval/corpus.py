"""A built-in English corpus that needs no download: docstrings of the Python standard library.

Every Python install carries its standard library's docstrings, so a perplexity number on them can be reproduced
anywhere, offline, without shipping or fetching a data set. The corpus is assembled like this:

  - Modules: the fixed, sorted list STDLIB_MODULES (pure-Python or always-built modules that exist on 3.11+;
    nothing platform-specific, nothing that needs an optional system library such as sqlite3 or tkinter).
  - Documents: for each module in that order, the module's own docstring, then, sorted by name, the docstrings of
    its public classes and functions that are defined in it (`obj.__module__` is the module), and of their public
    methods, properties and `__init__`. Only an object's own `__doc__` is read (`inspect.getdoc` would repeat a
    base class's docstring for every subclass).
  - Prose only: each docstring is `inspect.cleandoc`'ed and cut into paragraphs at blank lines; paragraphs that are
    doctests (`>>>`), code or tables (fewer than MIN_LETTER_RATIO letters among non-space characters, or under
    MIN_PARAGRAPH_WORDS words) are dropped; whitespace inside a paragraph is collapsed to single spaces. A document
    keeps its paragraphs joined by one newline and is kept when it has at least MIN_DOC_CHARS characters. Exact
    duplicates are kept once (the first in the order above).
  - Splits: a document goes to `heldout` when sha256(SPLIT_SALT + text) read as an integer is divisible by
    HELDOUT_EVERY (so about 1 in 4 documents), else to `calibration`. The rule looks at the text only, so a
    document stays in its split across Python versions as long as its text is unchanged, and calibration
    (quantization calibration or training) never sees held-out text. Documents of a split are joined by a blank
    line, in corpus order.

Content and order are fixed for a given CPython minor version (docstrings change between versions, so compare
perplexities measured on the same one; `corpus_info()` gives the version and a sha256 of each split). On CPython
3.11.7 the corpus holds 772 documents and 443k characters: 582 documents (329k characters, 76k SmolLM2 tokens)
for calibration and 190 held out (115k characters, 26.5k SmolLM2 tokens). It is English technical prose, not web
text: absolute perplexities are not comparable with WikiText-2 numbers, only with each other.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path

from slimlm.errors import InputError

STDLIB_MODULES = tuple(
    sorted(
        """
    abc argparse ast asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams asyncio.tasks
    base64 bisect calendar cmd codecs collections collections.abc concurrent.futures configparser contextlib copy
    csv dataclasses datetime difflib dis doctest email.message email.parser email.utils enum fileinput fnmatch
    fractions ftplib functools getopt gettext glob graphlib gzip heapq hmac html.parser http.client http.cookies
    http.server imaplib inspect io ipaddress itertools json json.decoder json.encoder locale logging
    logging.handlers mailbox mimetypes numbers operator optparse pathlib pickle pkgutil pprint queue random re
    reprlib sched secrets selectors shelve shlex shutil smtplib socketserver statistics string struct subprocess
    tarfile tempfile textwrap threading timeit tokenize trace traceback types typing unittest.case unittest.mock
    urllib.parse urllib.request uuid warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile zipimport
""".split()
    )
)
SPLITS = ("calibration", "heldout")
SPLIT_SALT = "slimlm-eval-corpus-v1\0"
HELDOUT_EVERY = 4
MIN_DOC_CHARS = 200
MIN_PARAGRAPH_WORDS = 4
MIN_LETTER_RATIO = 0.75


def _own_doc(obj: object) -> str | None:
    """obj's own docstring (not inherited), or None."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) and doc.strip() else None


def _module_docs(name: str) -> list[str]:
    """Raw docstrings of one module in corpus order: the module, then its classes/functions (and their members)."""
    module = importlib.import_module(name)
    docs = [_own_doc(module)]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        docs.append(_own_doc(obj))
        if inspect.isclass(obj):
            for member, value in sorted(vars(obj).items()):
                if member.startswith("_") and member != "__init__":
                    continue
                if isinstance(value, (staticmethod, classmethod, property)) or inspect.isfunction(value):
                    docs.append(_own_doc(value))
    return [d for d in docs if d]


def _is_prose(paragraph: str) -> bool:
    """Whether a docstring paragraph reads as English prose (not a doctest, code block or table)."""
    if ">>>" in paragraph:
        return False
    chars = [c for c in paragraph if not c.isspace()]
    letters = sum(c.isalpha() for c in chars)
    return len(paragraph.split()) >= MIN_PARAGRAPH_WORDS and letters >= MIN_LETTER_RATIO * max(len(chars), 1)


def clean_docstring(doc: str) -> str:
    """The prose paragraphs of a docstring, whitespace collapsed, one paragraph per line ('' if none)."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(doc))
    return "\n".join(" ".join(p.split()) for p in paragraphs if _is_prose(p))


def split_of(document: str) -> str:
    """'heldout' or 'calibration': a fixed hash of the document's text decides."""
    digest = hashlib.sha256((SPLIT_SALT + document).encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest, "big") % HELDOUT_EVERY == 0 else "calibration"


@functools.lru_cache(maxsize=1)
def _build() -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """({split: documents}, modules that could not be imported); computed once per process."""
    if sys.flags.optimize >= 2:
        raise RuntimeError(
            "Python runs with -OO, which strips docstrings: the built-in corpus is empty; "
            "run without -OO or pass a text file"
        )
    seen: set[str] = set()
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and attributes (typing.io, ...) warn on access
        for name in STDLIB_MODULES:
            try:
                raw = _module_docs(name)
            except ImportError:
                missing.append(name)  # reported by corpus_info(); changes the corpus, so the sha256 shows it
                continue
            for doc in raw:
                text = clean_docstring(doc)
                if len(text) >= MIN_DOC_CHARS and text not in seen:
                    seen.add(text)
                    splits[split_of(text)].append(text)
    return {s: tuple(d) for s, d in splits.items()}, tuple(missing)


def builtin_documents(split: str) -> list[str]:
    """The documents (cleaned docstrings) of one split, in corpus order."""
    if split not in SPLITS:
        raise InputError(f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")
    return list(_build()[0][split])


def builtin_corpus(split: str) -> str:
    """The text of one split ('calibration' or 'heldout'): its documents joined by a blank line."""
    return "\n\n".join(builtin_documents(split))


def corpus_info() -> dict:
    """Python version, module count, and per split: documents, characters and the sha256 of the text."""
    splits, missing = _build()
    info = {
        "source": "Python standard library docstrings",
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "python_full": sys.version.split()[0],
        "modules": len(STDLIB_MODULES) - len(missing),
        "missing_modules": list(missing),
        "rule": f"heldout if sha256(salt + text) % {HELDOUT_EVERY} == 0",
    }
    for split in SPLITS:
        text = builtin_corpus(split)
        info[split] = {
            "documents": len(splits[split]),
            "characters": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }
    return info


def calibration_ids(tokenizer, path: str | None, samples: int, seq_len: int):
    """[samples, seq_len] token ids: evenly spaced windows of the calibration text (built-in split by default)."""
    import torch  # here, so reading the corpus needs no torch

    if samples < 1 or seq_len < 2:
        raise InputError(f"--calib-samples must be >= 1 and --calib-seq-len >= 2, got {samples}, {seq_len}")
    text = builtin_corpus("calibration") if path is None else Path(path).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < samples * seq_len:
        raise InputError(
            f"the calibration text has {len(ids)} tokens; {samples} x {seq_len} are needed: use fewer "
            "--calib-samples, a shorter --calib-seq-len, or a longer --calib-file"
        )
    starts = torch.linspace(0, len(ids) - seq_len, samples).long()
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
