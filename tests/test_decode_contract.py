"""One decoding contract for every decoder: the PIL path (the CPU default) and the tensor path (the GPU default,
run here on the CPU) keep and reject the same files and hand the model the same picture."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from saferclip_data.models.decode import decode_pil, decode_tensors, normalization, plain_jpeg

from odd_images import odd_images, with_orientation


@pytest.fixture(scope="module")
def preprocess():
    import open_clip

    return open_clip.create_model_and_transforms("ViT-B-32")[2]


def _both(blobs: list[bytes], preprocess):
    mean, std = normalization(preprocess)
    a, ok_a, failed_a = decode_pil(blobs, preprocess)
    b, ok_b, failed_b = decode_tensors(blobs, 224, mean, std, "cpu")
    return ((None if a is None else a * std + mean), ok_a, failed_a), \
        ((None if b is None else b * std + mean), ok_b, failed_b)


@pytest.mark.parametrize("size", [(48, 32), (640, 427)], ids=["upscaled", "downscaled"])
def test_odd_images_get_the_same_verdict_and_picture_from_both_decoders(preprocess, size):
    images = odd_images(size)
    names = list(images)
    assert len(names) >= 40
    (pil, ok_pil, failed_pil), (tensor, ok_tensor, failed_tensor) = _both(list(images.values()), preprocess)
    assert ok_pil == ok_tensor
    assert [i for i, _ in failed_pil] == [i for i, _ in failed_tensor]
    rejected = {names[i] for i, _ in failed_pil}
    assert rejected == {"jpeg-truncated", "jpeg-header-only", "garbage", "text", "png-truncated", "jpeg-magic-only"}
    assert all(reason for _, reason in failed_tensor)
    difference = (pil - tensor).abs().flatten(1).mean(1) * 255  # mean absolute difference, in grey levels
    worst = int(difference.argmax())
    assert difference.max() <= 2.0, (names[ok_pil[worst]], float(difference.max()))


def test_each_case_reads_the_way_it_is_meant_to_be_seen(preprocess):
    images = odd_images((64, 48))
    picture = {}
    for name, blob in images.items():
        (pixels, ok, _), _ = _both([blob], preprocess)
        if ok:
            picture[name] = pixels[0].numpy()

    def close(a: str, b: str, tolerance: float = 6 / 255) -> bool:
        return float(np.abs(picture[a] - picture[b]).mean()) <= tolerance

    assert close("png-16bit-grey", "png-grey") and picture["png-16bit-grey"].mean() < 0.9  # scaled, not white
    assert close("png-48bit", "png") and close("tiff", "png") and close("bmp", "png")
    assert close("gif-animated", "gif", 12 / 255)  # the first frame (palette quantisation aside)
    assert close("avif", "png", 12 / 255) and close("webp", "png", 12 / 255) and close("jpeg-cmyk", "jpeg", 12 / 255)
    # the alpha ramp runs from transparent (left) to opaque (right): laid on white, the left edge is near white
    for name in ("png-rgba", "webp-lossless-alpha", "png-la"):
        left, right = picture[name][:, :, :8].mean(), picture[name][:, :, -8:].mean()
        assert left > 0.9 and right < left - 0.1, (name, left, right)
    # EXIF orientation 3 is a half turn: a picture stored upside down is shown the right way up
    upright = images["jpeg"]
    with Image.open(io.BytesIO(upright)) as img:
        stored = with_orientation(np.asarray(img.convert("RGB"))[::-1, ::-1].copy(), 3)
    (turned, _, _), (turned_tensor, _, _) = _both([stored, upright], preprocess)
    assert float((turned[0] - turned[1]).abs().mean()) < 6 / 255
    assert float((turned_tensor[0] - turned_tensor[1]).abs().mean()) < 6 / 255


def test_a_16bit_png_batched_with_8bit_images_and_an_animation_do_not_break_the_batch(preprocess):
    images = odd_images()
    blobs = [images["jpeg"], images["png-16bit-grey"], images["gif-animated"], images["garbage"], images["png"]]
    (_, ok_pil, _), (tensor, ok, failed) = _both(blobs, preprocess)
    assert ok == ok_pil == [0, 1, 2, 4] and [i for i, _ in failed] == [3] and tensor.shape[0] == 4


def test_only_one_and_three_component_jpegs_take_the_batched_jpeg_decoder():
    images = odd_images()
    assert plain_jpeg(images["jpeg"]) and plain_jpeg(images["jpeg-progressive"]) and plain_jpeg(images["jpeg-grey"])
    assert not plain_jpeg(images["jpeg-cmyk"]) and not plain_jpeg(images["png"]) and not plain_jpeg(b"\xff\xd8\xff")
