"""Labelled images from disk: a torchvision ``ImageFolder`` directory or a CSV manifest.

::

    train = load_images("photos/train", eval_transform(data_config(vit)))
    test = load_images("photos/test.csv", eval_transform(data_config(vit)), classes=train.classes)

Every problem is found before any training (``verify=True`` decodes every file) and reported
as an :class:`ImageDataError` naming the file, row or column and what to change. Each example
has a stable ``name`` and 63-bit ``id`` (:func:`example_id`) that does not depend on the other
files, so shard training and ``forget`` can refer to an example across reloads.

The names, ids and paths describe the private data: keep them out of logs and shared outputs.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

__all__ = ["ImageDataError", "ImageDataset", "ImageFiles", "example_id", "image_files", "load_images", "read_image",
           "IMAGE_SUFFIXES"]


def _openable_suffixes() -> frozenset[str]:
    """The file suffixes of the formats Pillow can open: ``registered_extensions`` also names
    formats it can only save (.pdf, .palm, ...), which ``Image.open`` refuses."""
    Image.init()  # load every format plugin, so that both tables are complete
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


#: File suffixes read as images (lower case): those Pillow has a decoder for.
IMAGE_SUFFIXES: frozenset[str] = _openable_suffixes()
_SHOWN = 5  # offending files or rows listed in one message


class ImageDataError(ValueError):
    """A data set on disk that cannot be used as it is: the message says which file and what to change."""


def example_id(name: str) -> int:
    """Stable 63-bit id of the example called ``name``: the first 8 bytes of BLAKE2b-64
    (``hashlib.blake2b(name.encode("utf-8"), digest_size=8)``) read big-endian, shifted right by
    one bit so it fits a signed 64-bit integer (0 <= id < 2**63)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class ImageDataset(Dataset):
    """Labelled images read lazily: ``dataset[i] = (transform(image), label)``.

    ``root``: the folder names are relative to (the ImageFolder root, or the CSV's folder);
    ``classes``: class names, label i is ``classes[i]``; ``paths``/``labels``/``names``/``ids``:
    per example, in data set order (``names``: the CSV ``id`` or the POSIX path relative to
    ``root``; ``ids``: :func:`example_id` of the names); ``transform``: PIL image -> tensor, or
    None for the image as a float tensor (3, H, W) in [0, 1], converted to RGB.
    """

    def __init__(self, root: Path, classes: Sequence[str], paths: Sequence[Path], labels: Sequence[int],
                 names: Sequence[str], transform: Callable[[Image.Image], Any] | None) -> None:
        self.root = root
        self.classes = tuple(classes)
        self.paths = tuple(paths)
        self.labels = tuple(labels)
        self.names = tuple(names)
        self.ids = tuple(example_id(n) for n in self.names)
        self.transform = transform
        _refuse_duplicates(self.names, "name")
        _refuse_duplicates(self.ids, "id")  # distinct names collide once in ~2**31 pairs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = read_image(self.paths[i])
        if self.transform is None:
            return pil_to_tensor(image.convert("RGB")).float() / 255.0, self.labels[i]
        return self.transform(image), self.labels[i]


class ImageFiles(Dataset):
    """Unlabelled images, e.g. to predict: ``dataset[i] = (transform(image), -1)`` for ``paths[i]``
    (the label -1 stands for "unknown"); a file that cannot be read is an :class:`ImageDataError`."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], Any]) -> None:
        self.paths = tuple(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(read_image(self.paths[i])), -1


def _refuse_duplicates(values: Sequence[Any], what: str) -> None:
    repeated = [v for v, count in Counter(values).items() if count > 1]
    if repeated:
        raise ImageDataError(f"{len(repeated)} {what}(s) used by several examples, e.g. {str(repeated[0])!r}: every "
                             "example needs its own file (and CSV id)")


def read_image(path: Path) -> Image.Image:
    """The decoded image at ``path``; an :class:`ImageDataError` naming it when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDataError(f"cannot read image {str(path)!r} ({type(err).__name__}: {err}): replace or "
                             "remove the file") from err


