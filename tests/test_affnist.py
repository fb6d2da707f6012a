"""affNIST's MATLAB files read back from files written in its layout; affine-mnist; split integrity."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from capsx.data import canonical_root, resolve_data_root
from capsx.data.affnist import affine_mnist, affnist_files, load_affnist, read_affnist_mat
from capsx.data.imageset import ImageSet
from capsx.data.integrity import CACHE_FILE, cache_dir
from capsx.data.mnist import MNIST_FILES, MNISTConfig
from capsx.data.transforms import centre_on_canvas, ink_box
from capsx.errors import DataError
from tests.conftest import real_mnist_root, write_idx, write_mnist


def ell_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 40, 40) uint8 images of an 'L' (a vertical bar down the left, a foot to the right at the
    bottom) moved by i pixels to the right: upside down, mirrored or transposed, it reads differently."""
    images = np.zeros((n, 40, 40), np.uint8)
    for i in range(n):
        images[i, 5:30, 3 + i] = 200  # the bar
        images[i, 29, 3 + i:15 + i] = 255  # the foot
    return images, (np.arange(n) % 10).astype(np.uint8)


def write_affnist(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """As affNIST ships: struct affNISTdata, image 1600 x N (a column per image, its pixels row by row),
    label_int 1 x N, plus the fields a reader must skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    savemat(path, {"affNISTdata": {
        "image": np.ascontiguousarray(images.reshape(n, 1600).T),
        "label_int": labels,
        "label_one_of_n": np.eye(10, dtype=np.uint8)[labels].T,
        "human_readable_transform": np.zeros((7, n)),
    }})


def test_reader_gives_back_upright_images_and_labels(tmp_path):
    images, labels = ell_images(5)
    write_affnist(tmp_path / "affNIST" / "test.mat", images, labels)
    got = read_affnist_mat(tmp_path / "affNIST" / "test.mat")
    assert got.images.shape == (5, 1, 40, 40) and got.images.dtype == torch.uint8
    assert np.array_equal(got.images[:, 0].numpy(), images)
    assert got.labels.tolist() == labels.tolist() and got.labels.dtype == torch.int64
    # upright: the foot is at the bottom of the bar, to its right
    top, bottom, left, right = (int(v[2]) for v in ink_box(got.images))
    assert (top, bottom, left, right) == (5, 29, 5, 16)
    assert got.images[2, 0, 29, 16] == 255 and got.images[2, 0, 5, 16] == 0


def test_numbered_batches_are_read_in_numeric_order(tmp_path):
    images, labels = ell_images(9)
    for k, part in ((1, slice(0, 3)), (2, slice(3, 6)), (10, slice(6, 9))):
        write_affnist(tmp_path / "affNIST" / "test_batches" / f"{k}.mat", images[part], labels[part])
    assert [p.name for p in affnist_files(tmp_path)] == ["1.mat", "2.mat", "10.mat"]
    got = load_affnist(tmp_path)
    assert np.array_equal(got.images[:, 0].numpy(), images) and got.labels.tolist() == labels.tolist()


def test_reader_explains_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(DataError, match="affNIST not found.*test.mat.*affine-mnist"):
        affnist_files(tmp_path)
    savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    with pytest.raises(DataError, match="struct affNISTdata with fields image and label_int"):
        read_affnist_mat(tmp_path / "other.mat")
    savemat(tmp_path / "small.mat", {"affNISTdata": {"image": np.zeros((784, 2), np.uint8),
                                                     "label_int": np.zeros(2, np.uint8)}})
    with pytest.raises(DataError, match=r"\(784, 2\).*1600 x N"):
        read_affnist_mat(tmp_path / "small.mat")
    (tmp_path / "text.mat").write_text("not matlab")
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        read_affnist_mat(tmp_path / "text.mat")


def test_affine_mnist_is_deterministic_and_keeps_every_digit_on_the_canvas(tmp_path):
    root = write_mnist(tmp_path, n_train=16, n_test=200)
    digits = MNISTConfig().load(root).test
    a, b = affine_mnist(digits), affine_mnist(digits)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, digits.labels)
    assert not torch.equal(a.images, affine_mnist(digits, seed=1).images)
    assert a.images.shape == (200, 1, 40, 40)
    # ink survives: scale 0.8-1.2 changes the area by 0.64-1.44, bilinear blurs a little; nothing is cut off
    ratio = a.images.flatten(1).float().sum(1) / digits.images.flatten(1).float().sum(1)
    assert ratio.min() > 0.5 and ratio.max() < 1.6
    # not just moved: some bars (every class is a horizontal bar here) are turned
    top, bottom, _, _ = ink_box(a.images > 128)
    centred_top, centred_bottom, _, _ = ink_box(centre_on_canvas(digits.images, 40) > 128)
    assert ((bottom - top) - (centred_bottom - centred_top)).abs().max() >= 3
    # places spread over the canvas
    _, _, left, right = ink_box(a.images)
    assert left.min() <= 2 and right.max() >= 37


def _mnist_with_a_leak(root: Path, copies: int, n_test: int = 20) -> Path:
    write_mnist(root, n_train=50, n_test=n_test)
    raw = root / "MNIST" / "raw"
    data = (raw / "train-images-idx3-ubyte").read_bytes()
    train = np.frombuffer(data[16:], np.uint8).reshape(50, 28, 28)
    test = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(n_test, 28, 28).copy()
    test[3:3 + copies] = train[7:7 + copies]  # test images that are train images
    write_idx(raw / "t10k-images-idx3-ubyte", test)
    return root


def test_a_test_image_copied_from_the_train_split_is_an_error_naming_the_count(tmp_path):
    root = _mnist_with_a_leak(tmp_path / "leak", copies=2)
    with pytest.raises(DataError, match=r"2 of 20 test image\(s\) also appear in the train split"):
        MNISTConfig().load_splits(root)
    clean = write_mnist(tmp_path / "clean", n_train=50, n_test=20)
    assert len(MNISTConfig(canvas=40).load_splits(clean).test) == 20


def test_the_verdict_is_cached_per_files_and_redone_when_a_file_changes(tmp_path):
    root = write_mnist(tmp_path / "d", n_train=50, n_test=20)
    MNISTConfig().load_splits(root)
    cache_path = cache_dir() / CACHE_FILE
    cache = json.loads(cache_path.read_text())
    mine = {k: v for k, v in cache.items() if v["files"][0].startswith(str(root.resolve()))}
    assert len(mine) == 1 and next(iter(mine.values()))["shared"] == 0
    # the cached verdict is what a second load uses: change it and the load believes it
    key = next(iter(mine))
    cache[key]["shared"] = 5
    cache_path.write_text(json.dumps(cache))
    with pytest.raises(DataError, match="5 of 20"):
        MNISTConfig().load_splits(root)
    # a rewritten file is a new key: checked again (clean)
    test_file = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    st = test_file.stat()
    os.utime(test_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    MNISTConfig().load_splits(root)
    assert len({k for k, v in json.loads(cache_path.read_text()).items()
                if v["files"][0].startswith(str(root.resolve()))}) == 2


def test_a_symlinked_relative_or_home_root_is_the_same_data_set_with_one_cache_entry(tmp_path, monkeypatch):
    real = write_mnist(tmp_path / "store" / "d", n_train=50, n_test=20)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("HOME", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    spellings = [tmp_path / "link", Path("link"), Path("store/d/../d"), Path("~/d"), real]
    for root in spellings:
        assert resolve_data_root(str(root), None) == real.resolve()
        MNISTConfig().load_splits(root)
    cache = json.loads((cache_dir() / CACHE_FILE).read_text())
    mine = [v for v in cache.values() if "/store/d/" in v["files"][0]]
    assert len(mine) == 1 and mine[0]["files"][0] == str(real.resolve() / "MNIST" / "raw" / MNIST_FILES[0])
    # what a leak says names the canonical folder too
    leak = _mnist_with_a_leak(tmp_path / "store" / "leak", copies=1)
    with pytest.raises(DataError, match=f"in {leak.resolve()}/MNIST/raw: 1 of 20"):
        MNISTConfig().load_splits(Path("~/leak"))


@pytest.mark.mnist
def test_real_mnist_splits_are_disjoint():
    root = real_mnist_root()
    if root is None:
        pytest.skip("real MNIST not found")
    splits = MNISTConfig().load(root)
    assert isinstance(splits.train, ImageSet) and len(splits.test) == 10_000
    entry = next(v for v in json.loads((cache_dir() / CACHE_FILE).read_text()).values()
                 if v["files"][0].startswith(str(canonical_root(root))))
    assert entry["shared"] == 0 and entry["train"] == 60_000
