import io
import json

import numpy as np
import pytest
from PIL import Image

from ray_suti.model.inputs import MAX_PIXELS, SuTIInputError, load_image, subject_tensor


def _bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgba_transparency_is_composited_on_white():
    img = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 10, 20))
    out = np.asarray(load_image(_bytes(img)))
    assert out.shape == (20, 20, 3)
    assert tuple(out[5, 15]) == (255, 255, 255) and tuple(out[5, 2]) == (0, 0, 255)


def test_greyscale_palette_and_16_bit_images_become_8_bit_rgb():
    assert load_image(Image.new("L", (16, 16), 77)).getpixel((0, 0)) == (77, 77, 77)
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_image(_bytes(pal)).getpixel((3, 3)) == (10, 200, 30)
    pal.info["transparency"] = 1
    assert load_image(_bytes(pal, transparency=1)).getpixel((3, 3)) == (255, 255, 255)
    deep = Image.fromarray(np.full((16, 16), 65535, np.uint16))
    assert load_image(_bytes(deep)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((16, 16), 32768, np.uint16))
    assert load_image(_bytes(half)).getpixel((0, 0))[0] in (127, 128)


def test_exif_rotated_jpeg_stands_upright():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # camera says: rotate 90 degrees clockwise to view
    out = load_image(_bytes(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    a = np.asarray(out).mean(-1)
    assert a[:20].mean() > 200 and a[20:].mean() < 50  # the left half is now on top


def test_huge_tiny_and_non_square_photos_arrive_at_model_size(dreambench_dir):
    big = Image.new("RGB", (4000, 3000), (10, 120, 200))
    small = Image.new("RGB", (10, 10), (200, 10, 10))
    photo = Image.open(sorted((dreambench_dir / "dog2").glob("*.jpg"))[0])
    wide = photo.crop((0, 100, 512, 400))  # a 512 x 300 landscape photo
    t = subject_tensor([_bytes(big, "JPEG"), small, wide, wide.crop((106, 0, 406, 300))], 32)
    assert t.shape == (4, 3, 32, 32) and t.min() >= -1 and t.max() <= 1
    assert abs(float(t[0, 2].mean()) - (200 / 127.5 - 1)) < 0.02
    assert abs(float(t[1, 0].mean()) - (200 / 127.5 - 1)) < 0.02
    # documented: the centre square is kept (the filter reads a pixel or two beyond its edge)
    assert (t[2] - t[3]).abs().mean() < 0.005
    squashed = subject_tensor([wide.resize((300, 300))], 32)[0]
    assert (t[2] - squashed).abs().mean() > 0.05


def test_refused_inputs_say_why():
    with pytest.raises(SuTIInputError, match="limit"):
        load_image(_bytes(Image.new("1", (8000, 7000))))
    assert 8000 * 7000 > MAX_PIXELS
    with pytest.raises(SuTIInputError, match="at least"):
        load_image(Image.new("RGB", (3, 40)))
    with pytest.raises(SuTIInputError, match="not a readable image"):
        load_image(b"<html>404</html>")
    good = _bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(SuTIInputError):
        load_image(good[: len(good) // 2])


def test_generate_command_writes_a_png(tmp_path, dreambench_dir, capsys):
    from ray_suti.cli import main

    out = tmp_path / "dog.png"
    assert main(["generate", "--checkpoint", "tiny-32", "--subject", str(dreambench_dir / "dog2"), "--prompt",
                 "a dog on the beach", "--out", str(out), "--steps", "2", "--seed", "1", "--device", "cpu", "--dtype",
                 "bf16", "--scheduler", "euler-a", "--guidance-mode", "interleaved", "--guidance-subject", "2.5",
                 "--negative-prompt", "blurry", "--json"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out) == {"images": [str(out)], "seed": 1, "prompt": "a dog on the beach"}  # stdout: results
    assert Image.open(out).size == (32, 32)
    assert "first 5 of 6" in printed.err
    with pytest.raises(SystemExit) as bad:
        main(["generate", "--checkpoint", "tiny-32", "--subject", str(dreambench_dir / "dog2"), "--prompt", "a dog",
              "--out", str(out), "--scheduler", "os.system"])
    assert bad.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_generate_command_takes_controls(tmp_path, dreambench_dir):
    from ray_suti.cli import main

    from ..conftest import REPO

    outline = Image.new("L", (32, 32))
    outline.paste(255, (4, 4, 28, 5))
    outline.save(tmp_path / "edges.png")
    base = ["generate", "--subject", str(dreambench_dir / "dog2" / "00.jpg"), "--prompt", "a dog on the beach",
            "--steps", "2", "--box", "0.1", "0.3", "0.6", "0.9", "--keypoints", "0.35", "0.3", "0.6", "0.6",
            "--edges", str(tmp_path / "edges.png")]
    assert main(base + ["--checkpoint", str(REPO / "checkpoints" / "tiny-32.safetensors"),
                        "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size == (32, 32)
    with pytest.raises(SystemExit, match="no 'box' control"):
        main(base + ["--checkpoint", "tiny-32", "--out", str(tmp_path / "n.png")])
