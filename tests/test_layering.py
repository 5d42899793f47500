"""The library never imports the console scripts: everything under ``fairseq_siamctc/`` outside
``fairseq_siamctc/cli/`` must be importable (and usable) without ``fairseq_siamctc.cli``, whose
shells import the library, not the other way round."""

import ast
from pathlib import Path
from typing import List

import fairseq_siamctc

PACKAGE = Path(fairseq_siamctc.__file__).parent
CLI = "fairseq_siamctc.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool) -> List[str]:
    """Absolute names of every module ``source`` (module ``name``) imports, relative imports resolved:
    ``from X import Y`` counts as X and X.Y (Y may be a submodule), and ``importlib.import_module``
    or ``__import__`` with a literal name count too."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(node.args[0].value)
    return found


def imports_cli(source: str, name: str, is_package: bool = False) -> List[str]:
    return [m for m in imported_modules(source, name, is_package) if m == CLI or m.startswith(CLI + ".")]


def test_the_checker_finds_every_form_of_import():
    """Each form names the cli package, so a checker that misses one would let the layering break."""
    for source in ("import fairseq_siamctc.cli.probe", "from fairseq_siamctc.cli import default_device",
                   "from fairseq_siamctc import cli", "from ..cli import extract_features", "from .. import cli",
                   "def f():\n    from ..cli.extract_features import FeatureExtractor",
                   "importlib.import_module('fairseq_siamctc.cli.probe')"):
        assert imports_cli(source, "fairseq_siamctc.data.kmeans_units"), source
    assert imports_cli("from .cli import probe", "fairseq_siamctc", is_package=True)
    for source in ("from .features import FeatureExtractor", "from ..models import encoders",
                   "import fairseq_siamctc.client", "s = 'fairseq_siamctc.cli'"):
        assert not imports_cli(source, "fairseq_siamctc.data.kmeans_units"), source


def test_no_library_module_imports_the_console_scripts():
    offenders = []
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if (PACKAGE / "cli") not in p.parents]
    assert len(modules) > 20 and PACKAGE / "probe.py" in modules and PACKAGE / "features.py" in modules
    for path in modules:
        found = imports_cli(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
        offenders += [f"{path.relative_to(PACKAGE.parent)} imports {m}" for m in found]
    assert not offenders, "\n".join(offenders)
