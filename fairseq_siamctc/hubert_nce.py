"""HuBERT's masked-prediction logits as one matrix product.

fairseq's ``HubertModel.compute_nce`` scores every frame against every cluster embedding with
``torch.cosine_similarity`` over a broadcast of shape (classes + 1, frames, dims): a third of the
CPU time of a step of the demo's small HuBERT (100 clusters; ``bench/hubert_nce.py``), and
classes x frames x dims floats (1.5 GB for 500 clusters and 3,000 frames). The same
cosines are one (frames, dims) x (dims, classes) product of unit vectors. ``apply()``, called
when the plugin is imported, sends a call to :func:`cosine_logits` when its negatives are
fairseq's broadcast of the label embeddings, and every other call (``target_glu`` materialises
them) to fairseq's own code. The logits equal fairseq's to float rounding, their -inf entries
exactly; ``tests/test_hubert_nce.py`` compares both, and the gradients.
"""

import torch

FAIRSEQ_COMPUTE_NCE = None  # fairseq's own method, kept by apply()


def cosine_logits(x: torch.Tensor, pos: torch.Tensor, label_embs: torch.Tensor, temperature: float,
                  eps: float = 1e-8) -> torch.Tensor:
    """fairseq's HuBERT logits of one label set.

    x: (S, D) projected frames; pos: (S, D) each frame's target embedding (a row of label_embs);
    label_embs: (C, D). Returns (S, 1 + C) in x's dtype: column 0 the cosine with the target,
    column 1 + c the cosine with class c, or -inf where class c's embedding equals the target's
    (the target itself), all divided by ``temperature``. Each vector is divided by
    max(norm, eps) first, as ``torch.cosine_similarity`` does.
    """

    def unit(v):
        v = v.float()
        return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(eps)

    # float32 under autocast too, where cosine_similarity runs in float32 and a product would not
    with torch.autocast(x.device.type, enabled=False):
        x_unit, pos_unit, embs_unit = unit(x), unit(pos), unit(label_embs)
        target_cos = (x_unit * pos_unit).sum(-1, keepdim=True)
        class_cos = x_unit @ embs_unit.t()
    logits = torch.cat([target_cos, class_cos], dim=1).type_as(x) / temperature
    is_target = equal_rows(pos, label_embs)
    no_column = torch.zeros_like(is_target[:, :1])
    return logits.masked_fill(torch.cat([no_column, is_target], dim=1), float("-inf"))


def equal_rows(a: torch.Tensor, b: torch.Tensor, head: int = 4) -> torch.Tensor:
    """(A, B) bool: row i of a (A, D) equals row j of b (B, D) in every element. Compares the first
    ``head`` elements of every pair, then whole rows of the pairs that agree there, so that no
    A x B x D tensor is built when the rows differ early (as random embeddings do)."""
    candidate = (a[:, None, :head] == b[None, :, :head]).all(-1)
    rows, cols = candidate.nonzero(as_tuple=True)  # one host sync, as fairseq's own ``.any()``
    candidate[rows, cols] = (a[rows] == b[cols]).all(-1)
    return candidate


def broadcast_rows(negs: torch.Tensor) -> torch.Tensor:
    """(C, D): the rows that ``negs`` (C, S, D, stride 0 over S) repeats, as a view of the storage
    it shares with them. Indexing ``negs[:, 0]`` would give the same values, but its gradient is a
    zero-filled (C, S, D) tensor: as large as the broadcast this module avoids."""
    if negs._base is None:
        return negs[:, 0]
    return negs._base.as_strided((negs.size(0), negs.size(2)), (negs.stride(0), negs.stride(2)),
                                 negs.storage_offset())


def _compute_nce(self, x, pos, negs):
    # fairseq's compute_pred passes label_embs.unsqueeze(1).expand(-1, S, -1): stride 0 over frames
    if negs.dim() == 3 and negs.size(1) > 1 and negs.stride(1) == 0:
        return cosine_logits(x, pos, broadcast_rows(negs), self.logit_temp)
    return FAIRSEQ_COMPUTE_NCE(self, x, pos, negs)


def apply() -> None:
    """Routes ``HubertModel.compute_nce`` through :func:`cosine_logits`; calling again changes nothing."""
    global FAIRSEQ_COMPUTE_NCE
    from fairseq.models.hubert.hubert import HubertModel

    if HubertModel.compute_nce is not _compute_nce:
        FAIRSEQ_COMPUTE_NCE = HubertModel.compute_nce
        HubertModel.compute_nce = _compute_nce
