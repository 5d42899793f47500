"""The paper's table 1 and figure 2 beside this run's numbers: JSON, markdown and a PNG.

Table 1 of the paper: PER (%) of SUPERB's phoneme recognition on LibriSpeech test-clean (and WER of
SUPERB's ASR, which this recipe does not run) for HuBERT Base, WavLM Base and their SiamCTC
variants (and SPIN and LASER variants, not part of this recipe). Figure 2: PER against the speed
factor (0.8 to 1.2) for HuBERT and HuBERT+SiamCTC; the figure itself is a plot, and the numbers
below are those the paper's text states about it (some only as bounds).
"""

import json
from typing import Dict, Optional

SPEEDS = ("0.8", "0.9", "1.0", "1.1", "1.2")
NAMES = {"hubert": "HuBERT", "hubert_siamctc": "HuBERT+SiamCTC", "wavlm": "WavLM", "wavlm_siamctc": "WavLM+SiamCTC"}
BASE = {"hubert_siamctc": "hubert", "wavlm_siamctc": "wavlm"}

PAPER = {
    "source": "Eom et al., SiamCTC, Interspeech 2025: table 1 and section 5.3 (figure 2)",
    "table1": {  # PR PER (%) and ASR WER (%) on test-clean, SUPERB
        "hubert": {"per": 5.41, "wer": 6.42},
        "hubert_siamctc": {"per": 4.32, "wer": 6.23},
        "wavlm": {"per": 4.84, "wer": 6.21},
        "wavlm_siamctc": {"per": 3.96, "wer": 5.73},
    },
    "table1_other": {  # the paper's other rows, for reference
        "HuBERT+Spin": {"per": 4.39, "wer": 6.34}, "HuBERT+LASER": {"per": 4.61, "wer": 6.18},
        "WavLM+Spin": {"per": 4.18, "wer": 5.88}, "WavLM+LASER": {"per": 4.28, "wer": 5.92},
    },
    # figure 2 as its text states it: a number, or a bound written "< x" / "> x"
    "figure2": {
        "hubert": {"0.8": 6.52, "0.9": "> 5.60", "1.0": 5.41, "1.2": 6.28},
        "hubert_siamctc": {"0.8": "< 4.6", "0.9": "< 4.6", "1.0": 4.32, "1.2": 4.7},
    },
}


def probe_error_rates(record: dict, test: str = "test_clean") -> Dict[str, float]:
    """{speed: PER} of a ``siamctc-probe`` record, the mean over its seeds."""
    seeds = list(record["seeds"].values())
    return {speed: sum(s["test"][test][speed]["per"] for s in seeds) / len(seeds) for speed in seeds[0]["test"][test]}


