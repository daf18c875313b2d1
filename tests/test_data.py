"""Data loading: decoding of any image mode, folder scans, bad-file skipping, IDX parsing, demo set, transforms."""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from fcmae.config import DataConfig
from fcmae.data import (
    DATASET_DEFAULT_FASHION_MNIST,
    BadImageError,
    DataError,
    DemoImages,
    FashionMNIST,
    ImageFiles,
    LabeledImageFolder,
    build_eval_transform,
    build_finetune_transform,
    build_pretrain_dataset,
    build_pretrain_transform,
    demo_asset_path,
    find_images,
    load_image,
    mean_std,
    read_idx,
)
from fcmae.data.decode import decode_bytes, is_complete_jpeg, pil_to_u8, read_image_u8
from fcmae.data.images import PathList, scan_or_read_file_list
from fcmae.data.sampling import SeededSamples
from fcmae.data.transforms import DeviceNormalize, DeviceRandomErasing, crop_params


def _rgb(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A random RGB image of ``size`` (width, height)."""
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


def _jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    _rgb(seed, (64, 48)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Good images of many modes and formats, nested, plus files that must be ignored."""
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hiddendir").mkdir()
    _rgb(0).save(root / "a.png")
    _rgb(1).save(root / "b.jpg")
    _rgb(2).convert("CMYK").save(root / "c_cmyk.jpg")
    _rgb(3).convert("L").save(root / "d_gray.png")
    rgba = _rgb(4).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "e_rgba.png")
    _rgb(5).convert("P").save(root / "f_palette.gif")
    Image.frombytes("I;16", (20, 10), np.arange(200, dtype="<u2").tobytes()).save(root / "g16.png")
    _rgb(6).save(root / "sub" / "h.webp")
    _rgb(7).save(root / "sub" / "deeper" / "i.bmp")
    _rgb(8).save(root / "sub" / "J.JPG", format="JPEG")
    _rgb(9).save(root / "k.tiff")
    _rgb(10).save(root / ".hidden.png")
    _rgb(11).save(root / ".hiddendir" / "x.png")
    (root / "notes.txt").write_text("not an image")
    return root


GOOD_NAMES = ["a.png", "b.jpg", "c_cmyk.jpg", "d_gray.png", "e_rgba.png", "f_palette.gif", "g16.png", "k.tiff",
              "sub/J.JPG", "sub/deeper/i.bmp", "sub/h.webp"]


def _add_bad_files(root: Path) -> tuple[Path, Path]:
    """A random-bytes .jpg and a real JPEG cut in half; named to sort next to each other."""
    corrupt = root / "bad1_corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    truncated = root / "bad2_truncated.jpg"
    data = _jpeg_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return corrupt, truncated


# --------------------------------------------------------------------------------------------- decoding / scan
def test_scan_is_recursive_sorted_and_skips_hidden(image_folder: Path) -> None:
    paths = find_images(image_folder)
    assert [p.relative_to(image_folder).as_posix() for p in paths] == GOOD_NAMES


@pytest.mark.parametrize("in_chans", [1, 3])
def test_every_mode_decodes_to_model_mode(image_folder: Path, in_chans: int) -> None:
    for p in find_images(image_folder):
        img = load_image(p, in_chans)
        assert img.mode == ("L" if in_chans == 1 else "RGB"), p
    # alpha is composited on white: a half-transparent pixel is brighter than its stored colour
    stored = np.asarray(Image.open(image_folder / "e_rgba.png").convert("RGB"), dtype=np.float64)
    shown = np.asarray(load_image(image_folder / "e_rgba.png", 3), dtype=np.float64)
    assert np.all(shown >= stored - 1) and shown.mean() > stored.mean() + 50
    # 16-bit gray is scaled to 8 bits, not clipped
    g16 = np.asarray(load_image(image_folder / "g16.png", 1))
    assert g16.max() == 1 and np.asarray(Image.open(image_folder / "g16.png")).max() == 199


def test_image_files_shapes(image_folder: Path) -> None:
    for decoder in (None, decode_bytes):
        ds = ImageFiles(find_images(image_folder), build_pretrain_transform(32, (0.5, 1.0), 0.5, 1), in_chans=1,
                        decoder=decoder)
        x, n = ds[3]
        assert x.shape == (1, 32, 32) and x.dtype == torch.uint8 and n == 0


