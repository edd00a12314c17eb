"""The pictures, written out: pixel values, where each image sits in a grid, a GIF's frames and timing, and the
radially averaged power spectrum on signals whose spectrum is known (a cosine, white noise)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.viz import make_grid, radial_power_spectrum, save_gif, save_grid, to_uint8


def test_to_uint8_maps_minus_one_to_0_and_one_to_255_channels_last():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 1, 7)
    assert to_uint8(x).ravel().tolist() == [0, 0, 64, 128, 191, 255, 255]  # (x + 1) * 127.5, rounded half to even
    rgb = torch.stack([torch.full((2, 3), v) for v in (-1.0, 0.0, 1.0)])[None]  # (1, 3, 2, 3): red 0, green 128, blue 255
    out = to_uint8(rgb)
    assert out.shape == (1, 2, 3, 3) and out.dtype == np.uint8 and (out[0] == [0, 128, 255]).all()


def test_make_grid_places_image_i_at_row_i_div_cols_and_column_i_mod_cols_on_white():
    levels = torch.tensor([-1.0, -0.6, -0.2, 0.2, 0.6])
    x = levels[:, None, None, None].expand(5, 1, 2, 3)  # 5 images of 2x3 pixels, image i all one level
    grid = make_grid(x)  # 3 columns (the ceiling of sqrt(5)), 2 rows, 2 pixels between and around
    assert grid.shape == (2 * (2 + 2) + 2, 3 * (3 + 2) + 2, 1)
    expected = np.full(grid.shape, 255, dtype=np.uint8)
    for i, level in enumerate(to_uint8(levels[:, None, None, None])[:, 0, 0, 0]):
        r, c = divmod(i, 3)
        expected[2 + 4 * r: 2 + 4 * r + 2, 2 + 5 * c: 2 + 5 * c + 3] = level
    assert (grid == expected).all()
    assert make_grid(x, nrow=2).shape == (3 * 4 + 2, 2 * 5 + 2, 1)  # nrow is the number of columns
    assert make_grid(x, upscale=2).shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 1)  # the saved grids' default
    ramp = torch.linspace(-1, 1, 6).reshape(1, 1, 2, 3)
    big = make_grid(ramp, upscale=3, pad=0)  # each pixel a 3x3 block
    assert (big[..., 0] == np.kron(to_uint8(ramp)[0, ..., 0], np.ones((3, 3), dtype=np.uint8))).all()


def test_saved_grid_and_gif_hold_the_pictures_and_their_timing(tmp_path):
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    with Image.open(save_grid(x, tmp_path / "grid.png")) as im:  # saved at twice the size
        assert (np.asarray(im) == make_grid(x, upscale=2)).all()
    with Image.open(save_grid(x[:, :1], tmp_path / "grey.png")) as im:  # one channel: a greyscale PNG
        assert im.mode == "L" and (np.asarray(im) == make_grid(x[:, :1], upscale=2)[..., 0]).all()
    frames = [make_grid(x * w) for w in (1.0, 0.5, 0.0)]
    with Image.open(save_gif(frames, tmp_path / "a.gif", duration_ms=40, hold_last_ms=900)) as im:
        assert im.n_frames == 3 and im.info["loop"] == 0
        durations = []
        for k in range(3):
            im.seek(k)
            durations.append(im.info["duration"])
            assert (np.asarray(im.convert("RGB")) == frames[k]).all()
    assert durations == [40, 40, 900]  # the last frame is held


@pytest.mark.parametrize("shape", [(32, 32), (16, 24)])
def test_a_cosine_of_k_cycles_is_at_k_over_n_and_white_noise_is_flat_at_its_variance(shape):
    H, W = shape
    n = min(H, W)
    k = 5  # cycles across the short side
    line = torch.cos(2 * math.pi * k / n * torch.arange(n, dtype=torch.float64))
    wave = (line[:, None] if n == H else line[None, :]).expand(H, W)  # varying along the short side
    f, p = radial_power_spectrum(wave.reshape(1, 1, H, W))
    assert np.allclose(f, np.arange(1, n // 2 + 1) / n) and f[int(np.argmax(p))] == pytest.approx(k / n)  # 1/n .. Nyquist
    # the cosine's power, |FFT|^2 / (H W) = H W / 4 at each of its 2 frequencies, averaged over its ring's frequencies
    ring = np.isclose(f, k / n)
    fy, fx = np.fft.fftfreq(H), np.fft.fftfreq(W)
    in_ring = int((np.rint(np.hypot(fy[:, None], fx[None]) * n) == k).sum())
    assert p[ring][0] == pytest.approx(2 * (H * W / 4) / in_ring, rel=1e-9)
    noise = 0.7 * torch.randn(400, 1, H, W, generator=torch.Generator().manual_seed(0))
    _, p = radial_power_spectrum(noise)
    assert np.allclose(p, 0.49, rtol=0.15) and np.mean(p) == pytest.approx(0.49, rel=0.03)


def test_the_lessons_show_grey_levels_as_they_are_not_stretched(monkeypatch):
    """lessons.show draws images in [-1, 1] as the grid's 8-bit grey levels on the fixed range 0..255: a level is itself
    / 255 on screen (an image of a narrow range is not stretched to black and white), and the grid's white is white."""
    import matplotlib.pyplot as plt

    from ddpmkit import lessons

    shown = []
    monkeypatch.setattr(lessons.plt, "show", lambda: shown.append(plt.gcf()))
    x = torch.linspace(-0.5, 0.5, 16).reshape(1, 1, 4, 4)
    lessons.show(x, "a narrow range")
    image = shown[0].axes[0].images[0]
    levels = np.asarray(image.get_array(), dtype=np.float64)
    assert levels.shape == (8, 8) and (levels[2:6, 2:6] == to_uint8(x)[0, ..., 0]).all()  # 64..191 inside a white border
    assert np.allclose(image.norm(levels), levels / 255, rtol=0, atol=1e-12) and image.norm(255.0) == 1.0
    plt.close(shown[0])