def results(probe: Dict[str, dict], finetune: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """The JSON record: per protocol, per encoder, PER by speed; table 1 with the paper's numbers."""
    evaluations = {"probe": {name: probe_error_rates(record) for name, record in probe.items()}}
    if finetune is not None:
        evaluations["finetune"] = {name: {k: float(v) for k, v in rates.items()}
                                   for name, rates in finetune["error_rates"].items()}
    table1 = {}
    for name, rates in evaluations["probe"].items():
        row = {"per": rates["1.0"], "paper_per": PAPER["table1"][name]["per"]}
        if name in BASE:
            row["change"] = rates["1.0"] - evaluations["probe"][BASE[name]]["1.0"]
            row["paper_change"] = round(row["paper_per"] - PAPER["table1"][BASE[name]]["per"], 2)
        table1[name] = row
    return {"table1": table1, "figure2": evaluations, "paper": PAPER, **(extra or {})}


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


def markdown(record: dict) -> str:
    """Table 1 and figure 2's numbers as markdown, the paper's beside this run's."""
    lines = ["## Table 1: phoneme recognition, PER (%) on LibriSpeech test-clean", "",
             "The paper's protocol (SUPERB PR): the encoder frozen, a weighted sum of its layers and a linear "
             "CTC head (`siamctc-probe`). Change: against the base encoder.", "",
             "| model | PER, this run | change | PER, paper | change, paper |", "|---|---:|---:|---:|---:|"]
    for name, row in record["table1"].items():
        lines.append(f"| {NAMES[name]} | {row['per']:.2f} | {_signed(row.get('change'))} | {row['paper_per']:.2f} | "
                     f"{_signed(row.get('paper_change'))} |")
    other = ", ".join(f"{k} {v['per']:.2f}" for k, v in PAPER["table1_other"].items())
    lines += ["", "The paper's table 1 also lists ASR WER (SUPERB's ASR task, not run here: "
              + ", ".join(f"{NAMES[k]} {v['wer']:.2f}" for k, v in PAPER["table1"].items())
              + f") and other methods' PER ({other}).", ""]
    titles = {"probe": "the paper's protocol (SUPERB PR probe, frozen encoder)",
              "finetune": "fairseq's CTC fine-tuning of the whole encoder (phn_100h), greedy decoding"}
    for protocol, table in record["figure2"].items():
        lines += [f"## Figure 2: PER (%) against the speed factor, {titles[protocol]}", "",
                  "| model | " + " | ".join(f"{s}x" for s in SPEEDS) + " | mean |",
                  "|---|" + "---:|" * (len(SPEEDS) + 1)]
        for name, rates in table.items():
            values = [rates[s] for s in SPEEDS]
            lines.append(f"| {NAMES[name]} | " + " | ".join(f"{v:.2f}" for v in values)
                         + f" | {sum(values) / len(values):.2f} |")
            if protocol == "probe" and name in PAPER["figure2"]:
                paper = PAPER["figure2"][name]
                lines.append(f"| {NAMES[name]}, paper | " + " | ".join(_cell(paper.get(s)) for s in SPEEDS) + " | |")
        lines.append("")
    lines.append("The paper's figure 2 values are those its text states (section 5.3); blank: not stated.")
    return "\n".join(lines) + "\n"


def _signed(value) -> str:
    return "" if value is None else f"{value:+.2f}"


def plot(record: dict, path) -> None:
    """Figure 2: PER against speed, one panel per protocol; the paper's stated points as open markers."""
    from fairseq_siamctc.cli.outputs import save_figure
    from fairseq_siamctc.cli.plotting import pyplot

    plt = pyplot()
    protocols = list(record["figure2"])
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.0 * len(protocols), 3.8), dpi=120, squeeze=False)
    speeds = [float(s) for s in SPEEDS]
    style = {"hubert": ("tab:blue", "o", "-"), "hubert_siamctc": ("tab:orange", "s", "-"),
             "wavlm": ("tab:green", "^", "--"), "wavlm_siamctc": ("tab:red", "D", "--")}
    for ax, protocol in zip(axes[0], protocols):
        for name, rates in record["figure2"][protocol].items():
            color, marker, line = style[name]
            ax.plot(speeds, [rates[s] for s in SPEEDS], color=color, marker=marker, linestyle=line, label=NAMES[name])
            stated = {float(s): v for s, v in PAPER["figure2"].get(name, {}).items() if isinstance(v, (int, float))}
            if protocol == "probe" and stated:
                ax.plot(list(stated), list(stated.values()), color=color, marker=marker, linestyle=":",
                        markerfacecolor="none", label=f"{NAMES[name]}, paper")
        ax.set_title("SUPERB PR probe" if protocol == "probe" else "CTC fine-tuning")
        ax.set_xlabel("speed factor")
        ax.set_ylabel("PER (%)")
        ax.set_xticks(speeds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write(record: dict, out) -> str:
    """Writes ``paper.json``, ``paper.md`` and ``figure2.png`` into ``out`` (each whole or not at all)."""
    from fairseq_siamctc.cli.outputs import write_atomic

    text = markdown(record)
    plot(record, out / "figure2.png")
    write_atomic(out / "paper.md", text)
    write_atomic(out / "paper.json", json.dumps(record, indent=1) + "\n")  # last: it marks the report whole
    return text
