"""Your own images: `data.name: imagefolder` on folders these tests write (PNG and JPEG, grey and RGB, odd
sizes, broken and foreign files, copies across the splits), and `capsx predict` on a run trained on one."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from capsx.cli import app
from capsx.data.imagefolder import ImageFolderConfig, read_photo
from capsx.errors import DataError
from capsx.recipe import recipe_from_dict
from tests.conftest import TINY_CAPSNET, tiny_recipe, write_image_folder

runner = CliRunner()
CLASSES = ["cat", "dog", "eel"]
CNN = {"name": "convnet_small", "channels": [8, 16], "hidden": [32]}


def _folder(root: Path, per_class: int = 12, test: int = 4) -> Path:
    write_image_folder(root / "train", CLASSES, per_class, seed=0)
    write_image_folder(root / "test", CLASSES, test, seed=1, suffix=".jpg", size=(31, 52))  # JPEG, another size
    return root


def test_a_train_and_test_folder_load_as_uint8_images_with_the_folders_as_classes(tmp_path):
    root = _folder(tmp_path / "pics")
    (root / "train" / "dog" / "grey.png").unlink(missing_ok=True)
    Image.fromarray(np.full((9, 14), 77, np.uint8), "L").save(root / "train" / "dog" / "grey.png")  # a grey file
    for channels in (1, 3):
        splits = ImageFolderConfig(size=20, channels=channels).load_splits(root)
        assert splits.classes == CLASSES
        assert splits.train.images.shape == (37, channels, 20, 20) and splits.train.images.dtype == torch.uint8
        assert splits.test.images.shape == (12, channels, 20, 20)
        assert torch.bincount(splits.train.labels).tolist() == [12, 13, 12]
        assert torch.bincount(splits.test.labels).tolist() == [4, 4, 4]
    grey = read_photo(root / "train" / "dog" / "grey.png", 20, 3)
    assert grey.shape == (3, 20, 20) and (grey == 77).all()  # a grey picture for an RGB data set: 3 equal planes


def test_resize_crop_pad_and_stretch_by_hand(tmp_path):
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 200  # the middle third bright
    Image.fromarray(wide, "L").save(tmp_path / "wide.png")
    crop = read_photo(tmp_path / "wide.png", 10, 1, "crop")[0]  # the central 10x10: all of the bright third
    assert crop.shape == (10, 10) and (crop == 200).all()
    pad = read_photo(tmp_path / "wide.png", 15, 1, "pad")[0]  # 30x10 -> 15x5 in the middle rows, black around
    assert (pad[:5] == 0).all() and (pad[10:] == 0).all() and (pad[5:10, 6:9] == 200).all()
    stretch = read_photo(tmp_path / "wide.png", 15, 1, "stretch")[0]  # 30 -> 15 wide, 10 -> 15 high: a third stays
    assert (stretch[:, 6:9] == 200).all() and (stretch[:, :4] == 0).all() and (stretch[:, 11:] == 0).all()


def test_one_folder_split_by_a_seeded_test_fraction_per_class(tmp_path):
    write_image_folder(tmp_path / "all", CLASSES, 10)
    cfg = ImageFolderConfig(size=16, test_fraction=0.3)
    a, b = cfg.load_splits(tmp_path / "all"), cfg.load_splits(tmp_path / "all")
    assert torch.bincount(a.test.labels).tolist() == [3, 3, 3] and torch.bincount(a.train.labels).tolist() == [7] * 3
    assert torch.equal(a.test.images, b.test.images)
    other = ImageFolderConfig(size=16, test_fraction=0.3, split_seed=1).load_splits(tmp_path / "all")
    assert not torch.equal(other.test.images, a.test.images)
    with pytest.raises(DataError, match=r"no train/ and test/ folders; set data.test_fraction"):
        ImageFolderConfig(size=16).load_splits(tmp_path / "all")


@pytest.mark.parametrize("make,words", [
    (lambda d: (d / "train" / "cat" / "notes.txt").write_text("not a picture"),
     ["train/cat/notes.txt: not an image file", "data.skip_bad: true"]),
    (lambda d: (d / "train" / "dog" / "broken.png").write_bytes((d / "train" / "dog" / "0.png").read_bytes()[:60]),
     ["train/dog/broken.png: cannot be decoded", "data.skip_bad: true"]),
    (lambda d: (d / "train" / "eel" / "fake.jpg").write_bytes(b"\xff\xd8 this is no JPEG"),
     ["train/eel/fake.jpg: not an image Pillow can read"]),
    (lambda d: Image.new("RGB", (5000, 4000)).save(d / "train" / "cat" / "huge.png"),
     ["train/cat/huge.png: 5000x4000 pixels is more than data.max_pixels (10,000,000)"]),
])
def test_a_file_that_is_no_readable_image_is_one_line_naming_it_or_skipped_with_a_count(tmp_path, make, words):
    root = _folder(tmp_path / "pics")
    make(root)
    with pytest.raises(DataError) as e:
        ImageFolderConfig(size=16, max_pixels=10_000_000).load_splits(root)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    splits = ImageFolderConfig(size=16, max_pixels=10_000_000, skip_bad=True).load_splits(root)
    assert len(splits.train) == 36 and len(splits.notes) == 1 and "skipped 1 file(s)" in splits.notes[0]


@pytest.mark.parametrize("make,words", [
    (lambda d: (d / "train" / "fox").mkdir(), ["train/fox: an empty class folder"]),
    (lambda d: (d / "test" / "owl").mkdir(), ["test has class folder(s) owl that", "train has not"]),
    (lambda d: [p.unlink() for p in (d / "test").rglob("*.jpg")] and None, ["no test images in"]),
    (lambda d: __import__("shutil").rmtree(d / "test"), ["has train/ but no test/ folder", "data.test_fraction"]),
    (lambda d: Image.open(d / "train" / "cat" / "3.png").save(d / "test" / "dog" / "copy.png"),
     ["1 test image(s) are pixel copies of train images", "test/dog/copy.png = ", "train/cat/3.png"]),
])
def test_a_folder_of_the_wrong_shape_is_one_line_saying_what_to_do(tmp_path, make, words):
    root = _folder(tmp_path / "pics")
    make(root)
    with pytest.raises(DataError) as e:
        ImageFolderConfig(size=16).load_splits(root)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_the_decoded_folder_is_cached_outside_it_until_a_file_changes(tmp_path):
    root = _folder(tmp_path / "pics")
    before = sorted(p for p in root.rglob("*"))
    cfg = ImageFolderConfig(size=16)
    cfg.load_splits(root)
    assert sorted(p for p in root.rglob("*")) == before  # nothing written into the data folder
    cached = list((Path(os.environ["CAPSX_CACHE"]) / "imagefolder").glob("*.pt"))
    assert len(cached) >= 2  # train and test
    # the same length and modification time, other pixels: the cache answers (the file was not read again)
    target = root / "train" / "cat" / "0.bmp"  # uncompressed: a changed pixel keeps the file's length
    Image.new("RGB", (20, 20), (90, 90, 90)).save(target)
    first = cfg.load_splits(root)
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # the last pixel's last byte
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert torch.equal(cfg.load_splits(root).train.images, first.train.images)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: read again
    assert not torch.equal(cfg.load_splits(root).train.images, first.train.images)


def _train(workdir: Path, root: Path, model: dict, name: str, epochs: int) -> Path:
    recipe = workdir / f"{name}.yaml"
    raw = tiny_recipe(model=model, data={"name": "imagefolder", "size": 28, "channels": 1, "batch_size": 12},
                      train={"epochs": epochs, "seed": 0}, name=name, optimizer={"name": "adam", "lr": 3e-3},
                      tracking={"pictures_every": 0})
    recipe.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["train", str(recipe), "--data-root", str(root), "--no-track"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return next((workdir / "runs" / name).glob("*/run.json")).parent


def test_train_on_a_folder_then_predict_files_and_folders_as_the_training_read_them(workdir):
    root = _folder(workdir / "pics", per_class=16)
    run_dir = _train(workdir, root, CNN, "mine", epochs=3)
    kept = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert kept["data"]["class_names"] == CLASSES  # kept with the run, for pictures and predict
    res = runner.invoke(app, ["eval", "latest", "--data-root", str(root), "--no-log"])
    assert res.exit_code == 0 and "eel" in res.output, res.output

    # a test file as predict reads it scores what the model gives the same image as the training read it
    from capsx.train.checkpoint import Checkpoint
    from capsx.train.loop import load_model

    rec, model = load_model(Checkpoint.read(run_dir / "checkpoints" / "best.pt"), torch.device("cpu"))
    test = rec.data.load_splits(root).test
    with torch.no_grad():
        expected = torch.softmax(model.eval()(test.images[:1].float() / 255).scores, 1)[0]
    first = sorted((root / "test" / "cat").glob("*.jpg"), key=lambda p: p.name)[0]
    res = runner.invoke(app, ["predict", "latest", str(first), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["classes"] == CLASSES and out["scores"] == "softmax probabilities"
    (p,) = out["predictions"]
    assert [p["scores"][c] for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)
    assert p["top"][0][0] == CLASSES[int(expected.argmax())]

    # a folder, a file, the table and a CSV
    res = runner.invoke(app, ["predict", "latest", str(root / "test" / "dog"), str(first), "--top", "2",
                              "--csv", str(workdir / "out.csv")])
    assert res.exit_code == 0, res.output
    assert "5 image(s), softmax probabilities" in res.output and "#2" in res.output and "#3" not in res.output
    rows = (workdir / "out.csv").read_text().splitlines()
    assert rows[0] == "file,top1,top1_score,top2,top2_score,cat,dog,eel" and len(rows) == 6

    (workdir / "empty").mkdir()
    for args, words in ((["latest", str(workdir / "empty")], "no image files in this folder"),
                        (["latest", str(workdir / "nope.png")], "no such file or folder"),
                        (["latest", str(workdir / "mine.yaml")], "not an image Pillow can read")):
        res = runner.invoke(app, ["predict", *args])
        assert res.exit_code == 2 and words in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_predict_reconstruct_draws_a_capsnets_decoding_of_each_image(workdir):
    root = _folder(workdir / "pics", per_class=6, test=2)
    run_dir = _train(workdir, root, dict(TINY_CAPSNET), "caps", epochs=1)
    files = sorted((root / "test" / "eel").glob("*.jpg"))
    res = runner.invoke(app, ["predict", "latest", *map(str, files), "--reconstruct"])
    assert res.exit_code == 0, res.output
    assert "capsule lengths" in res.output
    with Image.open(run_dir / "pictures" / "recon_images.png") as im:
        assert im.width > 2 * 28 and im.height > 2 * 28  # two inputs above their two decodings, captioned


def test_a_folder_of_2200_small_images_loads_then_comes_from_the_cache(tmp_path, capsys):
    """Not a timing test: it prints the times (for the README) and checks the cache gives the same tensors."""
    write_image_folder(tmp_path / "big" / "train", [f"c{k}" for k in range(10)], 200, size=(32, 32))
    write_image_folder(tmp_path / "big" / "test", [f"c{k}" for k in range(10)], 20, seed=1, size=(32, 32))
    cfg = ImageFolderConfig(size=32)
    started = time.perf_counter()
    first = cfg.load_splits(tmp_path / "big")
    read = time.perf_counter() - started
    started = time.perf_counter()
    again = cfg.load_splits(tmp_path / "big")
    cached = time.perf_counter() - started
    assert torch.equal(first.train.images, again.train.images) and len(first.train) == 2000
    with capsys.disabled():
        print(f"\nimagefolder: 2,200 32x32 PNGs read in {read:.2f} s, from the cache in {cached:.2f} s")


def test_summary_of_a_folder_recipe_without_its_folder_says_what_to_do():
    res = runner.invoke(app, ["summary", str(Path(__file__).parents[1] / "recipes" / "imagefolder-capsnet.yaml")])
    assert res.exit_code == 2 and "point data.root at your image folder" in res.output, res.output
    res = runner.invoke(app, ["summary", str(Path(__file__).parents[1] / "recipes" / "imagefolder-capsnet.yaml"),
                              "--classes", "5"])
    assert res.exit_code == 0 and "(5, 16)" in res.output, res.output


def test_the_recipe_validates_its_reading_settings():
    from capsx.errors import RecipeError

    for bad, words in (({"channels": 2}, "data.channels"), ({"resize": "zoom"}, "data.resize"),
                       ({"test_fraction": 1.5}, "data.test_fraction"), ({"class_names": ["a", "a"]}, "distinct")):
        with pytest.raises(RecipeError, match=words):
            recipe_from_dict(tiny_recipe(data={"name": "imagefolder", **bad}), "t")
