"""Shared fixtures: tiny data on disk in the real formats, tiny recipes, an isolated working dir."""

from __future__ import annotations

import gzip
import os
import pickle
import resource
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file as MNIST ships it: magic (0, 0, dtype 0x08 = uint8, ndim), sizes, data."""
    assert array.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Path:
    """MNIST's four raw files under root/MNIST/raw, holding learnable 28x28 images:
    each class is a bright bar at its own position, with noise."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 + 2 * k: 5 + 2 * k, 4:24] = 255
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


def _bar_images(rng: np.random.Generator, labels: np.ndarray, channels: int, size: int) -> np.ndarray:
    """(N, C, size, size) uint8 noise with a bright horizontal bar whose row depends on the label:
    something a tiny model can learn, in every channel, under any central crop of half the size."""
    n = len(labels)
    images = rng.integers(0, 40, (n, channels, size, size)).astype(np.uint8)
    step = max(1, size // 2 // 10)
    for i, k in enumerate(labels):
        top = size // 4 + step * int(k)
        images[i, :, top:top + step, size // 4: 3 * size // 4] = 255
    return images


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, n_per_batch: int = 20, n_test: int = 40, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/ as the Python version ships it: five pickled training batches and a test
    batch, each {"batch_label", "labels", "data": (N, 3072) uint8 rows R then G then B, "filenames"},
    and batches.meta {"label_names", "num_cases_per_batch", "num_vis"}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        labels = rng.integers(0, 10, n)
        data = _bar_images(rng, labels, 3, 32).reshape(n, 3072)
        batch = {"batch_label": f"{name} of 6", "labels": labels.tolist(), "data": data,
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": n_per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_svhn(root: Path, n_train: int = 100, n_test: int = 40, seed: int = 0) -> Path:
    """root/svhn/{train,test}_32x32.mat as SVHN ships them: X (32, 32, 3, N) uint8, y (N, 1) in 1..10
    (10 is the digit 0)."""
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        digits = rng.integers(0, 10, n)
        images = _bar_images(rng, digits, 3, 32)  # (N, C, H, W)
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        savemat(folder / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": y})
    return root


NORB_PREFIX = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training",
               "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}


def write_norb_matrix(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """NYU's binary matrix format: int32 magic (0x1E3D4C55 bytes, 0x1E3D4C54 int32), int32 ndim,
    max(3, ndim) int32 sizes (unused ones are 1), then the data; all little-endian."""
    magic = {np.dtype(np.uint8): 0x1E3D4C55, np.dtype(np.int32): 0x1E3D4C54}[array.dtype]
    dims = list(array.shape) + [1] * (3 - array.ndim)
    header = struct.pack(f"<ii{len(dims)}i", magic, array.ndim, *dims)
    blob = header + array.astype(array.dtype.newbyteorder("<")).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob, compresslevel=1)
    path.write_bytes(blob)


def write_smallnorb(root: Path, n_train: int = 60, n_test: int = 30, seed: int = 0, gz: bool = False) -> Path:
    """root/smallnorb/ with the six files: -dat (N, 2, 96, 96) uint8 stereo pairs, -cat (N,) int32
    categories 0..4, -info (N, 4) int32 instance, elevation, azimuth, lighting."""
    folder = root / "smallnorb"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        cat = rng.integers(0, 5, n).astype(np.int32)
        dat = _bar_images(rng, cat * 2, 2, 96)  # rows 24 + 4k..: inside the central crop after the resize
        info = np.stack([rng.integers(0, 10, n), rng.integers(0, 9, n), rng.integers(0, 18, n) * 2,
                         rng.integers(0, 6, n)], axis=1).astype(np.int32)
        for part, array in (("dat", dat), ("cat", cat), ("info", info)):
            write_norb_matrix(folder / f"{NORB_PREFIX[split]}-{part}.mat", array, gz=gz)
    return root


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLflow SQLite store with its tables made and nothing in it: copied into a test's runs/, it
    spares each test the 2.4 s of MLflow's schema migrations a new store takes (tests marked
    `fresh_store` make theirs from nothing, as a user's first run does)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
            empty_store: Path) -> Path:
    """Run in an empty directory so runs/ and the MLflow store land in tmp."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CAPSX_DATA", raising=False)
    if request.node.get_closest_marker("fresh_store") is None:
        (tmp_path / "runs").mkdir()
        shutil.copyfile(empty_store, tmp_path / "runs" / "mlflow.db")
    return tmp_path


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    return write_mnist(tmp_path / "data")


TINY_CAPSNET = {"name": "capsnet", "conv1_channels": 16, "primary_types": 4, "primary_dim": 8, "class_dim": 8,
                "decoder_hidden": [32, 64]}


def tiny_recipe(data: dict | None = None, model: dict | None = None, **sections: object) -> dict:
    recipe: dict = {
        "name": "tiny",
        "model": model or dict(TINY_CAPSNET),
        "data": data or {"name": "shapes", "train_size": 96, "test_size": 32, "batch_size": 16},
        "train": {"epochs": 1, "seed": 0},
        "device": "cpu",
    }
    recipe.update(sections)
    return recipe


def real_mnist_root() -> Path | None:
    """Real MNIST: $CAPSX_DATA, else ../shared/data beside the repo; None if absent."""
    for candidate in (os.environ.get("CAPSX_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
            return Path(candidate)
    return None


@pytest.fixture(autouse=True)
def _real_mnist_or_say_why(request: pytest.FixtureRequest) -> None:
    """A test marked `mnist` skips, saying why, where real MNIST is absent; under CI (the variable `CI`
    set, as CI services do) that is a failure instead: CI has ../shared beside the clone."""
    if request.node.get_closest_marker("mnist") is None or real_mnist_root() is not None:
        return
    where = "$CAPSX_DATA or ../shared/data (MNIST/raw/t10k-images-idx3-ubyte ...)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but real MNIST is not in {where}")
    pytest.skip(f"real MNIST is not in {where}")


@pytest.fixture(autouse=True, scope="session")
def _kernels_as_asked() -> None:
    """Under tests/lower_isa.py: the lower CPU capability really is the one torch runs (an ignored
    ATEN_CPU_CAPABILITY would make the second run a copy of the first)."""
    expected = os.environ.get("CAPSX_EXPECT_CPU_CAPABILITY")
    if expected is not None:
        got = torch.backends.cpu.get_cpu_capability()
        assert got == expected, f"ATEN_CPU_CAPABILITY asked for {expected}, torch runs {got} kernels"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The split-integrity verdicts go to a temp cache, not the user's ~/.cache."""
    os.environ["CAPSX_CACHE"] = str(tmp_path_factory.mktemp("capsx-cache"))


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@contextmanager
def address_space_cap(extra: int):
    """RLIMIT_AS (soft) at what the process holds now plus `extra`, restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text().splitlines()
    held = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
    cap = held + extra if hard == resource.RLIM_INFINITY else min(hard, held + extra)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def write_image_folder(folder: Path, classes: list[str], per_class: int, seed: int = 0, mode: str = "RGB",
                       suffix: str = ".png", size: tuple[int, int] = (45, 37)) -> list[Path]:
    """folder/<class>/<i><suffix>: learnable pictures (noise, and a bright bar whose row depends on the class)
    of an odd size, as a user's own photos would be; returns the files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    files = []
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            top = h // 5 + k * max(1, h // (2 * len(classes)))
            pixels[top:top + max(2, h // 10), w // 6: 5 * w // 6] = (255, 220, 180)
            path = folder / name / f"{i}{suffix}"
            Image.fromarray(pixels).convert(mode).save(path)
            files.append(path)
    return files
