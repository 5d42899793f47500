"""siamctc-export: a SiamCTC training checkpoint in, a checkpoint of its base model's own format out.

HuBERT: a fairseq checkpoint laid out like ``hubert_base_ls960.pt`` (the base checkpoint's whole
config, the trained encoder weights under ``model``, the pre-training label dictionaries under
``task_state``), which fairseq's ``HubertModel`` and the stock ``hubert_ctc`` fine-tuning
(``model.w2v_path=OUT``) load as they load the original. WavLM: ``{"cfg": ..., "model": ...}`` as
``wavlm_base.pt``. Everything comes from the SiamCTC checkpoint itself (the model keeps a record of
its base checkpoint), so the original file is not needed.

The export holds the encoder only. Parts SiamCTC did not train keep their original values: the CNN
when frozen, layers above ``feature_layer``, HuBERT's ``label_embs_concat`` (and ``final_proj`` unless
it served as the projection). A projection SiamCTC added itself and the heads phi/psi are dropped.
"""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from fairseq_siamctc.models.checkpoints import (
    ENCODER_RECORD_KEY,
    HUBERT,
    SIAMCTC,
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    write_hubert_checkpoint,
    write_wavlm_checkpoint,
)
from fairseq_siamctc.models.encoders import build_encoder

ENCODER_PREFIX = "encoder."


def encoder_state(checkpoint: Checkpoint) -> Dict[str, Any]:
    """The base model's state dict held under ``encoder.`` in a SiamCTC state dict, checked against its record."""
    if ENCODER_RECORD_KEY not in checkpoint.model:
        raise CheckpointError(f"{checkpoint.path}: SiamCTC checkpoint without the record of its base encoder")
    record = checkpoint.model[ENCODER_RECORD_KEY]
    # float32 as the published base checkpoints, also after fp16 training
    state = {
        k[len(ENCODER_PREFIX):]: v.float() if v.is_floating_point() else v
        for k, v in checkpoint.model.items()
        if k.startswith(ENCODER_PREFIX)
    }
    try:
        build_encoder(record).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint.path}: encoder weights do not fit the recorded {record['kind']} model: {err}") from err
    return state


def export(checkpoint_path, out_path) -> str:
    """Writes the trained encoder of a SiamCTC checkpoint in its base format; returns the encoder kind."""
    if Path(out_path).resolve() == Path(checkpoint_path).resolve():
        raise ValueError(f"refusing to overwrite the input checkpoint {checkpoint_path}")
    checkpoint = read_checkpoint(checkpoint_path, allowed=(SIAMCTC,))
    state = encoder_state(checkpoint)
    record = checkpoint.model[ENCODER_RECORD_KEY]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    if record["kind"] == HUBERT:
        history = [
            {k: v for k, v in entry.items() if k != "optimizer"}
            for entry in checkpoint.state.get("optimizer_history") or []
        ]
        write_hubert_checkpoint(out_path, record["cfg"], state, record["label_set_sizes"], history)
    else:
        write_wavlm_checkpoint(out_path, record["cfg"], state)
    return record["kind"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="siamctc-export",
        description="Export the encoder of a SiamCTC training checkpoint as a HuBERT (fairseq) or WavLM checkpoint.",
    )
    parser.add_argument("checkpoint", help="SiamCTC training checkpoint (e.g. checkpoints/checkpoint_last.pt)")
    parser.add_argument("out", help="output checkpoint path")
    args = parser.parse_args(argv)
    try:
        kind = export(args.checkpoint, args.out)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"siamctc-export: error: {err}", file=sys.stderr)
        return 1
    print(f"siamctc-export: wrote the trained {kind} encoder of {args.checkpoint} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
