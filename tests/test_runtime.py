"""Process-wide CPU settings (capsx.runtime), each checked in a fresh interpreter: they are global state."""

import subprocess
import sys

import pytest
import torch

SUBNORMAL_PRODUCT = """
import sys, torch
from capsx.runtime import flush_denormals
if sys.argv[1] == "on":
    flush_denormals()
torch.set_num_threads(2)
x = torch.full((1 << 20,), 1e-30)  # large enough for torch to split the product over its worker threads
y = x * 1e-10  # 1e-40: subnormal in fp32
print(int((y != 0).sum()))
"""


def nonzero_after_product(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SUBNORMAL_PRODUCT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_flush_denormals_zeroes_subnormal_results_on_every_thread():
    assert nonzero_after_product("off") == 1 << 20  # the control: subnormals are kept by default
    if not torch.set_flush_denormal(False):  # False: this CPU has no such mode (the default stays off)
        pytest.skip("this CPU has no flush-to-zero mode")
    assert nonzero_after_product("on") == 0
