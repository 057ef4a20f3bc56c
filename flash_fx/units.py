"""Human-readable quantities for reports."""


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, 3 significant digits)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
