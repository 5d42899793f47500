"""Sequence-level unsupervised training (Yang, Barkoczi, Schlueter, Ney, ICASSP 2026).

- :mod:`.theory`: the two conditions, the classification-error bound (theorem 1) and its Pinsker form,
  computed exactly by enumeration for small label/observation alphabets and sequence lengths;
- :mod:`.label_lm`: n-gram label language models as dense finite-state machines;
- :mod:`.seq_level_ce`: the sequence-level cross-entropy loss (forward algorithm in log space);
- :mod:`.toy`: learning an emission matrix from unpaired units with that loss, next to the bound.
"""