@pytest.mark.parametrize("in_chans", [1, 3])
def test_fast_decoder_matches_pil_on_every_odd_file(image_folder: Path, in_chans: int) -> None:
    """The uint8 reader (libjpeg-turbo for complete JPEGs, PIL for the rest) gives PIL's pixels for every mode and
    format (CMYK JPEG, 16-bit, palette, alpha, TIFF, WebP, BMP), and refuses truncated or corrupt files as PIL does."""
    for p in find_images(image_folder):
        ours = read_image_u8(p, in_chans)
        pil = pil_to_u8(load_image(p, in_chans))
        assert ours.shape == pil.shape and ours.dtype == torch.uint8, p
        # JPEGs go through another libjpeg build: at most a few levels apart, on average far less than one; gray
        # comes straight from the JPEG's luma channel, where PIL converts its decoded RGB (a few edge pixels further)
        diff = (ours.int() - pil.int()).abs()
        assert diff.max() <= (8 if in_chans == 3 else 32) and diff.float().mean() <= 0.5, (p, diff.max(), diff.mean())
    one = image_folder / "one.jpg"
    Image.new("RGB", (1, 1), (200, 10, 30)).save(one, quality=95)
    assert read_image_u8(one, 3).shape == (3, 1, 1)
    for bad in _add_bad_files(image_folder):
        with pytest.raises(BadImageError, match=bad.name):
            read_image_u8(bad, in_chans)
    assert is_complete_jpeg(_jpeg_bytes()) and not is_complete_jpeg(_jpeg_bytes()[:-100])


@pytest.mark.parametrize("in_chans", [1, 3])
def test_fast_decoder_applies_every_exif_and_xmp_orientation_like_pil(tmp_path: Path, in_chans: int) -> None:
    """Orientations 1-8 (EXIF), one given only in XMP, and a broken EXIF block: the fast JPEG path returns the
    image PIL's ``load_image`` shows, and the data.decode=gpu reader hands over only upright files."""
    from fcmae.data.decode import JpegFile, jpeg_or_image

    img = _rgb(5, (40, 24))  # 40 wide, 24 high: non-square, so a wrong transpose changes the shape
    files = []
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        img.save(tmp_path / f"o{o}.jpg", exif=exif.tobytes(), quality=95)
        files.append((tmp_path / f"o{o}.jpg", o))
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">' \
          b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    img.save(tmp_path / "xmp.jpg", xmp=xmp, quality=95)
    files.append((tmp_path / "xmp.jpg", 6))
    data = (tmp_path / "o1.jpg").read_bytes()
    broken = data[:2] + b"\xff\xe1\x00\x10Exif\x00\x00MM\x00*\x00\x00\x00\xff" + data[2:]  # IFD offset past the end
    (tmp_path / "broken.jpg").write_bytes(broken)
    files.append((tmp_path / "broken.jpg", 1))
    for path, o in files:
        ours, pil = read_image_u8(path, in_chans), pil_to_u8(load_image(path, in_chans))
        assert ours.shape == pil.shape == ((in_chans, 40, 24) if o >= 5 else (in_chans, 24, 40)), (path, ours.shape)
        assert (ours.int() - pil.int()).abs().float().mean() <= 0.5, path
        assert isinstance(jpeg_or_image(path.read_bytes(), in_chans), JpegFile) == (o == 1), path


# --------------------------------------------------------------------------------------------- bad files
def test_bad_files_are_skipped_and_counted(image_folder: Path) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # else truncated JPEGs silently decode as gray
    _add_bad_files(image_folder)
    ds = ImageFiles(find_images(image_folder), build_pretrain_transform(32, in_chans=3), in_chans=3)
    assert len(ds) == len(GOOD_NAMES) + 2
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)
    total, seen = 0, 0
    for x, skipped in loader:
        assert x.shape[1:] == (3, 32, 32) and skipped.dtype == torch.int64
        total += int(skipped.sum())
        seen += len(x)
    assert seen == len(ds) and total == 2  # two adjacent bad files: each counted once


