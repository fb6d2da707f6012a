"""Shared fixtures: tiny data on disk in the real formats, tiny recipes, an isolated working dir."""

from __future__ import annotations

import os
import struct
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


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory so runs/ and the MLflow store land in tmp."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CAPSX_DATA", raising=False)
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


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The split-integrity verdicts go to a temp cache, not the user's ~/.cache."""
    os.environ["CAPSX_CACHE"] = str(tmp_path_factory.mktemp("capsx-cache"))


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
