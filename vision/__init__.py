"""Preference alignment of LLaVA-style vision-language models (needs the [vision] extra)."""

from importlib.util import find_spec

from mmalign.errors import MissingDependencyError

_missing = [name for name in ("transformers", "peft", "torchvision") if find_spec(name) is None]
if _missing:
    raise MissingDependencyError(f"mmalign.vision needs {', '.join(_missing)}: pip install 'mmalign[vision]'")