def test_bad_file_warns_once_and_is_replaced_by_next(image_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    corrupt, truncated = _add_bad_files(image_folder)
    ds = ImageFiles(find_images(image_folder), None, in_chans=3)
    i = ds.paths.index(corrupt)
    assert ds.paths[i + 1] == truncated
    with caplog.at_level(logging.WARNING, logger="fcmae.data"):
        img, n = ds[i]
        ds[i]
        ds[i + 1]
    assert n == 1 and img.size == (40, 30)  # c_cmyk.jpg, the file after the two bad ones
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert str(corrupt) in messages[0] and str(truncated) in messages[1]


def test_batched_fetch_equals_item_by_item_with_bad_and_vanishing_files(image_folder: Path) -> None:
    """``__getitems__`` (the DataLoader's batched fetch: files read first, then decoded) gives exactly the items of
    ``ds[i]`` one by one, bad (or vanished) files replaced and counted the same; nothing stays cached after the
    batch."""
    corrupt, _ = _add_bad_files(image_folder)
    paths = find_images(image_folder)

    def make() -> SeededSamples:
        return SeededSamples(ImageFiles(paths, build_pretrain_transform(32, (0.3, 1.0), 0.5, 3), 3,
                                        decoder=decode_bytes), seed=3, labelled=False, mask_grid=(2, 2))

    order = [5, 0, len(paths) - 1, paths.index(corrupt), paths.index(corrupt) + 1, 5, -1]
    one, batch = make(), make()
    expected = [one[i] for i in order]
    got = batch.__getitems__(order)
    assert batch.base._fetched == {}
    for e, g in zip(expected, got):
        assert torch.equal(e.image, g.image) and torch.equal(e.target, g.target) and torch.equal(e.skipped, g.skipped)
    assert int(sum(g.skipped[0] for g in got)) == 2  # the corrupt one and the truncated one after it
    k = paths.index(image_folder / "d_gray.png")
    paths[k].unlink()  # vanished after the scan: its read error comes out at its decode; the next file replaces it
    gone = make().__getitems__([k, k + 1])
    assert [g.skipped.tolist() for g in gone] == [[1, 0, 0, 0, 0], [0] * 5] and gone[0].image.shape == (3, 32, 32)
    with pytest.raises(BadImageError, match=f"cannot read image .*{paths[k].name}: FileNotFoundError"):
        ImageFiles(paths, None, 3, on_bad_image="error").__getitems__([k])
    named = f"{corrupt.name}: UnidentifiedImageError: cannot identify image file '{corrupt}'$"  # no BytesIO repr
    with pytest.raises(BadImageError, match=named):
        ImageFiles(paths, None, 3, on_bad_image="error").__getitems__([paths.index(corrupt)])


def test_a_file_failing_in_the_second_phase_is_skipped_like_one_failing_in_the_first(tmp_path: Path) -> None:
    """Folder pretraining decodes in two phases (crop drawn from the JPEG header, then ``DecodeCrop``). A file whose
    header reads but whose decode fails is replaced by the next file and counted, exactly as a file that fails at
    once: the same items as the one-phase path over a copy where that file is plain garbage; with
    ``on_bad_image=error`` the error names it."""
    from fcmae.data.decode import JpegItem, jpeg_or_image
    from fcmae.data.transforms import DecodeCrop, DeferredCropU8

    folder = _jpeg_folder(tmp_path / "imgs")
    paths = find_images(folder)
    bad = paths[5]

    class FailsOn(DecodeCrop):
        def __call__(self, item: JpegItem) -> torch.Tensor:
            if item.name == str(bad):
                raise BadImageError(f"cannot read image {bad}: decoder gave up")
            return super().__call__(item)

    def two_phase(on_bad: str) -> SeededSamples:
        return SeededSamples(ImageFiles(paths, DeferredCropU8(32), 3, on_bad, decoder=jpeg_or_image), seed=4,
                             labelled=False, mask_grid=(2, 2), seed_globals=False, finish=FailsOn(32, 3))

    garbage = tmp_path / "ref"
    garbage.mkdir()
    ref_paths = []
    for p in paths:  # the same files, the bad one replaced by bytes no decoder takes
        ref_paths.append(garbage / p.name)
        ref_paths[-1].write_bytes(b"not an image" if p == bad else p.read_bytes())
    ref = SeededSamples(ImageFiles(ref_paths, build_pretrain_transform(32, in_chans=3), 3, decoder=decode_bytes),
                        seed=4, labelled=False, mask_grid=(2, 2), seed_globals=False)
    order = list(range(len(paths)))
    for got in (two_phase("skip").__getitems__(order), [two_phase("skip")[i] for i in order]):
        expected = [ref[i] for i in order]
        assert [g.skipped[0] for g in got] == [e.skipped[0] for e in expected] == [int(i == 5) for i in order]
        assert all(torch.equal(g.image, e.image) and torch.equal(g.target, e.target) for g, e in zip(got, expected))
    with pytest.raises(BadImageError, match=f"{bad}: decoder gave up"):
        two_phase("error").__getitems__(order)


def test_bad_file_error_mode_names_the_file(image_folder: Path) -> None:
    corrupt, truncated = _add_bad_files(image_folder)
    ds = ImageFiles(find_images(image_folder), None, on_bad_image="error")
    with pytest.raises(BadImageError, match="bad1_corrupt.jpg"):
        ds[ds.paths.index(corrupt)]
    with pytest.raises(BadImageError, match="bad2_truncated.jpg.*truncated"):
        ds[ds.paths.index(truncated)]


def test_zero_byte_and_all_bad(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not really")
    ds = ImageFiles(find_images(tmp_path))
    with pytest.raises(DataError, match="all 2 image files are unreadable"):
        ds[0]


def test_empty_or_missing_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no image files found under .*only_text.*\.jpg, \.jpeg, \.png"):
        find_images(tmp_path / "only_text")
    with pytest.raises(DataError, match="nope does not exist"):
        build_pretrain_dataset(DataConfig(source="folder", path=str(tmp_path / "nope")), 3)


# --------------------------------------------------------------------------------------------- layouts
def _imagenet_tree(root: Path) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for k in range(n):
                _rgb(k).save(root / split / cls / f"{k}.JPEG")


def test_imagenet_layout_uses_train_and_limit(tmp_path: Path) -> None:
    _imagenet_tree(tmp_path)
    ds = build_pretrain_dataset(DataConfig(source="imagenet", path=str(tmp_path), input_size=32), 3)
    assert len(ds) == 6 and all("train" in p.parts for p in ds.paths)
    x, n = ds[5]
    assert x.shape == (3, 32, 32) and n == 0
    ds = build_pretrain_dataset(DataConfig(source="imagenet", path=str(tmp_path / "val"), input_size=32, limit=3), 1)
    assert len(ds) == 3 and ds[0][0].shape == (1, 32, 32)
    folder = build_pretrain_dataset(DataConfig(source="folder", path=str(tmp_path), input_size=32), 3)
    assert len(folder) == 10


def test_labeled_folder(tmp_path: Path) -> None:
    _imagenet_tree(tmp_path)
    (tmp_path / "train" / "n02" / "0.JPEG").write_bytes(b"broken")
    ds = LabeledImageFolder(tmp_path / "train", build_eval_transform(32, in_chans=3), in_chans=3)
    assert ds.classes == ["n01", "n02"] and list(ds.targets) == [0, 0, 0, 1, 1, 1]
    x, label, n = ds[3]
    assert x.shape == (3, 32, 32) and label == 1 and n == 1
    x, label, n = ds[2]
    assert label == 0 and n == 0
    with pytest.raises(DataError, match="no class folders"):
        LabeledImageFolder(tmp_path / "train" / "n01")


# --------------------------------------------------------------------------------------------- Fashion-MNIST
def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    n, h, w = images.shape
    img = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, h, w)) + images.tobytes()
    lab = (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes()
    suffix = ".gz" if gz else ""
    pack = gzip.compress if gz else bytes
    (folder / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(pack(img))
    (folder / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(pack(lab))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_tiny_idx(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path, "t10k", images, labels, gz)
    ds = FashionMNIST(tmp_path, "test", in_chans=1)
    img, label = ds[2]
    assert len(ds) == 5 and label == 4 and img.mode == "L" and np.array_equal(np.asarray(img), images[2])
    img3, _ = FashionMNIST(tmp_path, "test", in_chans=3)[2]
    assert img3.mode == "RGB" and np.array_equal(np.asarray(img3)[..., 1], images[2])
    _write_idx(tmp_path, "train", images, labels, gz)
    ds = build_pretrain_dataset(DataConfig(source="fashion_mnist", path=str(tmp_path), input_size=32, limit=4), 3)
    x, n = ds[0]
    assert len(ds) == 4 and x.shape == (3, 32, 32) and n == 0


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes((2049).to_bytes(4, "big") + bytes(12))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is not an IDX images file: magic number 2049"):
        read_idx(bad, "images")
    short = tmp_path / "short"
    short.write_bytes((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28)) + bytes(10))
    with pytest.raises(DataError, match="short: header says"):
        read_idx(short, "images")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*not found"):
        FashionMNIST(tmp_path, "test")


@pytest.mark.skipif(not Path(DATASET_DEFAULT_FASHION_MNIST, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed")
def test_fashion_mnist_real_files() -> None:
    ds = FashionMNIST(DATASET_DEFAULT_FASHION_MNIST, "test", in_chans=1)
    img, label = ds[0]
    assert len(ds) == 10000 and img.size == (28, 28) and label == 9  # the test set starts with an ankle boot
    assert np.bincount(ds.labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------------------------- demo set
def test_demo_asset_contents() -> None:
    ds = DemoImages()
    assert demo_asset_path().stat().st_size < 600_000
    assert len(ds) == 1024 and ds.images.shape == (1024, 28, 28) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [103] * 4 + [102] * 6
    assert np.all(np.diff(ds.source_index) > 0)
    img, label = ds[0]
    assert img.size == (128, 128) and img.mode == "L" and label == 9


@pytest.mark.parametrize("in_chans", [1, 3])
def test_demo_pretrain_dataset_normalised(in_chans: int) -> None:
    ds = build_pretrain_dataset(DataConfig(source="demo", input_size=64), in_chans)
    u8 = torch.stack([ds[i][0] for i in range(16)])
    assert u8.shape == (16, in_chans, 64, 64) and u8.dtype == torch.uint8  # workers hand over uint8
    assert all(ds[i][1] == 0 for i in range(4))
    mean, std = mean_std(in_chans)
    x = DeviceNormalize(mean, std)(u8)
    pixels = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and x.min() < -1.5 and x.max() > 1.5
    if in_chans == 3:  # gray replicated: all channels carry the same pixels
        assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)
    assert len(build_pretrain_dataset(DataConfig(source="demo", input_size=64, limit=10), in_chans)) == 10


# --------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("in_chans", [1, 3])
def test_finetune_and_eval_transforms(in_chans: int) -> None:
    torch.manual_seed(0)
    img = _rgb(0, (80, 60))
    img = img.convert("L") if in_chans == 1 else img
    ft = build_finetune_transform(64, in_chans)
    outs = [ft(img) for _ in range(4)]
    assert all(o.shape == (in_chans, 64, 64) and o.dtype == torch.uint8 for o in outs)
    assert not torch.equal(outs[0], outs[1])
    x = DeviceNormalize(*mean_std(in_chans))(torch.stack(outs))
    erased = DeviceRandomErasing(1.0, "pixel", 1)(x.clone())
    assert erased.shape == x.shape and (erased != x).any() and torch.equal(DeviceRandomErasing(0.0)(x), x)
    ft_plain = build_finetune_transform(32, in_chans, auto_augment=None)
    assert ft_plain(img.convert("RGB")).shape == (in_chans, 32, 32)  # an RGB input for a gray model works too
    ev = build_eval_transform(48, in_chans=in_chans)
    y = ev(img)
    assert y.shape == (in_chans, 48, 48) and torch.equal(y, ev(img))
    assert ev.transforms[0].size == 54  # 48 / 0.875 = 54.86
    assert build_eval_transform(224).transforms[0].size == 256


def test_finetune_rgb_ops_keep_gray_images_gray() -> None:
    """The 1-channel finetune path relies on timm's RandAugment keeping replicated gray channels equal."""
    torch.manual_seed(0)
    gray = _rgb(1, (80, 60)).convert("L")
    to_rgb, timm_tf, to_u8, _ = build_finetune_transform(48, 1).transforms  # the three channels before the cut
    for _ in range(30):
        x = to_u8(timm_tf(to_rgb(gray)))
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])


def test_bad_in_chans() -> None:
    with pytest.raises(ValueError, match="in_chans must be 1 or 3"):
        build_pretrain_transform(32, in_chans=4)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_device_normalisation_equals_the_float_pipeline(in_chans: int) -> None:
    """uint8 crop normalised on the device == ToTensor + Normalize of the same crop (the old pipeline's float path)."""
    mean, std = mean_std(in_chans)
    crop = torch.randint(0, 256, (4, in_chans, 32, 48), dtype=torch.uint8)
    old = torch.stack([torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                                       torchvision.transforms.Normalize(mean, std)])(
        Image.fromarray(c.permute(1, 2, 0).squeeze(-1).numpy())) for c in crop])
    new = DeviceNormalize(mean, std)(crop)
    assert new.dtype == torch.float32 and (new - old).abs().max() <= 1e-6
    assert DeviceNormalize(mean, std)(new) is new  # float input passes through


