"""flash_fx: a torch.compile backend that rewrites attention into fused, tiled FlashAttention kernels.

Use it with `torch.compile(model, backend="flash_fx")`; see README.md.
"""

from flash_fx import op as _op  # noqa: F401  (registers the flash_fx::attention custom op)
from flash_fx.backend import explain, flash_fx_backend
from flash_fx.report import Report, clear_reports, reports

__all__ = ["Report", "clear_reports", "explain", "flash_fx_backend", "reports"]
