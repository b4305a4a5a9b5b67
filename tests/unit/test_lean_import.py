from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "ray", "tensorrt", "optuna")


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_sweeper_is_lean() -> None:
    assert _imported_after("import sweeper") == set()


def test_reading_backend_configs_needs_no_heavy_library() -> None:
    statement = (
        "from sweeper.backends import BACKENDS, get_backend; "
        "[get_backend(n).Config.model_fields for n in BACKENDS]"
    )
    assert _imported_after(statement) & {"torch", "onnxruntime", "ray", "tensorrt"} == set()


def test_loading_a_space_and_the_cli_module_needs_no_heavy_library(root) -> None:
    statement = f"import sweeper.cli; from sweeper.space import load_space; load_space({str(root / 'search_spaces' / 'quickstart.yaml')!r})"
    assert _imported_after(statement) & {"torch", "onnxruntime", "ray", "tensorrt"} == set()
