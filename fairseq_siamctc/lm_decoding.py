"""Lexicon-constrained CTC beam search with an n-gram word language model.

The search is flashlight's lexicon decoder through ``torchaudio.models.decoder.ctc_decoder``
(flashlight-text), which reads ARPA and binary KenLM models: the decoder fairseq's ``infer.py``
uses (``w2l_decoder=kenlm``). Hypotheses are sequences of lexicon words.

Units. The tokens are the fine-tuned model's target dictionary, in its order, blank included. A
lexicon line is ``WORD UNIT UNIT ...`` (whitespace separated; a word may have several lines, one per
pronunciation). With letter units and fairseq's ``|`` word boundary (``.ltr`` labels), ``|`` is
the decoder's silence token and every spelling must end with it: it is appended where a lexicon
line lacks it, so ``HELLO H E L L O`` and ``HELLO H E L L O |`` are the same entry. With phoneme
units (``.phn``, e.g. ``HELLO HH AH L OW``) there is no boundary unit: words follow each other
directly and the dictionary's ``</s>``, which a CTC model never emits, is the silence token, as in
fairseq's own decoder.
"""

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

WORD_BOUNDARY = "|"


@dataclass
class LMDecoderOptions:
    """What the beam search reads besides the emissions (torchaudio's ``ctc_decoder`` arguments)."""

    lexicon: str
    lm: Optional[str] = None  # None: the lexicon constraint alone
    beam: int = 50
    beam_threshold: float = 25.0
    lm_weight: float = 2.0
    word_score: float = 0.0
    sil_score: float = 0.0


def read_lexicon(path: str, symbols: Sequence[str], word_boundary: Optional[str]) -> Dict[str, List[List[str]]]:
    """``WORD UNIT ...`` lines -> {word: [spelling, ...]}, every unit checked against ``symbols``.

    With ``word_boundary`` every spelling ends with it (appended where missing). An empty line is
    skipped; a word without units or an unknown unit is an error naming ``path:line``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lexicon not found: {path}")
    known = set(symbols)
    lexicon: Dict[str, List[List[str]]] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            word, units = fields[0], fields[1:]
            if word_boundary is not None and units and units[-1] != word_boundary:
                units.append(word_boundary)
            if not units or units == [word_boundary]:
                raise ValueError(f"{path}:{line_number}: the word {word!r} has no units")
            unknown = [u for u in units if u not in known]
            if unknown:
                raise ValueError(f"{path}:{line_number}: unit {unknown[0]!r} of {word!r} is not in the "
                                 f"model's dictionary ({' '.join(s for s in symbols if not s.startswith('<'))})")
            spellings = lexicon.setdefault(word, [])
            if units not in spellings:
                spellings.append(units)
    if not lexicon:
        raise ValueError(f"{path}: the lexicon is empty")
    return lexicon


def build_lm_decoder(symbols: Sequence[str], blank: int, silence: int, options: LMDecoderOptions):
    """A torchaudio ``CTCDecoder`` over ``symbols`` (the model's dictionary, index = token id)."""
    from torchaudio.models.decoder import ctc_decoder  # flashlight-text, imported only when used

    word_boundary = symbols[silence] if symbols[silence] == WORD_BOUNDARY else None
    lexicon = read_lexicon(options.lexicon, symbols, word_boundary)
    if options.lm is not None and not os.path.isfile(options.lm):
        raise FileNotFoundError(f"language model not found: {options.lm}")
    # the decoder reads its lexicon from a file: the checked one, in flashlight's format
    with tempfile.TemporaryDirectory() as tmp:
        checked = os.path.join(tmp, "lexicon.txt")
        with open(checked, "w", encoding="utf-8") as f:
            for word, spellings in lexicon.items():
                f.writelines(f"{word}\t{' '.join(units)}\n" for units in spellings)
        try:
            with _native_stderr_to(os.path.join(tmp, "kenlm.log")):
                return ctc_decoder(
                    lexicon=checked, tokens=list(symbols), lm=options.lm, nbest=1, beam_size=options.beam,
                    beam_threshold=options.beam_threshold, lm_weight=options.lm_weight,
                    word_score=options.word_score, sil_score=options.sil_score,
                    blank_token=symbols[blank], sil_token=symbols[silence],
                )
        except RuntimeError as err:  # KenLM's message for an unreadable model ends with what it found
            reason = [line for line in str(err).splitlines() if line.strip()][-1]
            raise ValueError(f"{options.lm}: not a language model KenLM reads ({reason})") from err


@contextlib.contextmanager
def _native_stderr_to(path: str):
    """Sends what C++ code writes to the process's stderr (KenLM's loading progress) to a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def lm_decode(decoder, log_probs: torch.Tensor, lengths: torch.Tensor) -> List[Tuple[List[str], List[int]]]:
    """log_probs (B, T, V), lengths (B,) -> per utterance (words, label indices of the best path)."""
    emissions = log_probs.detach().to("cpu", torch.float32).contiguous()
    results = decoder(emissions, lengths.to("cpu"))
    return [(list(hyps[0].words), hyps[0].tokens.tolist()) if hyps else ([], []) for hyps in results]
