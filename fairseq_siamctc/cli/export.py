"""siamctc-export: a SiamCTC training checkpoint in, its trained encoder out, in one of three formats.

A base checkpoint (HuBERT or WavLM in any format the plugin reads) is converted the same way, e.g.
``hubert_base_ls960.pt`` to a Hugging Face directory or a Hugging Face directory to a fairseq file.

``--format fairseq`` (default): the base model's own format. HuBERT: a fairseq checkpoint laid out
like ``hubert_base_ls960.pt`` (the base checkpoint's whole config, the trained encoder weights under
``model``, the pre-training label dictionaries under ``task_state``), which fairseq's ``HubertModel``
and the stock ``hubert_ctc`` fine-tuning (``model.w2v_path=OUT``) load as they load the original.
WavLM: ``{"cfg": ..., "model": ...}`` as ``wavlm_base.pt`` (what s3prl's ``wavlm_local`` reads).

``--format s3prl``: HuBERT in s3prl's converted layout (``task_cfg``, ``model_cfg``, ``model_weight``,
``dictionaries_symbols``; plain python, no pickled fairseq class), which s3prl's ``hubert_local``
loads without fairseq, e.g. for SUPERB. WavLM: the same file as ``--format fairseq``.

``--format hf``: a directory that ``transformers``' ``HubertModel.from_pretrained`` /
``WavLMModel.from_pretrained`` load (``config.json``, ``model.safetensors``,
``preprocessor_config.json``). SiamCTC's projection and heads phi/psi, and HuBERT's pre-training
heads, are kept in ``siamctc_heads.safetensors`` beside them, which the plugin reads back.

Everything comes from the SiamCTC checkpoint itself (the model keeps a record of its base
checkpoint), so the original file is not needed. Parts SiamCTC did not train keep their original
values: the CNN when frozen, layers above ``feature_layer``, HuBERT's ``label_embs_concat`` (and
``final_proj`` unless it served as the projection). The fairseq and s3prl files hold the encoder
only: a projection SiamCTC added itself and the heads phi/psi are dropped there.

Outputs are written atomically (a temporary file or folder beside the output, then renamed); an
existing output is replaced only with ``--force``.
"""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from fairseq_siamctc.models.checkpoints import (
    ENCODER_RECORD_KEY,
    FAIRSEQ,
    HF,
    HUBERT,
    S3PRL,
    SIAMCTC,
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    write_hubert_checkpoint,
    write_s3prl_checkpoint,
    write_wavlm_checkpoint,
)
from fairseq_siamctc.models.encoders import build_encoder, load_encoder
from fairseq_siamctc.models.formats import FormatError, hf_directory_files, write_directory_atomically

ENCODER_PREFIX = "encoder."
FORMATS = (FAIRSEQ, S3PRL, HF)
HEAD_PREFIXES = ("projection.", "phi.", "psi.")


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


def siamctc_heads(checkpoint: Checkpoint) -> Dict[str, Any]:
    """SiamCTC's own projection (when it has one) and the heads phi/psi, float32."""
    return {k: v.float() for k, v in checkpoint.model.items() if k.startswith(HEAD_PREFIXES)}


def check_output(out_path, fmt: str, force: bool) -> None:
    """Refuses a target the format cannot be written to before any work is done."""
    out = Path(out_path)
    if fmt == HF:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file; --format hf writes a directory")
    elif out.is_dir():
        raise ValueError(f"{out} is a directory; --format {fmt} writes one file")
    if out.exists() and not force:
        raise ValueError(f"{out} exists; use --force to replace it")


def export(checkpoint_path, out_path, fmt: str = FAIRSEQ, force: bool = False) -> str:
    """Writes the trained encoder of a SiamCTC checkpoint in format ``fmt``; returns the encoder kind."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if Path(out_path).resolve() == Path(checkpoint_path).resolve():
        raise ValueError(f"refusing to overwrite the input checkpoint {checkpoint_path}")
    check_output(out_path, fmt, force)
    checkpoint = read_checkpoint(checkpoint_path)
    if checkpoint.kind == SIAMCTC:
        state = encoder_state(checkpoint)
        record = checkpoint.model[ENCODER_RECORD_KEY]
        heads = siamctc_heads(checkpoint)
        model_cfg = checkpoint.cfg.model
        metadata = {"feature_layer": model_cfg.get("feature_layer"), "projection_dim": model_cfg.get("projection_dim", 256)}
    else:  # a base checkpoint: converted as it is, checked by loading it
        record, encoder = load_encoder(checkpoint)
        state = {k: v.float() if v.is_floating_point() else v for k, v in encoder.state_dict().items()}
        heads, metadata = {}, {}
    if fmt == HF:
        metadata = {**metadata, "kind": record["kind"], "label_set_sizes": record["label_set_sizes"]}
        try:
            files = hf_directory_files(record["kind"], record["cfg"], state, heads, metadata)
        except FormatError as err:
            raise CheckpointError(f"{checkpoint_path}: cannot be written as a Hugging Face model: {err}") from err
        write_directory_atomically(out_path, files, force=force)
    elif record["kind"] == HUBERT and fmt == S3PRL:
        write_s3prl_checkpoint(out_path, record["cfg"], state, record["label_set_sizes"], force=force)
    elif record["kind"] == HUBERT:
        history = [
            {k: v for k, v in entry.items() if k != "optimizer"}
            for entry in checkpoint.state.get("optimizer_history") or []
        ]
        write_hubert_checkpoint(out_path, record["cfg"], state, record["label_set_sizes"], history, force=force)
    else:
        write_wavlm_checkpoint(out_path, record["cfg"], state, force=force)
    return record["kind"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="siamctc-export",
        description="Export the trained encoder of a SiamCTC training checkpoint (or convert a base checkpoint) "
                    "as a fairseq HuBERT / WavLM checkpoint, an s3prl converted checkpoint, or a Hugging Face "
                    "transformers directory.",
    )
    parser.add_argument("checkpoint", help="SiamCTC training checkpoint (e.g. checkpoints/checkpoint_last.pt), "
                                           "or a base HuBERT/WavLM checkpoint to convert")
    parser.add_argument("out", help="output checkpoint file (fairseq, s3prl) or directory (hf)")
    parser.add_argument("--format", choices=FORMATS, default=FAIRSEQ,
                        help="fairseq: the base model's own format (fairseq fine-tuning); s3prl: s3prl's converted "
                             "layout (SUPERB through s3prl); hf: a transformers HubertModel/WavLMModel directory")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        kind = export(args.checkpoint, args.out, args.format, args.force)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError, OSError) as err:
        print(f"siamctc-export: error: {err}", file=sys.stderr)
        return 1
    print(f"siamctc-export: wrote the {kind} encoder of {args.checkpoint} to {args.out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
