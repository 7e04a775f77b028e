"""Optional dependencies (pyproject.toml's extras): importing one that is not installed raises a
ModuleNotFoundError that names the extra to install, instead of a bare "No module named ...".

SemTok is the only user of diffusers (the SD3.5 VAE, the MMDiT blocks, the flow-matching
scheduler): `pip install 'tokenizer-ar[semtok]'`. Every other job runs without it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"diffusers": ("semtok", "SemTok (the SD3.5 VAE, MMDiT blocks, flow-matching scheduler)")}


def missing(module: str) -> ModuleNotFoundError:
    extra, what = EXTRAS[module]
    return ModuleNotFoundError(f"{what} needs the package {module!r}, which is not installed: "
                               f"pip install 'tokenizer-ar[{extra}]'", name=module)


def require(module: str) -> ModuleType:
    """`import module`, or the error above when it (not one of its own imports) is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise missing(module) from None