def _verify(path: Path) -> None:
    """Open ``path`` with PIL, check its structure (``verify``: chunk checksums) and decode it."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDataError(f"corrupt or unreadable image {str(path)!r} ({type(err).__name__}: {err}): replace "
                             "or remove the file") from err
    read_image(path)


def load_images(source: str | Path, transform: Callable[[Image.Image], Any] | None = None, *,
                classes: Sequence[str] | None = None, verify: bool = True) -> ImageDataset:
    """The labelled images of ``source``, as an :class:`ImageDataset`.

    ``source`` is either
      * a folder in torchvision ``ImageFolder`` layout: one sub-folder per class (class names
        sorted), its images at any depth below it. Hidden files and folders (names starting with
        ".", e.g. ``.DS_Store``) are skipped, as are files directly in ``source``; any other file
        whose suffix is not an image format Pillow reads (:data:`IMAGE_SUFFIXES`) is an error; or
      * a ``.csv`` manifest with a header row and columns ``path`` (relative to the CSV's folder)
        and ``label`` (class name), and optionally ``id`` (the example's name). Classes are the
        sorted labels, numerically when all labels are integers.

    ``transform``: PIL image (as stored: any mode) -> tensor, e.g.
    ``dp_taft.backbone.eval_transform(data_config(model))``, which also resizes and normalises
    as the model expects; None gives float RGB tensors in [0, 1] at the stored size.
    ``classes``: the training set's ``classes`` when loading an evaluation set: its labels must
    be among them and map to the training indices (some may be absent).
    ``verify``: open, check and decode every image now, so a bad file fails before any
    training, not in the middle of it (takes about one pass over the data).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files, found = _scan_folder(path)
        root, names = path, [f.relative_to(path).as_posix() for f in files]
    elif path.suffix.lower() == ".csv" and path.is_file():
        files, found, names = _read_manifest(path)
        root = path.parent
    else:
        raise ImageDataError(f"{str(path)!r} is neither a folder of class sub-folders nor a .csv manifest file: "
                             "check the path")
    classes = _resolve_classes(found, classes, str(path))
    index = {c: i for i, c in enumerate(classes)}
    dataset = ImageDataset(root, classes, files, [index[c] for c in found], names, transform)
    if verify:
        for f in dataset.paths:
            _verify(f)
    return dataset


def image_files(sources: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``sources`` (unlabelled, e.g. to predict): each an image file, or a
    folder searched recursively for image files (:data:`IMAGE_SUFFIXES`, hidden ones skipped), in
    the order given, each folder's files sorted. A missing path, a named file that is not an
    image, or nothing found at all is an :class:`ImageDataError`."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(f for f in source.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                            and not _hidden(f, source))
        elif source.is_file():
            if source.suffix.lower() not in IMAGE_SUFFIXES:
                raise ImageDataError(f"{str(source)!r} is not an image file (suffixes .png, .jpg, ...)")
            files.append(source)
        else:
            raise ImageDataError(f"{str(source)!r} does not exist: name image files or folders of images")
    if not files:
        raise ImageDataError(f"no image files in {', '.join(map(str, sources))}")
    return files


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _scan_folder(root: Path) -> tuple[list[Path], list[str]]:
    """(image files, their class names) of an ImageFolder-layout ``root``, sorted by class then path."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ImageDataError(f"{str(root)!r} has no class sub-folders: put each class's images in a folder named "
                             "after the class (root/cat/001.png, root/dog/002.png), or pass a .csv manifest")
    files: list[Path] = []
    labels: list[str] = []
    for d in class_dirs:
        found = sorted(f for f in d.rglob("*") if f.is_file() and not _hidden(f, root))
        others = [f for f in found if f.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            raise ImageDataError(f"non-image file(s) in class folder {str(d)!r}: "
                                 f"{', '.join(repr(str(f)) for f in others[:_SHOWN])}; move them out (image "
                                 "suffixes: .png, .jpg, ...; hidden files are skipped)")
        if not found:
            raise ImageDataError(f"class folder {str(d)!r} holds no image: add its images or remove the folder")
        files += found
        labels += [d.name] * len(found)
    return files, labels


def _read_manifest(path: Path) -> tuple[list[Path], list[str], list[str]]:
    """(image files, class names, example names) of a CSV manifest, in row order."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or ()]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise ImageDataError(f"CSV {str(path)!r} lacks column(s) {', '.join(missing)} (header has "
                                 f"{', '.join(columns) or 'nothing'}): the header must name the columns path, label "
                                 "and optionally id")
        reader.fieldnames = columns
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None})
                for row in reader]
    if not rows:
        raise ImageDataError(f"CSV {str(path)!r} has a header but no rows: list one image per row")
    files, labels, names, absent = [], [], [], []
    for line, row in rows:
        for column in ("path", "label") + (("id",) if "id" in columns else ()):
            if not row.get(column):
                raise ImageDataError(f"CSV {str(path)!r} line {line}: empty {column}: fill it in or remove the row")
        file = path.parent / row["path"]
        if not file.is_file():
            absent.append(f"line {line}: {row['path']!r}")
        files.append(file)
        labels.append(row["label"])
        names.append(row["id"] if "id" in columns else PurePosixPath(row["path"]).as_posix())
    _refuse_duplicates(files, "file")
    if absent:
        more = "; ..." if len(absent) > _SHOWN else ""
        raise ImageDataError(f"CSV {str(path)!r} lists {len(absent)} file(s) that do not exist (paths are relative to "
                             f"the CSV's folder): {'; '.join(absent[:_SHOWN])}{more}")
    return files, labels, names


def _resolve_classes(found: Sequence[str], training: Sequence[str] | None, source: str) -> tuple[str, ...]:
    """The class names labels index: ``training`` (checked to cover ``found``) or ``found``'s, sorted."""
    present = set(found)
    if training is None:
        if all(_is_int(c) for c in present):
            return tuple(sorted(present, key=lambda c: (int(c), c)))
        return tuple(sorted(present))
    training = tuple(str(c) for c in training)
    unknown = sorted(present - set(training))
    if unknown:
        raise ImageDataError(f"{source} has class(es) {', '.join(map(repr, unknown))} unknown to the training set, "
                             f"whose classes are {', '.join(map(repr, training))}: remove those examples or train "
                             "with them")
    return training


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
