"""The ``unit_sequence`` task: unpaired discrete unit sequences and an n-gram label LM from text.

Data: ``{data}/{split}.km`` (one utterance a line, space-separated unit ids in ``[0, num_units)``)
and a label text file (one utterance a line, space-separated labels, e.g. a ``.phn`` file) from
which the n-gram LM ``p_LM(c)`` of the ``seq_level_ce`` criterion is estimated. Units and labels are
never paired: the label file may come from other utterances than the units.

k-means units of speech: fairseq's ``examples/hubert/simple_kmeans`` recipe (``dump_hubert_feature.py``,
``learn_kmeans.py``, ``dump_km_label.py``) writes ``{split}_0_1.km`` files in this format (rename or
concatenate them to ``{split}.km``). Such units come at 50 frames a second, several per phone:
either merge repeated units (``task.dedup_units=true``) or let the label LM repeat a label with
``task.label_loop_prob`` (e.g. 0.8 for about five frames per phone).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.unit_sequence_dataset import UnitSequenceDataset, read_unit_file
from ..unsupervised.label_lm import NGramLabelLM, read_label_sequences

logger = logging.getLogger(__name__)


@dataclass
class UnitSequenceConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with the {split}.km unit files"})
    label_text: str = field(
        default=MISSING, metadata={"help": "label sequences for the LM, one utterance a line (e.g. train.phn)"}
    )
    label_dict: Optional[str] = field(
        default=None,
        metadata={"help": "fairseq dictionary (e.g. dict.phn.txt) fixing the label inventory and order; None: sorted labels of label_text"},
    )
    num_units: int = field(default=100, metadata={"help": "size of the unit inventory (k of k-means)"})
    dedup_units: bool = field(default=False, metadata={"help": "merge runs of a repeated unit into one"})
    lm_order: int = field(default=2, metadata={"help": "n of the n-gram label LM (the paper's limited-context LM: 2)"})
    lm_add_k: float = field(default=0.1, metadata={"help": "add-k smoothing of the n-gram counts"})
    label_loop_prob: float = field(
        default=0.0, metadata={"help": "probability that a label repeats on the next frame (HMM self-loop); 0: none"}
    )
    train_subset: str = II("dataset.train_subset")
    seed: int = II("common.seed")


def read_dictionary_symbols(path: str) -> list:
    """The symbols of a fairseq dictionary file (``SYMBOL COUNT`` a line), in file order."""
    with open(path) as lines:
        symbols = [line.split()[0] for line in lines if line.strip()]
    if not symbols:
        raise ValueError(f"{path}: no symbols")
    return symbols


@register_task("unit_sequence", dataclass=UnitSequenceConfig)
class UnitSequenceTask(FairseqTask):
    cfg: UnitSequenceConfig

    def __init__(self, cfg: UnitSequenceConfig, label_symbols, label_lm: NGramLabelLM):
        super().__init__(cfg)
        self.label_symbols = label_symbols
        self.label_lm = label_lm

    @classmethod
    def setup_task(cls, cfg: UnitSequenceConfig, **kwargs):
        inventory = None if cfg.label_dict is None else read_dictionary_symbols(cfg.label_dict)
        symbols, sequences = read_label_sequences(cfg.label_text, inventory)
        label_lm = NGramLabelLM.estimate(
            sequences, len(symbols), order=cfg.lm_order, add_k=cfg.lm_add_k, label_loop_prob=cfg.label_loop_prob
        )
        logger.info(
            f"label LM: {cfg.lm_order}-gram over {len(symbols)} labels from {len(sequences)} lines of "
            f"{cfg.label_text}, {label_lm.state_label.numel()} states"
        )
        return cls(cfg, symbols, label_lm)

    @property
    def num_labels(self) -> int:
        return len(self.label_symbols)

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        path = os.path.join(self.cfg.data, f"{split}.km")
        sequences = read_unit_file(path, self.cfg.num_units, dedup=self.cfg.dedup_units)
        self.datasets[split] = UnitSequenceDataset(sequences, shuffle=split == self.cfg.train_subset, seed=self.cfg.seed)
        logger.info(f"{path}: {len(sequences)} unit sequences, {sum(map(len, sequences))} units")

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None

    def max_positions(self):
        return None
