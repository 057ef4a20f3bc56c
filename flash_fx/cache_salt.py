"""Put flash_fx's op interface into Inductor's cache keys.

Inductor's FX graph cache and AOTAutograd's cache key a compiled graph on its code, not on the schema or
autograd formula of the custom ops it calls. A compiled backward cached by one flash_fx version would call
`flash_fx::attention_backward` with the arguments of that version. A no-op post-grad pass whose uuid is a
hash of op.py and the kernels' public API is part of both cache keys, so such entries are never reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

_PACKAGE = Path(__file__).resolve().parent
_INTERFACE_FILES = ("op.py",)


def interface_hash() -> str:
    """sha256 of the files that define what compiled graphs call: the op module and the kernels' API."""
    from flash_fx import kernels

    digest = hashlib.sha256()
    kernels_dir = Path(kernels.__file__).parent
    for path in [*(_PACKAGE / name for name in _INTERFACE_FILES), kernels_dir / "__init__.py", kernels_dir / "spec.py"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class CacheSalt(CustomGraphPass):
    """A post-grad pass that changes nothing; only its uuid matters."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return _HASH


_HASH = interface_hash()


def inductor_config_patches() -> dict:
    """Config patches for compile_fx that salt the cache keys (unless the user set a pass of their own)."""
    if torch._inductor.config.post_grad_custom_pre_pass is not None:
        return {}
    return {"post_grad_custom_pre_pass": CacheSalt()}
