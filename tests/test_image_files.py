"""open_image reads picture files as an image viewer shows them; each file is built here, small."""
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from ipadapter_min.cli.image_files import open_image, open_mask

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def png_bytes(width, height, colour_type, bit_depth, rows, *chunks):
    """A PNG written by hand: 16-bit files, tRNS chunks, and headers that lie about the size."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + b"".join(chunk(*c) for c in chunks)
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def close(pixel, colour, tolerance=6):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


def test_ordinary_rgb_files_are_read_bit_exactly(tmp_path):
    """No colour management of RGB files (an embedded sRGB profile is left alone): the pixels
    are exactly .convert("RGB")'s, as the references read them."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, options in (("a.png", {"icc_profile": srgb}), ("b.jpg", {"quality": 90}), ("c.webp", {})):
        Image.fromarray(pixels).save(tmp_path / name, **options)
        image = open_image(tmp_path / name)
        with Image.open(tmp_path / name) as plain:
            assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(plain.convert("RGB")))


@pytest.mark.parametrize("orientation, size, red_corner", [(3, (8, 6), (7, 5)), (6, (6, 8), (5, 0)),
                                                            (8, (6, 8), (0, 7))])
def test_exif_orientation_is_applied(tmp_path, orientation, size, red_corner):
    """A photo stored 8×6 with its top-left pixel red, tagged to be shown rotated."""
    image = Image.new("RGB", (8, 6), BLUE)
    image.putpixel((0, 0), RED)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(tmp_path / "photo.png", exif=exif)
    upright = open_image(tmp_path / "photo.png")
    assert upright.size == size
    assert upright.getpixel(red_corner) == RED
    assert sum(upright.getpixel((x, y)) == RED for x in range(size[0]) for y in range(size[1])) == 1


def test_a_damaged_exif_block_is_ignored(tmp_path):
    (tmp_path / "exif.png").write_bytes(png_bytes(2, 1, 2, 8, [bytes([255, 0, 0] * 2)], (b"eXIf", b"garbage!")))
    image = open_image(tmp_path / "exif.png")
    assert image.size == (2, 1) and image.getpixel((0, 0)) == RED


def transparent_files(tmp_path):
    """(name, file) pairs, each 8×6 with pixel (0, 0) opaque red and pixel (1, 0) transparent
    over black (the colour a plain .convert("RGB") shows)."""
    rgba = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (*RED, 255))
    rgba.save(tmp_path / "rgba.png")
    rgba.save(tmp_path / "rgba.webp", lossless=True)
    palette = Image.new("P", (8, 6), 0)
    palette.putpalette([*BLACK, *RED])
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)  # a tRNS entry for index 0
    palette.save(tmp_path / "palette.gif", transparency=0)
    key = Image.new("RGB", (8, 6), BLACK)
    key.putpixel((0, 0), RED)
    key.save(tmp_path / "colour_key.png", transparency=BLACK)  # RGB with a tRNS colour
    return ["rgba.png", "rgba.webp", "palette.png", "palette.gif", "colour_key.png"]


def test_transparency_is_flattened_onto_white(tmp_path):
    for name in transparent_files(tmp_path):
        image = open_image(tmp_path / name)
        assert image.mode == "RGB", name
        assert image.getpixel((0, 0)) == RED, name
        assert image.getpixel((1, 0)) == WHITE, name


def test_gray_alpha_and_half_transparency_onto_white(tmp_path):
    gray = Image.new("LA", (8, 6), (0, 0))
    gray.putpixel((0, 0), (0, 255))
    gray.putpixel((1, 0), (0, 128))  # half-transparent black over white: mid gray
    gray.save(tmp_path / "la.png")
    image = open_image(tmp_path / "la.png")
    assert image.getpixel((0, 0)) == BLACK and image.getpixel((2, 0)) == WHITE
    assert close(image.getpixel((1, 0)), (127, 127, 127), 1)


