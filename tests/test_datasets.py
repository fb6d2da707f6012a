"""Fashion-MNIST, CIFAR-10, SVHN and smallNORB through their real readers, on files these tests
write in each data set's exact on-disk format (and on Debian's real Fashion-MNIST when installed);
the crop augmentation; and a tiny CLI training on each into a real MLflow store."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from capsx.cli import app
from capsx.data import Batches, ImageSet, center_crop, random_crop
from capsx.data.cifar10 import CIFAR10Config
from capsx.data.fashion_mnist import DEBIAN_DIR, FashionMNISTConfig
from capsx.data.smallnorb import SmallNORBConfig, read_norb_matrix
from capsx.data.svhn import SVHNConfig
from capsx.errors import DataError, RecipeError
from capsx.recipe import recipe_from_dict
from tests.conftest import (
    CIFAR10_CLASSES,
    NORB_PREFIX,
    TINY_CAPSNET,
    tiny_recipe,
    write_cifar10,
    write_mnist,
    write_norb_matrix,
    write_smallnorb,
    write_svhn,
)

runner = CliRunner()

# ---------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_reads_the_pickled_batches_in_their_pixel_order(tmp_path):
    root = write_cifar10(tmp_path, n_per_batch=20, n_test=40)
    splits = CIFAR10Config().load_splits(root)
    assert splits.train.images.shape == (100, 3, 32, 32) and splits.test.images.shape == (40, 3, 32, 32)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    batch = pickle.loads((root / "cifar-10-batches-py" / "data_batch_2").read_bytes())
    # data_batch_2 holds images 20..39; each row is 1024 red, then 1024 green, then 1024 blue values
    assert np.array_equal(splits.train.images[20:40].numpy(), batch["data"].reshape(20, 3, 32, 32))
    assert splits.train.labels[20:40].tolist() == batch["labels"]
    assert splits.classes == CIFAR10_CLASSES


def test_cifar10_missing_files_name_them_the_folder_and_the_flag(tmp_path):
    with pytest.raises(DataError) as e:
        CIFAR10Config().load_splits(tmp_path)
    msg = str(e.value)
    assert "data_batch_1" in msg and "test_batch" in msg and "batches.meta" in msg
    assert str(tmp_path / "cifar-10-batches-py") in msg and "--set data.download=true" in msg


def test_cifar10_truncated_batch_is_a_data_error(tmp_path):
    root = write_cifar10(tmp_path)
    f = root / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(DataError, match="CIFAR-10 files in .* could not be read"):
        CIFAR10Config().load_splits(root)


# ---------------------------------------------------------------------------------------------
# SVHN


def test_svhn_reads_the_mat_files_and_maps_label_10_to_0(tmp_path):
    from scipy.io import loadmat

    root = write_svhn(tmp_path, n_train=50, n_test=20)
    splits = SVHNConfig().load_splits(root)
    assert splits.train.images.shape == (50, 3, 32, 32) and splits.test.images.shape == (20, 3, 32, 32)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    mat = loadmat(str(root / "svhn" / "train_32x32.mat"))
    X, y = mat["X"], mat["y"].ravel()
    i = int(np.argmax(y == 10))  # an image of the digit 0
    assert splits.train.labels[i] == 0 and set(splits.train.labels.tolist()) <= set(range(10))
    assert splits.train.labels.tolist() == [0 if v == 10 else int(v) for v in y]
    assert np.array_equal(splits.train.images[7].numpy(), X[:, :, :, 7].transpose(2, 0, 1))  # (H, W, C, N) -> CHW


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_a_test_image_copied_from_the_train_split_is_refused(tmp_path, name):
    """The train/test disjointness check of the MNIST-format sets, on CIFAR-10's pickles and SVHN's .mat
    files: two test images made pixel copies of train images is an error counting them."""
    from scipy.io import loadmat, savemat

    if name == "cifar10":
        root = write_cifar10(tmp_path)
        folder = root / "cifar-10-batches-py"
        train = pickle.loads((folder / "data_batch_3").read_bytes())
        test = pickle.loads((folder / "test_batch").read_bytes())
        test["data"][[4, 9]] = train["data"][[0, 5]]
        (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
        config, label = CIFAR10Config(), "CIFAR-10"
    else:
        root = write_svhn(tmp_path)
        folder = root / "svhn"
        train, test = (loadmat(str(folder / f"{s}_32x32.mat")) for s in ("train", "test"))
        test["X"][..., [4, 9]] = train["X"][..., [0, 5]]
        savemat(folder / "test_32x32.mat", {"X": test["X"], "y": test["y"]})
        config, label = SVHNConfig(), "SVHN"
    with pytest.raises(DataError, match=rf"^{label} in .*: 2 of 40 test image\(s\) also appear in the train split"):
        config.load_splits(root)


def test_svhn_missing_files_name_them_the_folder_and_the_flag(tmp_path):
    with pytest.raises(DataError) as e:
        SVHNConfig().load_splits(tmp_path)
    msg = str(e.value)
    assert "train_32x32.mat" in msg and "test_32x32.mat" in msg and str(tmp_path / "svhn") in msg
    assert "--set data.download=true" in msg


def test_svhn_file_that_is_not_a_mat_file_is_a_data_error(tmp_path):
    root = write_svhn(tmp_path)
    (root / "svhn" / "test_32x32.mat").write_bytes(b"not a matlab file at all")
    with pytest.raises(DataError, match="SVHN test files in .* could not be read"):
        SVHNConfig().load_splits(root)


# ---------------------------------------------------------------------------------------------
# smallNORB


@pytest.mark.parametrize("gz", [False, True], ids=["mat", "mat.gz"])
@pytest.mark.parametrize("array", [
    np.arange(2 * 2 * 5 * 3, dtype=np.uint8).reshape(2, 2, 5, 3),  # like -dat: 4 dimensions
    np.array([4, 0, 3, 1], dtype=np.int32),  # like -cat: 1 dimension, the header still holds 3 sizes
    np.array([[1, 2, 3, 4], [-5, 6, 7, 8]], dtype=np.int32),  # like -info: 2 dimensions
], ids=["bytes-4d", "int32-1d", "int32-2d"])
def test_norb_matrix_header_roundtrip(tmp_path, array, gz):
    path = tmp_path / "m.mat"
    write_norb_matrix(path, array, gz=gz)
    got = read_norb_matrix(path.with_name(path.name + ".gz") if gz else path)
    assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)


def test_norb_header_written_by_hand_for_a_1d_int_file(tmp_path):
    path = tmp_path / "cat.mat"
    # magic 0x1E3D4C54 (int32), ndim 1, sizes 3, 1, 1, then 3 little-endian int32s
    path.write_bytes(bytes.fromhex("544c3d1e" "01000000" "03000000" "01000000" "01000000"
                                   "02000000" "00000000" "04000000"))
    assert read_norb_matrix(path).tolist() == [2, 0, 4]


@pytest.mark.parametrize("blob, words", [
    (bytes.fromhex("514c3d1e" "01000000" "01000000" "01000000" "01000000") + b"\0" * 4, ["magic number 0x1e3d4c51"]),
    (bytes.fromhex("554c3d1e" "01000000" "05000000" "01000000" "01000000") + b"\0" * 3, ["[5]", "3 bytes follow"]),
    (b"\x55\x4c", ["too short"]),
])
def test_norb_bad_header_is_a_data_error(tmp_path, blob, words):
    path = tmp_path / "bad.mat"
    path.write_bytes(blob)
    with pytest.raises(DataError) as e:
        read_norb_matrix(path)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_smallnorb_pairs_are_resized_to_48_by_2x2_averages_with_labels_and_info(tmp_path):
    root = write_smallnorb(tmp_path, n_train=12, n_test=6)
    folder = root / "smallnorb"
    dat = read_norb_matrix(folder / f"{NORB_PREFIX['train']}-dat.mat")
    info = read_norb_matrix(folder / f"{NORB_PREFIX['train']}-info.mat")
    splits = SmallNORBConfig().load_splits(root)
    assert splits.train.images.shape == (12, 2, 48, 48) and splits.test.images.shape == (6, 2, 48, 48)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert splits.train.labels.tolist() == read_norb_matrix(folder / f"{NORB_PREFIX['train']}-cat.mat").tolist()
    # pixel (r, c) of the 48x48 image is the mean of the 2x2 block (2r..2r+1, 2c..2c+1), rounded
    for n, ch, r, c in [(0, 0, 0, 0), (3, 1, 20, 17), (11, 0, 47, 47)]:
        block = dat[n, ch, 2 * r:2 * r + 2, 2 * c:2 * c + 2].astype(np.float64)
        assert splits.train.images[n, ch, r, c] == np.round(block.mean())
    assert splits.train.extras["azimuth"].tolist() == info[:, 2].tolist()
    assert splits.train.extras["lighting"].tolist() == info[:, 3].tolist()


def test_smallnorb_reads_the_gzipped_files_nyu_serves(tmp_path):
    plain = SmallNORBConfig().load_splits(write_smallnorb(tmp_path / "plain", n_train=8, n_test=4))
    zipped = SmallNORBConfig().load_splits(write_smallnorb(tmp_path / "gz", n_train=8, n_test=4, gz=True))
    assert torch.equal(plain.train.images, zipped.train.images) and torch.equal(plain.test.labels, zipped.test.labels)


def test_smallnorb_missing_files_name_them_and_the_url(tmp_path):
    with pytest.raises(DataError) as e:
        SmallNORBConfig().load_splits(tmp_path)
    msg = str(e.value)
    assert "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat" in msg and "testing-info.mat" in msg
    assert str(tmp_path / "smallnorb") in msg and "https://cs.nyu.edu/~yann/data/norb-v1.0-small/" in msg


def test_smallnorb_category_count_mismatch_is_a_data_error(tmp_path):
    root = write_smallnorb(tmp_path, n_train=8, n_test=4)
    write_norb_matrix(root / "smallnorb" / f"{NORB_PREFIX['test']}-cat.mat", np.zeros(3, np.int32))
    with pytest.raises(DataError, match=r"4 image pairs, categories \(3,\)"):
        SmallNORBConfig().load_splits(root)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_fashion_mnist_unpacks_gz_files_in_raw_and_reads_them_through_torchvision(tmp_path):
    src = write_mnist(tmp_path / "src", n_train=30, n_test=10) / "MNIST" / "raw"
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in src.iterdir():
        (raw / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    splits = FashionMNISTConfig().load_splits(tmp_path / "data")
    assert splits.train.images.shape == (30, 1, 28, 28) and splits.test.images.shape == (10, 1, 28, 28)
    assert (raw / "train-images-idx3-ubyte").read_bytes() == (src / "train-images-idx3-ubyte").read_bytes()
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot"


def test_fashion_mnist_missing_files_say_apt_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr("capsx.data.fashion_mnist.DEBIAN_DIR", tmp_path / "no-debian-package")
    with pytest.raises(DataError) as e:
        FashionMNISTConfig().load_splits(tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--set data.download=true" in msg


def test_fashion_mnist_is_read_from_the_debian_packages_folder_when_the_root_has_none(tmp_path, monkeypatch):
    """After `apt-get install dataset-fashion-mnist` nothing more to do: its four .gz files (here written
    by the test in the package's layout) are unpacked into the data root's FashionMNIST/raw and read."""
    src = write_mnist(tmp_path / "src", n_train=30, n_test=10) / "MNIST" / "raw"
    debian = tmp_path / "usr-share-fashion-mnist"
    debian.mkdir()
    for f in src.iterdir():
        (debian / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    monkeypatch.setattr("capsx.data.fashion_mnist.DEBIAN_DIR", debian)
    splits = FashionMNISTConfig().load_splits(tmp_path / "root")
    assert splits.train.images.shape == (30, 1, 28, 28) and splits.test.images.shape == (10, 1, 28, 28)
    assert (tmp_path / "root" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes() == (
        src / "t10k-labels-idx1-ubyte").read_bytes()


def debian_fashion_mnist() -> Path:
    if not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (fills {DEBIAN_DIR})")
    return DEBIAN_DIR


def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    debian_fashion_mnist()
    splits = FashionMNISTConfig().load_splits(tmp_path)  # an empty root: unpacked from the Debian folder
    assert splits.train.images.shape == (60_000, 1, 28, 28) and splits.test.images.shape == (10_000, 1, 28, 28)
    assert splits.train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    assert sorted(p.name for p in (tmp_path / "FashionMNIST" / "raw").iterdir()) == sorted(
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])


# ---------------------------------------------------------------------------------------------
# Cropping


def _position_images(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """Pixel value = 16 * row + column (mod 256), so a crop's top-left value gives its position."""
    rows = torch.arange(h).view(h, 1) * 16 + torch.arange(w).view(1, w)
    return rows.expand(n, c, h, w).to(torch.uint8).clone()


def test_random_crop_takes_each_image_its_own_window():
    images = _position_images(64, 3, 12, 12)
    out = random_crop(images, 8, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 8, 8) and out.dtype == torch.uint8
    tops, lefts = out[:, 0, 0, 0] // 16, out[:, 0, 0, 0] % 16
    for i in range(64):
        t, left = int(tops[i]), int(lefts[i])
        assert torch.equal(out[i], images[i, :, t:t + 8, left:left + 8])
    assert set(tops.tolist()) == set(range(5)) and set(lefts.tolist()) == set(range(5))  # every offset 0..4 occurs


def test_center_crop_takes_the_middle():
    images = _position_images(2, 2, 48, 48)
    out = center_crop(images, 32)
    assert out.shape == (2, 2, 32, 32) and torch.equal(out, images[:, :, 8:40, 8:40])
    assert torch.equal(center_crop(_position_images(1, 1, 7, 7), 4), _position_images(1, 1, 7, 7)[:, :, 1:5, 1:5])


def test_batches_crop_after_shift_and_replay_exactly():
    data = ImageSet(_position_images(20, 1, 16, 16), torch.arange(20))
    batches = Batches(data, 6, shuffle=True, seed=3, shift=2, crop=10)
    first = list(batches.epoch(0))
    assert [x.shape for x, _, _ in first] == [(6, 1, 10, 10)] * 3 + [(2, 1, 10, 10)]
    again = list(batches.epoch(0, start_step=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], again, strict=True))


