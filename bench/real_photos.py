"""Real photographs for checks: the ones that ship inside installed packages, gathered into a manifest at run time.

scikit-image's ``data`` folder, scikit-learn's two sample images, matplotlib's sample data and, where caer is
installed, its labelled photos are ordinary photographs (people, animals, objects, landscapes, microscopy,
astronomy, scanned text), all safe. They are found where the packages are installed (none is imported, nothing
is downloaded or copied into the repository) and listed in a manifest the manifest source reads, with a few
variants written next to it that real collections contain: an EXIF-rotated JPEG, a transparent PNG and a 16-bit
PNG. A classifier's false-positive rate on this set is what ``bench classifiers`` reports.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

#: package -> (folder inside it, photographs there); drawings, charts and test patterns are left out
SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "skimage": ("data", (
        "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
        "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
        "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")),
    "sklearn": ("datasets/images", ("china.jpg", "flower.jpg")),
    "matplotlib": ("mpl-data/sample_data", ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")),
    "caer": ("data", ("black_cat.jpg", "camera.jpg", "fighter_fish.jpg", "gold_fish.jpg", "guitar.jpg",
                      "puppy.jpg", "snow.jpg", "sunrise.jpg", "tent.jpg")),
}  # fmt: skip


def find_photos() -> list[tuple[str, Path]]:
    """(key, path) of every listed photograph whose package is installed."""
    found = []
    for package, (folder, names) in SOURCES.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(spec.submodule_search_locations[0]) / folder
        for name in names:
            if (root / name).is_file():
                found.append((f"{package}-{Path(name).stem.lower().replace('_', '-')}", root / name))
    return found


def write_variants(folder: Path, source: Path) -> list[tuple[str, Path]]:
    """Three files made from one photograph as collections hold them: stored sideways with an EXIF orientation
    tag, with an alpha channel, and at 16 bits per channel (grey)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer turns it 90 degrees clockwise
    rgb.transpose(Image.Transpose.ROTATE_90).save(folder / "exif-rotated.jpg", exif=exif, quality=92)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    rgba.save(folder / "transparent.png")
    grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(folder / "sixteen-bit.png")
    return [(f"variant-{p.stem}", p) for p in (folder / "exif-rotated.jpg", folder / "transparent.png",
                                                 folder / "sixteen-bit.png")]  # fmt: skip


def write_photo_manifest(folder: Path) -> Path:
    """A manifest (key, caption, image, role) of the packaged photographs and the variants; returns its path."""
    photos = find_photos()
    if not photos:
        raise FileNotFoundError("no packaged photographs found (install scikit-image, scikit-learn, matplotlib)")
    photos += write_variants(folder / "variants", photos[0][1])
    path = folder / "photos.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "caption", "image", "role"])
        for key, image in photos:
            writer.writerow([key, f"a photo: {key.split('-', 1)[1].replace('-', ' ')}", str(image), "safe"])
    return path
