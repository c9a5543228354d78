"""dp_taft.images: ImageFolder and CSV data sets from disk, their errors, ids, and mixed sizes through fit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dp_taft
from dp_taft.backbone import data_config, eval_transform
from dp_taft.images import IMAGE_SUFFIXES, ImageDataError, example_id, load_images
from dp_taft.privacy.data import collate_examples
from dp_taft.train import evaluate


def _png(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> np.ndarray:
    """A random image of ``size`` (width, height) written to ``path``; returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def folder(tmp_path) -> Path:
    """cat: a grey 20x20 and an RGB 24x16 image (plus a hidden .DS_Store); dog: two RGB images, one nested."""
    root = tmp_path / "train"
    _png(root / "cat" / "001.png", (20, 20), "L", seed=1)
    _png(root / "cat" / "002.png", (24, 16), seed=2)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1junk")
    _png(root / "dog" / "003.png", (30, 30), seed=3)
    _png(root / "dog" / "more" / "004.png", (28, 28), seed=4)
    (root / "README.txt").write_text("files beside the class folders are ignored")
    return root


def _blake(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 1


def test_image_folder_classes_labels_names_ids(folder):
    data = load_images(folder)
    assert data.classes == ("cat", "dog") and data.root == folder
    assert data.names == ("cat/001.png", "cat/002.png", "dog/003.png", "dog/more/004.png")
    assert data.labels == (0, 0, 1, 1) and len(data) == 4
    assert data.paths[3] == folder / "dog" / "more" / "004.png"
    assert data.ids == tuple(_blake(n) for n in data.names) and all(0 <= i < 2**63 for i in data.ids)
    assert example_id("cat/001.png") == _blake("cat/001.png")


def test_without_transform_images_are_rgb_floats_in_unit_range(tmp_path):
    grey = _png(tmp_path / "d" / "a" / "g.png", (20, 10), "L", seed=5)
    rgb = _png(tmp_path / "d" / "b" / "c.png", (8, 12), seed=6)
    data = load_images(tmp_path / "d")
    x, y = data[0]
    assert y == 0 and x.dtype == torch.float32 and x.shape == (3, 10, 20)
    assert torch.allclose(x, torch.from_numpy(grey).float().div(255).expand(3, -1, -1))
    x, y = data[1]
    assert y == 1 and torch.allclose(x, torch.from_numpy(rgb).float().div(255).permute(2, 0, 1))


def test_transform_from_the_model_gives_its_input(folder):
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=28, patch_size=7, in_chans=1,
                            embed_dim=32, depth=2, num_heads=2)
    data = load_images(folder, eval_transform(data_config(vit)))
    assert {tuple(data[i][0].shape) for i in range(len(data))} == {(1, 28, 28)}


def test_csv_manifest_with_and_without_ids(tmp_path):
    for i, size in enumerate([(10, 10), (12, 9), (9, 14)]):
        _png(tmp_path / "img" / f"{i}.png", size, seed=i)
    (tmp_path / "m.csv").write_text("path,label\nimg/0.png,10\nimg/1.png,2\n./img/2.png,1\n")
    data = load_images(tmp_path / "m.csv")
    assert data.classes == ("1", "2", "10")  # numeric order, not "1" < "10" < "2"
    assert data.labels == (2, 1, 0) and data.root == tmp_path
    assert data.names == ("img/0.png", "img/1.png", "img/2.png")
    (tmp_path / "ids.csv").write_text("id,path,label\npatient-7,img/0.png,b\npatient-3,img/1.png,a\n")
    named = load_images(tmp_path / "ids.csv")
    assert named.classes == ("a", "b") and named.labels == (1, 0)
    assert named.names == ("patient-7", "patient-3") and named.ids[0] == _blake("patient-7")


def test_ids_are_stable_and_independent_of_other_files(folder):
    before = dict(zip(load_images(folder).names, load_images(folder).ids))
    (folder / "cat" / "002.png").unlink()
    _png(folder / "cat" / "000.png", (10, 10), seed=9)  # sorts first: every position shifts
    after = load_images(folder)
    assert "cat/002.png" not in after.names
    for name, i in zip(after.names, after.ids):
        if name in before:
            assert before[name] == i


def test_eval_set_maps_to_training_classes(folder, tmp_path):
    _png(folder / "fish" / "005.png", (10, 10), seed=5)
    train = load_images(folder)
    assert train.classes == ("cat", "dog", "fish")
    _png(tmp_path / "test" / "fish" / "a.png", (10, 10), seed=6)
    test = load_images(tmp_path / "test", classes=train.classes)
    assert test.classes == train.classes and test.labels == (2,)
    (tmp_path / "t.csv").write_text("path,label\ntest/fish/a.png,dog\n")
    assert load_images(tmp_path / "t.csv", classes=train.classes).labels == (1,)
    _png(tmp_path / "test" / "bird" / "b.png", (10, 10), seed=7)
    with pytest.raises(ImageDataError, match=r"'bird'.*'cat', 'dog', 'fish'"):
        load_images(tmp_path / "test", classes=train.classes)


