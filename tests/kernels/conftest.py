"""Triton kernels run in Triton's interpreter here unless a GPU is present.

The interpreter is chosen when a kernel is decorated, i.e. when tandem.kernels.triton_* is first
imported, so the variable is set while pytest collects this folder, before any test imports them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
