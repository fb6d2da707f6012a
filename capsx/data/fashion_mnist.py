"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) through torchvision's own reader
(`torchvision.datasets.FashionMNIST`): MNIST's format and sizes, ten kinds of clothing.

torchvision reads the four uncompressed IDX files in `<root>/FashionMNIST/raw/`.
The files are published gzipped, and that is how Debian's `dataset-fashion-mnist`
package installs them (in /usr/share/datasets/fashion-mnist/), so when the
uncompressed files are missing, the .gz files found in raw/ or in the Debian
folder are unpacked into raw/ once, by torchvision's own `extract_archive`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from capsx.data.config import DataConfig, register_dataset
from capsx.data.files import require_files
from capsx.data.imageset import DataSplits, Examples
from capsx.data.mnist import MNIST_FILES, read_idx_splits, read_idx_test
from capsx.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def raw_folder(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def unpack_gz_files(root: Path, gz_dirs: list[Path]) -> None:
    """Unpack every missing IDX file of root/FashionMNIST/raw/ from the first of `gz_dirs` that holds its .gz."""
    raw = raw_folder(root)
    for name in MNIST_FILES:
        gz = next((d / f"{name}.gz" for d in gz_dirs if (d / f"{name}.gz").is_file()), None)
        if (raw / name).is_file() or gz is None:
            continue
        try:
            raw.mkdir(parents=True, exist_ok=True)
            from torchvision.datasets.utils import extract_archive

            extract_archive(str(gz), str(raw))  # -> raw/<name>
        except (OSError, EOFError) as e:  # unwritable root, truncated or not-gzip .gz
            raise DataError(f"Fashion-MNIST: could not unpack {gz} into {raw}: {e} "
                            "(point --data-root or CAPSX_DATA at a writable folder)") from None


@register_dataset
class FashionMNISTConfig(DataConfig):
    """`data: {name: fashion-mnist}`: 60,000 + 10,000 28x28 grey clothing images,
    read from `<root>/FashionMNIST/raw/` (unpacked there from Debian's .gz files if need be)."""

    name: Literal["fashion-mnist"] = "fashion-mnist"
    root: str | None = None  # folder holding FashionMNIST/raw/; relative to the recipe file
    download: bool = False  # fetch the files with torchvision when they are missing

    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    classes: ClassVar[list[str]] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                    "Sneaker", "Bag", "Ankle boot"]
    needs_root: ClassVar[bool] = True

    def load(self, root: Path) -> DataSplits:
        self._require(root, MNIST_FILES)
        return read_idx_splits("FashionMNIST", root, self.download, self.classes)

    def load_test(self, root: Path) -> Examples:
        self._require(root, MNIST_FILES[2:])
        return read_idx_test("FashionMNIST", root, self.download)

    def _require(self, root: Path, names: list[str]) -> None:
        raw = raw_folder(root)
        unpack_gz_files(root, [raw, DEBIAN_DIR])
        if not self.download:
            require_files("Fashion-MNIST", raw, names, holder="FashionMNIST/",
                          how_to_get=f"apt-get install dataset-fashion-mnist (its .gz files in {DEBIAN_DIR} are "
                                     f"unpacked into {raw}), or add --set data.download=true to fetch it")
