"""docs/recipe.md's "The paper's recipe with real data": every command as printed, on the built-in tiny corpus.

The commands are read from docs/recipe.md itself; only the placeholders that the page names are
replaced (LibriSpeech's folders by the tiny corpus's, the public checkpoints by tiny ones of the same
formats), and `+cpu=check` is added to each fairseq-hydra-train command, as the page says to on a
CPU. The commands run in a folder of their own, with relative paths, as a user would type them.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from conftest import PLUGIN_DIR, needs_corpus_packages
from tiny_checkpoints import tiny_hubert_checkpoint, tiny_wavlm_checkpoint

REPO = PLUGIN_DIR.parent
RECIPE = REPO / "docs" / "recipe.md"
SECTION = "## The paper's recipe with real data"


def recipe_commands(page: str) -> list:
    """The shell commands of the section SECTION, one argument list per command, in order."""
    section = page[page.index(SECTION):]
    end = section.find("\n## ", len(SECTION))
    section = section[:end] if end >= 0 else section
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_recipe_is_parsed_into_the_commands_it_prints():
    commands = recipe_commands(RECIPE.read_text())
    tools = [c[0] for c in commands]
    assert tools == ["siamctc-manifest"] * 3 + ["siamctc-labels", "siamctc-speed-testsets"] + \
        ["fairseq-hydra-train"] * 2 + ["siamctc-export"] + ["fairseq-hydra-train"] * 2 + \
        ["siamctc-decode", "siamctc-robustness", "siamctc-plot-alignment"]
    # continuation lines are joined and trailing comments dropped
    assert commands[3][-2:] == ["--out-dir", "data/manifests"]
    assert "#" not in " ".join(commands[4])


@needs_corpus_packages
def test_recipe_runs_as_printed_on_the_tiny_corpus(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    # the tiny checkpoints stand in for the public ones; 128 dims keep the finetuning config's channel
    # masking (prob 0.5, length 64) at one span or more
    hubert = tmp_path / "ckpt" / "hubert_base_ls960.pt"
    hubert.parent.mkdir()
    tiny_hubert_checkpoint(hubert, encoder_embed_dim=128)
    wavlm = tmp_path / "ckpt" / "wavlm_base.pt"
    tiny_wavlm_checkpoint(wavlm)
    placeholders = {
        "LibriSpeech/train-clean-100": corpus / "audio" / "train",
        "LibriSpeech/dev-clean": corpus / "audio" / "dev",
        "LibriSpeech/test-clean": corpus / "audio" / "test",
        "/path/to/hubert_base_ls960.pt": hubert,
        "/path/to/wavlm_base.pt": wavlm,
    }
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")  # the commands name examples/ from the repo root
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bin_dir = pathlib.Path(sys.executable).parent

    commands = recipe_commands(RECIPE.read_text())
    for words in commands:
        args = []
        for word in words:
            for placeholder, value in placeholders.items():
                word = word.replace(placeholder, str(value))
            args.append(word)
        if args[0] == "fairseq-hydra-train":
            args.append("+cpu=check")
        proc = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        if args[0] == "fairseq-hydra-train":
            # +cpu=check's schedule ran to its end (fairseq's epoch summary names it train_num_updates)
            assert re.search(r'"(train_)?num_updates": "10"', proc.stdout + proc.stderr)
            # Hydra's and torch's deprecation notices about fairseq's own code are filtered
            for notice in ("deprecated keyword in package header", "validated against ConfigStore schema",
                           "no longer change working directory", "'pin_memory' argument is set",
                           "`torch.cuda.amp.autocast(args...)` is deprecated", "`torch.nn.utils.weight_norm` is deprecated"):
                assert notice not in proc.stdout + proc.stderr, notice
        else:  # the console scripts are quiet: no warnings, no configuration dumps, no debug lines
            output = proc.stdout + proc.stderr
            for noise in ("Traceback", "Warning", "Config {", "Config: {", "DEBUG"):
                assert noise not in output, output

    data = work / "data" / "manifests"
    for split in ("train", "valid", "test_clean"):
        lines = len((data / f"{split}.tsv").read_text().splitlines()) - 1  # root line
        assert lines > 0
        for ext in ("wrd", "ltr", "phn"):
            assert len((data / f"{split}.{ext}").read_text().splitlines()) == lines
    assert (data / "test_clean_sp0.8.tsv").is_file()
    # every output landed where the command line names it, relative to the launch folder
    for path in ("data/siamctc_hubert/checkpoints/checkpoint_last.pt",
                 "data/siamctc_wavlm/checkpoints/checkpoint_last.pt", "data/hubert_siamctc.pt",
                 "data/ft_hubert/checkpoints/checkpoint_best.pt", "data/ft_siamctc/checkpoints/checkpoint_best.pt"):
        assert (work / path).is_file(), path
    assert (work / "results" / "alignment.png").read_bytes()[:4] == b"\x89PNG"
    assert list((work / "results" / "robustness").iterdir())
    assert list((work / "results" / "decode").iterdir())