def test_palette_grayscale_and_bilevel_files(tmp_path):
    palette = Image.new("P", (8, 6), 1)
    palette.putpalette([*RED, *GREEN, *BLUE])
    palette.save(tmp_path / "palette.png")
    Image.new("L", (8, 6), 100).save(tmp_path / "gray.png")
    bilevel = Image.new("1", (8, 6), 1)
    bilevel.putpixel((0, 0), 0)
    bilevel.save(tmp_path / "bilevel.png")
    assert open_image(tmp_path / "palette.png").getpixel((3, 3)) == GREEN
    assert open_image(tmp_path / "gray.png").getpixel((3, 3)) == (100, 100, 100)
    image = open_image(tmp_path / "bilevel.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == BLACK and image.getpixel((1, 0)) == WHITE


@pytest.mark.parametrize("name, array", [("gray16.png", np.uint16), ("gray16.tif", np.uint16),
                                         ("gray16b.tif", ">u2"), ("gray32.tif", np.int32)])
def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path, name, array):
    """PIL opens these as I;16 / I;16B / I with values 0..65535; .convert("RGB") clips them to
    white. They are reduced by >> 8 (the high byte)."""
    values = np.full((6, 8), 0x8000)
    values[0, :3] = 0xFFFF, 0x00FF, 0x4000
    Image.fromarray(values.astype(array)).save(tmp_path / name)
    with Image.open(tmp_path / name) as plain:
        assert plain.mode.startswith("I")
    image = open_image(tmp_path / name)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [255, 0, 64, 128]
    assert image.getpixel((5, 5)) == (128, 128, 128)


def test_sixteen_bit_gray_png_with_a_transparent_value(tmp_path):
    row = struct.pack(">8H", 0x8000, 0x1234, *[0x8000] * 6)
    (tmp_path / "trns16.png").write_bytes(png_bytes(8, 1, 0, 16, [row], (b"tRNS", struct.pack(">H", 0x1234))))
    image = open_image(tmp_path / "trns16.png")
    assert image.getpixel((0, 0)) == (128, 128, 128) and image.getpixel((1, 0)) == WHITE


def test_sixteen_bit_rgb_and_rgba_pngs(tmp_path):
    """PIL itself reduces 16-bit RGB(A) PNGs to 8 bits (the high byte); the alpha is then
    flattened as any other."""
    rgb = struct.pack(">6H", 0x8000, 0x40FF, 0xFFFF, 0, 0, 0)
    rgba = struct.pack(">8H", 0xFFFF, 0, 0, 0xFFFF, 0, 0, 0, 0)
    (tmp_path / "rgb16.png").write_bytes(png_bytes(2, 1, 2, 16, [rgb]))
    (tmp_path / "rgba16.png").write_bytes(png_bytes(2, 1, 6, 16, [rgba]))
    assert open_image(tmp_path / "rgb16.png").getpixel((0, 0)) == (128, 64, 255)
    image = open_image(tmp_path / "rgba16.png")
    assert image.getpixel((0, 0)) == RED and image.getpixel((1, 0)) == WHITE


def test_a_float_tiff_is_refused_in_one_line(tmp_path):
    Image.fromarray(np.full((6, 8), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"^--image \S+float.tif: a floating-point image \(mode F\)") as caught:
        open_image(tmp_path / "float.tif")
    assert "\n" not in str(caught.value)


def cmyk_profile(lab):
    """A minimal ICC v2 CMYK profile whose A2B0 table maps every ink with no black (K 0) to the one
    Lab colour ``lab``, and full black to black (LittleCMS maps no ink to paper white whatever
    the table says, and compensates the black point in perceptual conversions)."""
    L, a, b = lab
    point = bytes([round(L * 255 / 100), a + 128, b + 128, 0, 128, 128]) * 8  # K varies fastest
    matrix = struct.pack(">9i", *(65536 if i % 4 == 0 else 0 for i in range(9)))
    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + matrix + bytes(range(256)) * 4 + point + bytes(range(256)) * 3
    d50 = struct.pack(">3i", 63190, 65536, 54061)
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", 5) + b"test\0" + bytes(78)),
            (b"wtpt", b"XYZ " + bytes(4) + d50), (b"A2B0", lut)]
    start, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table, data = table + signature + struct.pack(">II", start + len(data), len(body)), data + body
    header = (struct.pack(">I", start + len(data)) + b"lcms\x02\x10\x00\x00prtrCMYKLab " + bytes(12) + b"acsp"
              + bytes(28) + d50 + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


@pytest.mark.parametrize("name", ["cmyk.jpg", "cmyk.tif"])
def test_cmyk_without_a_profile_reads_its_colour(tmp_path, name):
    """Red ink (magenta + yellow) reads back red; PIL writes CMYK JPEGs Adobe-inverted, as
    Photoshop does, and un-inverts them on load."""
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / name, quality=95)
    with Image.open(tmp_path / name) as plain:
        assert "adobe" in plain.info or name.endswith(".tif")
    image = open_image(tmp_path / name)
    assert image.mode == "RGB" and close(image.getpixel((3, 3)), RED)


