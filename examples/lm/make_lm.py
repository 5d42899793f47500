"""A word bigram language model (ARPA) and decoding lexicons for ``siamctc-decode --lm``, from label files.

    python examples/lm/make_lm.py --text manifests/train.wrd --words manifests/*.wrd \
        --pronunciations /usr/share/pocketsphinx/model/en-us/cmudict-en-us.dict --out lm

writes ``lm/lm.arpa`` (a bigram model of the ``--text`` sentences: absolute discounting with
back-off to add-one unigrams over the whole lexicon, so that every lexicon word has a probability),
``lm/lexicon.phn.txt`` (``WORD PHONES``: the dictionary's first pronunciation without stress
digits, as ``siamctc-labels`` writes ``.phn``) and ``lm/lexicon.ltr.txt`` (``WORD LETTERS``, for
``.ltr`` models; ``siamctc-decode`` adds the ``|`` boundary). The lexicons hold the words of the
``--words`` files that the dictionary knows. For LibriSpeech use its published 4-gram and lexicon
instead; this is for corpora that have none, such as the built-in one.
"""

import argparse
import collections
import math
import os
import pathlib
import re
import sys
from typing import Dict, Iterable, List, Sequence, Tuple

DISCOUNT = 0.5


def bigram_arpa(sentences: Iterable[Sequence[str]], vocabulary: Iterable[str], discount: float = DISCOUNT) -> str:
    """ARPA text of a back-off bigram model.

    p(w | v) = (c(v, w) - D) / c(v) for bigrams seen in the sentences, else bow(v) p(w), where the
    unigram p(w) = (c(w) + 1) / (N + |V|) over V = vocabulary + sentence words + </s> + <unk>, and
    bow(v) hands the discounted mass to the unseen successors, so every context sums to one.
    """
    unigrams, bigrams, contexts = collections.Counter(), collections.Counter(), collections.Counter()
    for words in sentences:
        tokens = ["<s>", *words, "</s>"]
        unigrams.update(tokens[1:])
        for v, w in zip(tokens, tokens[1:]):
            bigrams[v, w] += 1
            contexts[v] += 1
    vocab = sorted(set(vocabulary) | set(unigrams) | {"</s>", "<unk>"})
    total = sum(unigrams.values())
    p_uni = {w: (unigrams[w] + 1) / (total + len(vocab)) for w in vocab}
    successors: Dict[str, List[Tuple[str, float]]] = collections.defaultdict(list)
    for (v, w), count in sorted(bigrams.items()):
        successors[v].append((w, (count - discount) / contexts[v]))
    backoff = {}
    for v, seen in successors.items():
        left = 1.0 - sum(p for _, p in seen)
        backoff[v] = left / (1.0 - sum(p_uni[w] for w, _ in seen))
    lines = ["\\data\\", f"ngram 1={len(vocab) + 1}", f"ngram 2={len(bigrams)}", "", "\\1-grams:"]
    lines.append(f"-99\t<s>\t{math.log10(backoff.get('<s>', 1.0)):.6f}")
    for w in vocab:
        entry = f"{math.log10(p_uni[w]):.6f}\t{w}"
        lines.append(entry if w == "</s>" else f"{entry}\t{math.log10(backoff.get(w, 1.0)):.6f}")
    lines += ["", "\\2-grams:"]
    lines += [f"{math.log10(p):.6f}\t{v} {w}" for v, seen in successors.items() for w, p in seen]
    return "\n".join(lines + ["", "\\end\\", ""])


def read_pronunciations(path: str) -> Dict[str, List[str]]:
    """CMU-dictionary format, ``WORD PH1 PH2 ...``: the first pronunciation of each word, stress removed."""
    pronunciations: Dict[str, List[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or line.startswith((";;;", "#")):
                continue
            if len(fields) < 2:
                raise ValueError(f"{path}:{line_number}: expected 'WORD PHONE ...'")
            word = re.sub(r"\(\d+\)$", "", fields[0]).upper()
            pronunciations.setdefault(word, [re.sub(r"\d+$", "", p) for p in fields[1:]])
    return pronunciations


def write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", nargs="+", required=True, help="word label files (.wrd) the LM learns from")
    parser.add_argument("--words", nargs="+", required=True, help="word label files whose words the lexicons hold")
    parser.add_argument("--pronunciations", required=True, help="pronunciation dictionary (CMU format)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    names = ("lm.arpa", "lexicon.phn.txt", "lexicon.ltr.txt")
    if not args.force and any((out / n).exists() for n in names):
        print(f"make_lm.py: error: {out} already holds {', '.join(names)} (--force overwrites)", file=sys.stderr)
        return 1
    try:
        pronunciations = read_pronunciations(args.pronunciations)
        sentences = [line.split() for path in args.text for line in pathlib.Path(path).read_text().splitlines()]
        words = sorted({w for path in args.words for line in pathlib.Path(path).read_text().splitlines()
                        for w in line.split()})
    except (OSError, ValueError) as err:
        print(f"make_lm.py: error: {err}", file=sys.stderr)
        return 1
    known = [w for w in words if w in pronunciations]
    out.mkdir(parents=True, exist_ok=True)
    write(out / "lm.arpa", bigram_arpa(sentences, known))
    write(out / "lexicon.phn.txt", "".join(f"{w}\t{' '.join(pronunciations[w])}\n" for w in known))
    write(out / "lexicon.ltr.txt", "".join(f"{w}\t{' '.join(w)}\n" for w in known))
    print(f"{len(sentences)} sentences, {len(known)} lexicon words ({len(words) - len(known)} without a "
          f"pronunciation left out) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
