"""The whole suite runs the real Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here. The tiled PyTorch path
(what CPU users get without the interpreter) is tested by calling it directly.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