def test_pretrain_augmentation_is_a_pure_function_of_seed_epoch_index(image_folder: Path) -> None:
    """The training set as a run builds it (two phases, batched fetch): no global RNG involved; any order, any
    global state, item by item or in batches, fresh dataset objects (as in workers) give the same crop, flip and
    mask for (seed, epoch, index); another epoch or seed gives another one."""
    from fcmae.config import PretrainDataConfig
    from fcmae.data import build_pretrain_train_set

    def make(seed: int) -> SeededSamples:
        cfg = PretrainDataConfig(source="folder", path=str(image_folder), input_size=32, crop_scale=(0.2, 1.0))
        return build_pretrain_train_set(cfg, 3, seed, (2, 2), 0.5)

    a, b = make(7), make(7)
    assert a.finish is not None  # the two-phase path is the one under test
    first = [a[i].image for i in range(len(a))]
    torch.manual_seed(123)
    np.random.seed(5)
    again = [b[i].image for i in reversed(range(len(b)))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    batched = [s.image for s in make(7).__getitems__([4, 0, 2]) + make(7).__getitems__([1, 3])]
    assert all(torch.equal(x, first[i]) for x, i in zip(batched, [4, 0, 2, 1, 3]))
    assert all(torch.equal(a[i].target, b[i].target) for i in range(len(a)))  # masks too
    b.use_epoch(1)
    assert not all(torch.equal(x, b[i].image) for i, x in enumerate(first))
    assert not all(torch.equal(x, make(8)[i].image) for i, x in enumerate(first))


def test_crop_params_follow_the_random_resized_crop_rule() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_params(375, 500, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
        assert 0.2 * 375 * 500 * 0.95 <= h * w <= 375 * 500 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    assert crop_params(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (0, 493, 10, 13)  # no fit: central crop


def test_path_list_is_compact_and_behaves_like_a_list(image_folder: Path) -> None:
    paths = find_images(image_folder)
    pl = PathList(paths)
    assert len(pl) == len(paths) and list(pl) == paths and pl[-1] == paths[-1] and pl[1:3] == paths[1:3]
    with pytest.raises(IndexError):
        pl[len(paths)]
    assert PathList([]).__len__() == 0
    uni = PathList([image_folder / "ünï cødé.jpg"])
    assert uni[0].name == "ünï cødé.jpg"


def test_file_list_is_written_once_and_read_instead_of_scanning(tmp_path: Path, image_folder: Path) -> None:
    """data.file_list: the first run scans and writes it; later runs (and other processes) read it, not the tree."""
    from fcmae.config import PretrainConfig, load_config
    from fcmae.train.pretraining import PretrainRecipe

    listing = tmp_path / "files.txt"
    cfg = load_config(PretrainConfig, None, ["data.source=folder", f"data.path={image_folder}", "data.input_size=64",
                                             f"data.file_list={listing}", "model.name=convnextv2_test"])
    first = PretrainRecipe(cfg).setup().train_set
    assert listing.read_text().splitlines() == [p.relative_to(image_folder).as_posix() for p in
                                                find_images(image_folder)]
    (image_folder / "new.png").write_bytes((image_folder / "a.png").read_bytes())  # not in the list: not seen
    second = PretrainRecipe(cfg).setup().train_set
    assert list(second.base.paths) == list(first.base.paths) == scan_or_read_file_list(image_folder, str(listing))
    listing.write_text("# comment\n\n")
    with pytest.raises(DataError, match="lists no files"):
        scan_or_read_file_list(image_folder, str(listing))


def _jpeg_folder(root: Path, n: int = 8) -> Path:
    """JPEGs (one EXIF-rotated, one CMYK, one gray) and a PNG."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 80, 3), dtype=np.uint8))
        if i == 1:
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated 90 degrees: decoders must return (80, 56)
            img.save(root / f"{i}.jpg", exif=exif.tobytes(), quality=90)
        elif i == 2:
            img.convert("CMYK").save(root / f"{i}.jpg", quality=90)
        elif i == 3:
            img.convert("L").save(root / f"{i}.jpg", quality=90)
        elif i == 4:
            img.save(root / f"{i}.png")
        else:
            img.save(root / f"{i}.jpg", quality=90)
    return root


@pytest.mark.parametrize("in_chans", [1, 3])
def test_gpu_decode_path_on_cpu_equals_the_cpu_path(tmp_path: Path, in_chans: int) -> None:
    """data.decode=gpu (bytes + crop parameters in the worker, batched decode + crop on the device), run with the
    device = CPU: the same images and masks as the CPU path, sample for sample."""
    from torch.utils.data import DataLoader

    from fcmae.config import PretrainDataConfig
    from fcmae.data import build_pretrain_train_set
    from fcmae.data.decode import JpegBatch, collate_samples
    from fcmae.data.transforms import DeviceDecoder

    folder = _jpeg_folder(tmp_path / "imgs")
    sets = {d: build_pretrain_train_set(PretrainDataConfig(source="folder", path=str(folder), input_size=32, decode=d),
                                        in_chans, 5, (1, 1), 0.0) for d in ("cpu", "gpu")}
    decoder = DeviceDecoder(32, in_chans)
    for epoch in (0, 1):
        batches = {}
        for d, ds in sets.items():
            ds.use_epoch(epoch)
            batches[d] = list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate_samples))
        for cpu, gpu in zip(batches["cpu"], batches["gpu"]):
            assert isinstance(gpu.image, JpegBatch) and cpu.image.dtype == torch.uint8
            assert torch.equal(decoder(gpu.image, "cpu"), cpu.image) and torch.equal(gpu.target, cpu.target)
    assert decoder(batches["cpu"][0].image, "cpu") is batches["cpu"][0].image  # tensors pass through


def test_device_decoder_turns_an_undecodable_jpeg_into_gray_and_names_it(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """data.decode=gpu: a file whose header passed in the worker but that no decoder takes does not end the run;
    the other images of the batch are the ones ``DecodeCrop`` gives."""
    from fcmae.data.decode import JpegBatch, JpegItem
    from fcmae.data.transforms import DecodeCrop, DeviceDecoder

    good = [_jpeg_bytes(k) for k in range(2)]
    items = [JpegItem(good[0], (0, 0, 40, 40, 0), name="a.jpg"),
             JpegItem(b"\xff\xd8 not really a jpeg \xff\xd9", (0, 0, 8, 8, 1), name="broken.jpg"),
             JpegItem(good[1], (4, 2, 30, 20, 1), name="b.jpg")]
    with caplog.at_level(logging.WARNING, logger="fcmae.data"):
        out = DeviceDecoder(16, 3)(JpegBatch(items), "cpu")
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(out[0], DecodeCrop(16, 3)(items[0])) and torch.equal(out[2], DecodeCrop(16, 3)(items[2]))
    assert bool((out[1] == 128).all()) and any("broken.jpg" in r.getMessage() for r in caplog.records)


def test_pretraining_with_gpu_decode_on_cpu_trains_on_the_same_batches(tmp_path: Path) -> None:
    """The whole trainer with data.decode=gpu on a CPU-only machine (the device decoder runs on the CPU): the
    same losses as data.decode=cpu, step for step."""
    from fcmae.config import PretrainConfig, load_config
    from fcmae.train.pretraining import run_pretraining

    folder = _jpeg_folder(tmp_path / "imgs")
    losses = {}
    for d in ("cpu", "gpu"):
        out = tmp_path / d
        cfg = load_config(PretrainConfig, None, [
            "model.name=convnextv2_test", "model.decoder_embed_dim=16", "data.source=folder", f"data.path={folder}",
            "data.input_size=64", f"data.decode={d}", "data.num_workers=0", "optim.lr=1e-3", "optim.steps=3",
            "optim.warmup_steps=1", "run.batch_size=4", "run.log_every=1", "run.export_every_epochs=0",
            "run.num_vis_images=2", "run.progress=false", "run.threads=1", "run.mixed_precision=no",
            f"run.output_dir={out}"])
        run_pretraining(cfg)
        losses[d] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                     if r.get("type") == "train"]
    assert len(losses["cpu"]) == 3 and losses["cpu"] == losses["gpu"]