@pytest.mark.parametrize("name", ["cmyk.jpg", "cmyk.tif"])
def test_cmyk_with_an_icc_profile_is_converted_through_it(tmp_path, name):
    """The embedded profile says this ink is a mid gray (Lab 50, 0, 0: sRGB 119); PIL's own
    conversion would say red."""
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / name, quality=95, icc_profile=cmyk_profile((50, 0, 0)))
    assert close(open_image(tmp_path / name).getpixel((3, 3)), (119, 119, 119), 3)


@pytest.mark.parametrize("name, options", [("anim.gif", {"duration": 100}), ("anim.png", {"duration": 100}),
                                           ("anim.webp", {"duration": 100, "lossless": True})])
def test_an_animation_gives_its_first_frame(tmp_path, name, options):
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, GREEN, BLUE)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], **options)
    with Image.open(tmp_path / name) as plain:
        assert plain.n_frames == 3
    image = open_image(tmp_path / name)
    assert image.mode == "RGB" and image.getpixel((3, 3)) == RED


def bomb(tmp_path, width, height):
    """A tiny PNG whose header claims width × height pixels."""
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(width, height, 2, 8, [bytes(3 * 8)]))
    return path


@pytest.mark.parametrize("width, height", [(10000, 10000), (20000, 20000)])  # PIL: a warning, an error
def test_a_decompression_bomb_fails_fast_in_one_line(tmp_path, width, height):
    path = bomb(tmp_path, width, height)
    began = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        open_image(path, "--init-image")
    assert time.perf_counter() - began < 1
    assert str(caught.value) == (f"--init-image {path}: {width * height} pixels is more than the "
                                 f"{Image.MAX_IMAGE_PIXELS} this reads (a decompression bomb?)")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match=r"^--mask \S+nothing.png: no such file$"):
        open_image(tmp_path / "nothing.png", "--mask")
    (tmp_path / "notes.png").write_text("not a picture")
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 64).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for name in ("notes.png", "cut.png"):
        with pytest.raises(ValueError, match=rf"^--control-image \S+{name}: not a readable image") as caught:
            open_image(tmp_path / name, "--control-image")
        assert "\n" not in str(caught.value)


def test_a_mask_with_transparency_is_its_alpha(tmp_path):
    """Strokes painted on a transparent layer are the mask whatever their colour (AUTOMATIC1111's
    create_binary_mask): flattening onto white would mark the unpainted part instead."""
    for colour in (WHITE, BLACK):
        mask = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
        mask.putpixel((0, 0), (*colour, 255))
        mask.save(tmp_path / "mask.png")
        image = open_mask(tmp_path / "mask.png")
        assert image.mode == "RGB" and image.getpixel((0, 0)) == WHITE and image.getpixel((1, 0)) == BLACK
    opaque = Image.new("RGBA", (8, 6), (0, 0, 0, 255))
    opaque.putpixel((0, 0), (255, 255, 255, 255))
    opaque.save(tmp_path / "opaque.png")
    image = open_mask(tmp_path / "opaque.png")
    assert image.getpixel((0, 0)) == WHITE and image.getpixel((1, 0)) == BLACK


def test_the_command_line_names_a_decompression_bomb_before_loading_models(tmp_path, capsys, monkeypatch):
    from ipadapter_min.cli import sample

    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded")
    monkeypatch.setattr(sample, "load", no_loading)
    path = bomb(tmp_path, 20000, 20000)
    code = sample.main(["--model", str(tmp_path), "--ip-adapter", str(tmp_path), "--image-encoder", str(tmp_path),
                        "--image", str(path), "--device", "cpu", "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: --image {path}: 400000000 pixels is more than the {Image.MAX_IMAGE_PIXELS} this reads " \
                  "(a decompression bomb?)\n"
