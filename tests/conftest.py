"""The whole suite runs the real Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here. The tiled PyTorch path
(what CPU users get without the interpreter) is tested by calling it directly.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_silent_tiled_fallback():
    """A test on the Triton kernels fails if a Triton error sent a configuration to the tiled path (tests that
    inject such an error replace the record with their own, which monkeypatch restores first)."""
    from flash_fx import kernels

    before = dict(kernels._TRITON_FAILURES)
    yield
    new = {key: why for key, why in kernels._TRITON_FAILURES.items() if key not in before}
    kernels._TRITON_FAILURES.clear()
    assert not new, f"the Triton kernels failed and the tiled path ran instead: {new}"
