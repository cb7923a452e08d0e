"""decode_image on the real-file corpus: every format and mode gives the right pixels, every bad
file the right skip stage, and nothing crashes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import corpus
from jaxclf.data import decode
from jaxclf.data.sources import scan


def expected(item: corpus.Item, channels: int) -> np.ndarray:
  ref = corpus.reference_grey() if item.grey or channels == 1 else corpus.reference()
  if channels == 3 and ref.shape[2] == 1:
    ref = np.repeat(ref, 3, axis=2)
  return ref


@pytest.mark.parametrize("item", corpus.good_items(), ids=lambda i: i.name)
@pytest.mark.parametrize("channels", [3, 1])
def test_good_files_decode_to_the_reference_picture(item, channels):
  img = decode.decode_image(item.data, channels, source=item.name)
  assert img.dtype == np.uint8 and img.shape == (corpus.H, corpus.W, channels)
  ref = expected(item, channels)
  for y, x in corpus.quadrant_centres():
    diff = np.abs(img[y, x].astype(int) - ref[y, x].astype(int)).max()
    assert diff <= item.tolerance + (1 if channels == 1 else 0), (item.name, (y, x), img[y, x], ref[y, x])
  assert decode.probe(item.data).format == item.format


@pytest.mark.parametrize("item", corpus.bad_items(), ids=lambda i: i.name)
def test_bad_files_fail_at_the_right_stage_with_the_source_named(item):
  with pytest.raises(decode.DecodeError) as e:
    decode.decode_image(item.data, 3, source=f"dir/{item.name}")
  assert e.value.stage == item.skip_stage
  assert e.value.as_dict() == {"source": f"dir/{item.name}", "stage": item.skip_stage,
                               "reason": e.value.reason}
  assert f"dir/{item.name}" in str(e.value)


def test_transparency_is_composited_on_the_background_not_black():
  rgba = next(i for i in corpus.items() if i.name == "rgba.png").data
  y, x = corpus.quadrant_centres()[3]
  assert decode.decode_image(rgba, 3)[y, x].tolist() == [255, 255, 255]
  assert decode.decode_image(rgba, 3, background=0)[y, x].tolist() == [0, 0, 0]
  assert decode.decode_image(rgba, 1, background=128)[y, x].tolist() == [128]


def test_exif_orientation_is_applied():
  item = next(i for i in corpus.items() if i.name == "exif_rotated.jpg")
  assert decode.probe(item.data).width == corpus.H  # stored sideways ...
  assert decode.decode_image(item.data, 3).shape[:2] == (corpus.H, corpus.W)  # ... shown upright


def test_animated_gif_gives_its_first_frame():
  item = next(i for i in corpus.items() if i.name == "animated.gif")
  with Image.open(io.BytesIO(item.data)) as im:
    assert im.n_frames == 2
  assert decode.decode_image(item.data, 3)[0, 0].tolist() == list(corpus.QUADRANTS["top_left"])


def test_sixteen_bit_png_is_rescaled_not_clipped():
  arr = np.array([[0, 32768, 65535]], np.uint16)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  assert decode.decode_image(buf.getvalue(), 1)[0, :, 0].tolist() == [0, 128, 255]


def _jpeg(h, w):
  buf = io.BytesIO()
  Image.fromarray(corpus.reference(h, w)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def test_large_jpeg_is_decoded_downscaled_in_draft_mode_within_the_pixel_limit():
  data = _jpeg(1600, 2400)  # 3.84 MP
  img = decode.decode_image(data, 3, max_pixels=1_000_000)
  assert img.shape[0] * img.shape[1] <= 1_000_000 and img.shape[:2] == (800, 1200)  # 1/2 scale
  for (y, x), colour in zip(corpus.quadrant_centres(800, 1200), corpus.QUADRANTS.values()):
    assert np.abs(img[y, x].astype(int) - colour).max() <= 10


def test_pixel_limit_refuses_other_formats_before_allocating():
  buf = io.BytesIO()
  Image.new("L", (2000, 1000)).save(buf, "PNG")
  with pytest.raises(decode.DecodeError, match="exceeds the limit") as e:
    decode.decode_image(buf.getvalue(), 1, max_pixels=1_000_000)
  assert e.value.stage == "limit"
  assert decode.decode_image(buf.getvalue(), 1, max_pixels=2_000_000).shape == (1000, 2000, 1)


def test_channels_must_be_one_or_three():
  with pytest.raises(ValueError, match="channels must be 1 or 3"):
    decode.decode_image(corpus.items()[0].data, 4)


def test_checked_plus_skipped_equals_input_and_nothing_raises():
  items = corpus.items()
  checked = scan.check_files([(i.name, (lambda d=i.data: (d, None))) for i in items],
                             channels=3, max_pixels=decode.DEFAULT_MAX_PIXELS, workers=2)
  ok = [c for c in checked if c.ok]
  skipped = [c for c in checked if not c.ok]
  assert len(ok) + len(skipped) == len(items)
  assert {c.uri for c in ok} == {i.name for i in corpus.good_items()}
  assert {c.uri: c.skip["stage"] for c in skipped} == {i.name: i.skip_stage for i in corpus.bad_items()}
  by_name = {c.uri: c for c in ok}
  assert by_name["exif_rotated.jpg"].height == corpus.H and by_name["grey16.png"].mode == "I;16"
  # The same picture in every format has (nearly) the same perceptual hash.
  ref = by_name["rgb.png"].dhash
  assert all((int(c.dhash, 16) ^ int(ref, 16)).bit_count() <= scan.NEAR_DUPLICATE_BITS for c in ok)


def test_near_duplicate_pairs_found_by_dhash():
  base = corpus.patterned(64, 64, 1)
  variants = [base, np.clip(base.astype(int) + 6, 0, 255).astype(np.uint8),  # brightened copy
              corpus.patterned(64, 64, 2), corpus.patterned(64, 64, 3)]
  hashes = [scan.dhash(v) for v in variants]
  pairs = scan.find_near_duplicates(hashes)
  assert (0, 1) in {(i, j) for i, j, _ in pairs}
  assert all({i, j} == {0, 1} for i, j, _ in pairs)


def test_huge_jpeg_under_the_limit_uses_the_size_hint(monkeypatch):
  monkeypatch.setattr(decode, "DRAFT_THRESHOLD_PIXELS", 1_000_000)  # "huge" without a 16 MP file
  data = _jpeg(1600, 2400)
  assert decode.decode_image(data, 3, target_size=(200, 300)).shape == (200, 300, 3)  # 1/8 scale
  assert decode.decode_image(data, 3, target_size=(500, 500)).shape == (800, 1200, 3)  # 1/2 scale
