import subprocess
import sys

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "peft", "accelerate", "bitsandbytes")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_ciuic_and_discovering_techniques_load_no_framework():
    loaded = _modules_after("import ciuic; from ciuic import registry; registry.discover()")
    assert "ciuic" in loaded
    assert not [name for name in FRAMEWORKS if name in loaded]


def test_adapter_packages_are_importable():
    loaded = _modules_after("import ciuic_lightning, ciuic_hf")
    assert {"ciuic_lightning", "ciuic_hf"} <= loaded
