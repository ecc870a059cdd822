"""Miniature datasets written as real files, for tests of every stage.

    from synth import write_tiny_imagenet, write_image_folder
    zip_path = write_tiny_imagenet(tmp_path)                    # tmp_path/tiny-imagenet-200.zip
    folder = write_tiny_imagenet(tmp_path, as_zip=False)        # tmp_path/tiny-imagenet-200/
    root = write_image_folder(tmp_path)                         # tmp_path/shapes/{train,val,test}/...

Pixels depend on the class (a colour, stripes of a class-specific period and orientation, plus noise), so a
classifier learns them in a few steps. Everything is seeded: the same call writes the same bytes.
"""

from __future__ import annotations

import colorsys
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# Special training images of the miniature Tiny ImageNet (all in class 0, wnid(0)).
GRAY_ID = "n00000000_1.JPEG"  # a grayscale JPEG
CMYK_ID = "n00000000_2.JPEG"  # a CMYK JPEG
CORRUPT_ID = "n00000000_corrupt.JPEG"  # a truncated JPEG, present only with corrupt=True; sorts last in its class

# ImageFolder class names, deliberately not in sorted order.
FOLDER_CLASSES = ["zebra", "ant", "moth", "cat", "eel", "bee", "owl", "yak"]


def wnid(k: int) -> str:
    """The class id of the k-th class of the miniature Tiny ImageNet (wnids.txt order)."""
    return f"n{k:08d}"


def class_image(label: int, rng: np.random.Generator, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """An RGB image of the given class; size is (width, height)."""
    w, h = size
    hue = (label * 0.618034) % 1.0  # golden-ratio steps keep any two classes' colours apart
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9)) * 255
    yy, xx = np.mgrid[:h, :w]
    stripes = np.sin((xx if label % 2 else yy) * 2 * np.pi / (4 + 2 * (label % 5)))
    pixels = colour * (0.7 + 0.3 * stripes[..., None]) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, quality=90) if fmt == "JPEG" else image.save(buf, fmt)
    return buf.getvalue()


def write_tiny_imagenet(
    root: str | Path,
    *,
    classes: int = 3,
    train_per_class: int = 6,
    val_per_class: int = 2,
    test: int = 4,
    as_zip: bool = True,
    corrupt: bool = False,
    seed: int = 0,
) -> Path:
    """A miniature Tiny ImageNet in the official layout (wnids.txt, words.txt, train/<wnid>/images +
    <wnid>_boxes.txt, val/images + val_annotations.txt, test/images), 64x64 JPEGs. GRAY_ID and CMYK_ID are
    grayscale and CMYK; corrupt=True adds the truncated CORRUPT_ID. Val image i belongs to class i % classes.
    Returns root/tiny-imagenet-200.zip (as_zip) or the folder root/tiny-imagenet-200."""
    assert classes >= 1 and train_per_class >= 3, "GRAY_ID and CMYK_ID need 3 train images in class 0"
    rng = np.random.default_rng(seed)
    wnids = [wnid(k) for k in range(classes)]
    files = {
        "wnids.txt": "".join(w + "\n" for w in wnids).encode(),
        # Like the official words.txt: more entries than classes, some names with commas.
        "words.txt": "".join(f"{wnid(k)}\tthing {k}, object {k}\n" for k in range(classes + 5)).encode(),
    }
    for k, w in enumerate(wnids):
        boxes = []
        for i in range(train_per_class):
            name = f"{w}_{i}.JPEG"
            image = class_image(k, rng)
            mode = {GRAY_ID: "L", CMYK_ID: "CMYK"}.get(name, "RGB")
            files[f"train/{w}/images/{name}"] = encode(image.convert(mode))
            boxes.append(f"{name}\t{i}\t{k}\t{40 + i}\t{50 + k}\n")
        files[f"train/{w}/{w}_boxes.txt"] = "".join(boxes).encode()
    if corrupt:
        whole = encode(class_image(0, rng))
        files[f"train/{wnid(0)}/images/{CORRUPT_ID}"] = whole[: len(whole) // 2]
    annotations = []
    for i in range(classes * val_per_class):
        files[f"val/images/val_{i}.JPEG"] = encode(class_image(i % classes, rng))
        annotations.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t1\t2\t{60 - i % 7}\t63\n")
    files["val/val_annotations.txt"] = "".join(annotations).encode()
    for i in range(test):
        files[f"test/images/test_{i}.JPEG"] = encode(class_image(int(rng.integers(classes)), rng))
    return write_tree(files, Path(root), "tiny-imagenet-200", as_zip)


def write_image_folder(
    root: str | Path,
    *,
    classes: int = 3,
    train_per_class: int = 6,
    val_per_class: int = 2,
    test: int = 3,
    as_zip: bool = False,
    name: str = "shapes",
    seed: int = 0,
) -> Path:
    """A miniature ImageFolder dataset: train/<class>/*, val/<class>/*, test/* with class names from
    FOLDER_CLASSES (not in sorted order: the labels follow sorted names). Images are .jpg and .png of mixed,
    non-square sizes (one grayscale PNG, one RGBA PNG) to exercise resizing. Returns root/<name> or
    root/<name>.zip (whose members sit under <name>/)."""
    assert 1 <= classes <= len(FOLDER_CLASSES)
    rng = np.random.default_rng(seed)
    sizes = [(80, 60), (64, 64), (48, 72), (100, 100)]
    files = {}

    def add(path: str, label: int, i: int) -> None:
        image = class_image(label, rng, sizes[i % len(sizes)])
        if i % 2:
            files[path + ".png"] = encode(image.convert(["RGB", "L", "RGBA"][i % 3]), "PNG")
        else:
            files[path + ".jpg"] = encode(image)

    for k, cls in enumerate(FOLDER_CLASSES[:classes]):
        for i in range(train_per_class):
            add(f"train/{cls}/img_{i}", k, i)
        for i in range(val_per_class):
            add(f"val/{cls}/img_{i}", k, i)
    for i in range(test):
        add(f"test/img_{i}", int(rng.integers(classes)), i)
    return write_tree(files, Path(root), name, as_zip)


def write_tree(files: dict[str, bytes], root: Path, top: str, as_zip: bool) -> Path:
    """Write {relative path: bytes} under root/top/, or into root/top.zip with members under top/."""
    root.mkdir(parents=True, exist_ok=True)
    if as_zip:
        path = root / f"{top}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for rel, data in files.items():
                z.writestr(f"{top}/{rel}", data)
        return path
    for rel, data in files.items():
        (root / top / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / top / rel).write_bytes(data)
    return root / top