def test_crop_sets_the_model_input_and_centre_crops_the_test_split(tmp_path):
    root = write_smallnorb(tmp_path, n_train=8, n_test=4)
    r = recipe_from_dict(tiny_recipe(data={"name": "smallnorb", "augment": {"crop": 32}}), "t")
    assert r.data.input_shape == (2, 32, 32)
    uncropped = SmallNORBConfig().load_splits(root)
    splits = r.data.load_splits(root)
    assert splits.train.images.shape[-2:] == (48, 48)  # cropped at random per batch
    assert torch.equal(splits.test.images, uncropped.test.images[:, :, 8:40, 8:40])
    assert recipe_from_dict(tiny_recipe(data={"name": "cifar10"}), "t").data.input_shape == (3, 32, 32)


def test_a_crop_larger_than_the_images_is_a_recipe_error():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(tiny_recipe(data={"name": "cifar10", "augment": {"crop": 40}}), "r.yaml")
    assert str(e.value) == "r.yaml: data: augment.crop 40 is larger than cifar10's 32x32 images"


# ---------------------------------------------------------------------------------------------
# End to end: a tiny CLI training on each data set's files into a real MLflow store


def _train(workdir: Path, data: dict, model: dict, root: Path, *args: str):
    path = workdir / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(data=data, model=model)))
    return runner.invoke(app, ["train", str(path), "--data-root", str(root), *args], catch_exceptions=False)


