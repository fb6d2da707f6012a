"""The numerics-sensitive tests (`-m numerics`) again, with PyTorch's CPU kernels one class lower.

PyTorch picks its vectorised kernels at run time (AVX-512, AVX2 or plain), and oneDNN and MKL pick
theirs, so sums are ordered differently on different CPUs: a test tuned on one class can fail on
another. `make test` runs this after the whole suite, so one machine exercises two classes:
an AVX-512 machine also runs AVX2 kernels, an AVX2 machine the plain ones. Usage:
`python tests/lower_isa.py [pytest args]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# host capability -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) one class lower
LOWER = {
    "AVX512": ("avx2", "AVX2", "AVX2"),
    "AVX2": ("default", "SSE41", "SSE4_2"),
}


def main(argv: list[str]) -> int:
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    host = subprocess.run([sys.executable, "-c", probe], env=clean, capture_output=True, text=True,
                          check=True).stdout.strip()
    if host not in LOWER:
        print(f"lower_isa: this CPU's kernels are {host}; no lower x86 class to try, nothing ran")
        return 0
    aten, onednn, mkl = LOWER[host]
    env = {**clean, "ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn, "MKL_ENABLE_INSTRUCTIONS": mkl,
           "CAPSX_EXPECT_CPU_CAPABILITY": aten.upper()}
    print(f"lower_isa: numerics tests again with the CPU kernels at {aten} (this CPU: {host}); "
          f"ONEDNN_MAX_CPU_ISA={onednn} MKL_ENABLE_INSTRUCTIONS={mkl}", flush=True)
    # only the modules that mark tests `numerics`: collecting the whole suite took 10 s of the rerun's 29
    here = Path(__file__).parent
    files = [] if any(not a.startswith("-") for a in argv) else \
        sorted(str(f) for f in here.glob("test_*.py") if "mark.numerics" in f.read_text())
    return subprocess.call([sys.executable, "-m", "pytest", "-m", "numerics", "-p", "no:cacheprovider", *files,
                            *argv], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
