"""Imports every module of this folder so that its fairseq components register."""

import importlib
import pathlib

for _module in sorted(pathlib.Path(__file__).parent.glob("[!_]*.py")):
    importlib.import_module(f"{__name__}.{_module.stem}")