def test_corrupt_images_are_named_at_load_or_read(folder):
    good = (folder / "dog" / "003.png").read_bytes()
    (folder / "dog" / "bad.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ImageDataError, match="bad.png"):
        load_images(folder)
    lazy = load_images(folder, verify=False)
    with pytest.raises(ImageDataError, match="bad.png"):
        lazy[lazy.names.index("dog/bad.png")]
    (folder / "dog" / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(ImageDataError, match="bad.png"):
        load_images(folder)


def test_folder_layout_errors(folder, tmp_path):
    (folder / "dog" / "notes.txt").write_text("x")
    with pytest.raises(ImageDataError, match="notes.txt"):
        load_images(folder)
    (folder / "dog" / "notes.txt").unlink()
    (folder / "empty").mkdir()
    with pytest.raises(ImageDataError, match="empty.*no image"):
        load_images(folder)
    flat = tmp_path / "flat"
    _png(flat / "a.png", (5, 5))
    with pytest.raises(ImageDataError, match="no class sub-folders"):
        load_images(flat)
    for source in (tmp_path / "nowhere", flat / "a.png"):
        with pytest.raises(ImageDataError, match="neither a folder"):
            load_images(source)


def test_save_only_formats_are_not_images(folder):
    """Pillow writes .pdf (and .palm) but cannot open them: such a file is a non-image, not a
    class image that would fail at the first read."""
    Image.init()
    assert Image.registered_extensions()[".pdf"] not in Image.OPEN  # save-only in this Pillow
    assert {".pdf", ".palm"}.isdisjoint(IMAGE_SUFFIXES) and {".png", ".jpg", ".jpeg"} <= IMAGE_SUFFIXES
    Image.open(folder / "dog" / "003.png").save(folder / "dog" / "scan.pdf")
    with pytest.raises(ImageDataError, match=r"non-image file\(s\) in class folder .*scan\.pdf"):
        load_images(folder)


def test_csv_errors_name_columns_rows_and_files(tmp_path):
    _png(tmp_path / "a.png", (5, 5))
    _png(tmp_path / "d.png", (5, 5))
    cases = {
        "file,class\na.png,x\n": r"lacks column\(s\) path, label.*file, class",
        "path,label\na.png,x\nb.png,y\nc.png,y\n": r"2 file\(s\).*line 3: 'b.png'; line 4: 'c.png'",
        "path,label\na.png,\n": r"line 2: empty label",
        "id,path,label\nk,a.png,x\nk,d.png,y\n": r"name\(s\) used by several examples, e.g. 'k'",
        "path,label\na.png,x\n./a.png,y\n": r"file\(s\) used by several examples, e.g. '.*a.png'",
        "path,label\n": "no rows",
    }
    for i, (text, message) in enumerate(cases.items()):
        (tmp_path / f"{i}.csv").write_text(text)
        with pytest.raises(ImageDataError, match=message):
            load_images(tmp_path / f"{i}.csv")


def test_collate_names_the_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4, 4\), \(3, 5, 4\).*Resize"):
        collate_examples([(torch.zeros(3, 5, 4), 0), (torch.zeros(3, 4, 4), 1)])
    x, y = collate_examples([(torch.zeros(3, 4, 4), 0), (torch.ones(3, 4, 4), 1)])
    assert x.shape == (2, 3, 4, 4) and y.tolist() == [0, 1]


def _mixed_size_probe(folder: Path) -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=28, patch_size=7, in_chans=3,
                            embed_dim=32, depth=2, num_heads=2, dynamic_img_size=True)
    return dp_taft.methods.linear_probe(vit), load_images(folder)  # no transform: sizes as stored


def test_mixed_sizes_in_evaluate_say_to_resize(folder):
    model, data = _mixed_size_probe(folder)
    with pytest.raises(ValueError, match=r"different shapes.*\(3, 16, 24\).*\(3, 20, 20\).*eval_transform"):
        evaluate(model, data, torch.nn.CrossEntropyLoss(), 4, torch.device("cpu"))


def test_mixed_sizes_through_fit_say_to_resize(folder):
    model, data = _mixed_size_probe(folder)
    with pytest.raises(ValueError, match=r"different shapes.*\(3, 16, 24\).*Resize"):
        dp_taft.fit(model, data, epsilon=None, epochs=1, batch_size=4, quiet=True, seed=0)


def test_images_from_disk_train_through_fit(folder):
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=28, patch_size=7, in_chans=1,
                            embed_dim=32, depth=2, num_heads=2)
    data = load_images(folder, eval_transform(data_config(vit)))
    result = dp_taft.fit(dp_taft.methods.linear_probe(vit), data, epsilon=None, epochs=1, batch_size=2, quiet=True,
                         seed=0, eval_set=data)
    assert result.steps >= 1 and 0.0 <= result.history[-1].eval_accuracy <= 1.0