def _finished_run(workdir: Path):
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    return client, run


@pytest.mark.parametrize("writer, data, model, shape", [
    (write_cifar10, {"name": "cifar10", "augment": {"crop": 24}},
     {**TINY_CAPSNET, "none_of_the_above": True}, (3, 24, 24)),
    (write_svhn, {"name": "svhn", "augment": {"shift": 2}},
     {**TINY_CAPSNET, "primary_dim": 6, "class_dim": 8}, (3, 32, 32)),
    (write_smallnorb, {"name": "smallnorb", "augment": {"crop": 32}}, dict(TINY_CAPSNET), (2, 32, 32)),
    (write_cifar10, {"name": "cifar10", "augment": {"crop": 24, "shift": 2}},
     {"name": "convnet_small", "channels": [4, 8], "hidden": [16]}, (3, 24, 24)),
], ids=["cifar10-capsnet", "svhn-capsnet", "smallnorb-capsnet", "cifar10-cnn"])
def test_cli_trains_on_each_data_set_into_mlflow(workdir, writer, data, model, shape):
    root = writer(workdir / "data")
    res = _train(workdir, {**data, "batch_size": 16}, model, workdir / "data")
    assert res.exit_code == 0, res.output
    client, run = _finished_run(workdir)
    assert run.data.tags["capsx.data"] == data["name"]
    test_error = client.get_metric_history(run.info.run_id, "test/error")
    test_acc = client.get_metric_history(run.info.run_id, "test/acc")
    assert len(test_error) == 1 and test_error[0].value == pytest.approx(1 - test_acc[0].value, abs=1e-12)
    logged = set(run.data.metrics)
    assert {"train/loss", "train/acc"} <= logged
    if model["name"] == "capsnet":  # margin + weighted reconstruction; a CNN's one cross-entropy
        assert {"train/margin_loss", "train/recon_loss"} <= logged and "train/ce_loss" not in logged
        assert client.get_metric_history(run.info.run_id, "train/recon_loss")  # the decoder rebuilt C x H x W
    else:
        assert "train/ce_loss" in logged and not logged & {"train/margin_loss", "train/recon_loss"}
        assert run.data.metrics["train/ce_loss"] == pytest.approx(run.data.metrics["train/loss"], rel=1e-6)
    if data["name"] != "svhn" and model["name"] == "capsnet":  # pictures of 3 channels + none of the above, 2 channels
        pictures = next(workdir.glob("runs/tiny/*/pictures"))
        for name in ("routing_couplings.png", "recon_test.png"):
            (pictures / name).unlink(missing_ok=True)  # the epoch pictures drew them: draw them again
        res = runner.invoke(app, ["visualize", "routing", "--data-root", str(root)], catch_exceptions=False)
        assert res.exit_code == 0 and (pictures / "routing_couplings.png").is_file(), res.output
        res = runner.invoke(app, ["reconstruct", "--count", "4", "--data-root", str(root)], catch_exceptions=False)
        assert res.exit_code == 0 and (pictures / "recon_test.png").is_file(), res.output
        with Image.open(pictures / "recon_test.png") as im:  # 4 inputs above 4 decodings: 4 tiles wide
            assert im.width > 4 * shape[2] and im.height > 2 * shape[1]
    payload = torch.load(next(workdir.glob("runs/tiny/*/checkpoints/best.pt")), weights_only=False)
    assert payload["recipe"]["data"]["augment"].get("crop") == data["augment"].get("crop")
    first = next(v for k, v in payload["model"].items() if v.dim() == 4)  # the first conv's weight
    assert first.shape[1] == shape[0]


def test_cli_missing_data_set_is_one_line_with_the_flag(workdir):
    res = _train(workdir, {"name": "cifar10"}, dict(TINY_CAPSNET), workdir / "nothing")
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "CIFAR-10 not found" in res.output
    assert "data.download=true" in res.output
    assert "Traceback" not in res.output


def test_cli_trains_on_a_subset_of_real_fashion_mnist(workdir):
    debian_fashion_mnist()
    res = _train(workdir, {"name": "fashion-mnist", "subset": 600, "test_subset": 200, "batch_size": 32},
                 {"name": "convnet_small", "channels": [8, 16], "hidden": [64]}, workdir / "data",
                 "--set", "train.epochs=2", "--set", "optimizer.lr=3e-3")
    assert res.exit_code == 0, res.output
    client, run = _finished_run(workdir)
    errors = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "test/error"), key=lambda m: m.step)]
    assert errors[-1] < 0.5  # ten classes: chance is 0.9; a small CNN gets well under half wrong in two epochs

