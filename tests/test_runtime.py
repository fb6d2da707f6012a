"""Process-wide CPU settings (capsx.train.runtime), each checked in a fresh interpreter: they are global state."""

import subprocess
import sys

import pytest
import torch

SUBNORMAL_PRODUCT = """
import sys, torch
from capsx.train.runtime import flush_denormals
if sys.argv[1] == "on":
    flush_denormals()
if sys.argv[1] in ("cli", "help"):  # the console script's entry: a command that runs (here to its
    from capsx.cli import main      # one-line error), or --help, which computes nothing
    sys.argv = ["capsx", "summary", "no-such-recipe.yaml"] if sys.argv[1] == "cli" else ["capsx", "--help"]
    try:
        main()
    except SystemExit:
        pass
torch.set_num_threads(2)
x = torch.full((1 << 20,), 1e-30)  # large enough for torch to split the product over its worker threads
y = x * 1e-10  # 1e-40: subnormal in fp32
print(int((y != 0).sum()))
"""


def nonzero_after_product(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SUBNORMAL_PRODUCT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])  # the last line: `--help` prints its own first


def test_flush_denormals_zeroes_subnormal_results_on_every_thread():
    assert nonzero_after_product("off") == 1 << 20  # the control: subnormals are kept by default
    if not torch.set_flush_denormal(False):  # False: this CPU has no such mode (the default stays off)
        pytest.skip("this CPU has no flush-to-zero mode")
    assert nonzero_after_product("on") == 0
    assert nonzero_after_product("cli") == 0
    assert nonzero_after_product("help") == 1 << 20  # --help sets nothing (it does not even import torch)


def test_help_does_not_import_torch_mlflow_or_the_models():
    probe = ("import sys\nfrom capsx.cli import main\nsys.argv = ['capsx', *sys.argv[1:]]\ntry:\n    main()\n"
             "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'mlflow', 'capsx.models', 'torchvision')"
             " if m in sys.modules))")
    for args in (["--help"], ["train", "--help"], ["visualize", "--help"], ["perturb", "--help"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True)
        assert "Usage" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]", (args, out.stdout[-300:])


def test_running_the_app_in_process_leaves_the_hosts_float_mode_alone(workdir):
    from typer.testing import CliRunner

    from capsx.cli import app

    assert CliRunner().invoke(app, ["--version"]).exit_code == 0
    assert (torch.tensor([1e-30]) * 1e-10).item() != 0  # e.g. hypothesis refuses to run with subnormals off


def test_gpu_check_without_cuda_says_why_in_one_line_and_exits_0():
    from tests.conftest import REPO

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: make gpu-check runs the real thing")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: CUDA not available") and "nothing ran" in lines[0]
