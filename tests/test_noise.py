"""Per-sample noise in blocks: the numbers are a function of the seed and the draw only (not of the block sizes, the
batch, the device, or drawing ahead), and a block is one call per sample."""
import math
import threading

import pytest
import torch

from ddpmkit.sampling.noise import NoiseSource, block_draws, padded


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (2,), (3, 5, 7), (4, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_draw_is_one_randn_per_sample_whatever_the_blocks(shape, dtype):
    """torch's CPU sampler makes K draws of a multiple of 16 values as one call of K rows: the property blocks rely on."""
    noise = NoiseSource(3, [7, 8, 9])
    got = [noise.randn(shape, dtype) for _ in range(11)]  # blocks of 1, 1, 2, 4, 8... draws
    for k, seed in enumerate((7, 8, 9)):
        g, n = torch.Generator().manual_seed(seed), math.prod(shape)
        want = [torch.randn(padded(n), generator=g, dtype=dtype)[:n].reshape(shape) for _ in range(11)]
        assert all(torch.equal(z[k], w) for z, w in zip(got, want))


def test_blocks_grow_to_a_cap_per_sample_and_per_block():
    assert [block_draws(k, 784, 500) for k in range(8)] == [1, 1, 2, 4, 8, 16, 32, 32]
    assert [block_draws(k, 3072) for k in range(6)] == [1, 1, 2, 4, 8, 8]
    assert {block_draws(k, 3 * 128 * 128) for k in range(6)} == {1}
    assert [block_draws(k, 784, 8192) for k in range(4)] == [1, 1, 2, 2]  # 64 MB a block at most


def test_a_batch_whose_blocks_are_capped_draws_the_same_numbers(monkeypatch):
    """Blocks of 1 draw for a big batch, of up to 32 for a small one: each sample's numbers are its definition's."""
    from ddpmkit.sampling import noise as module

    monkeypatch.setattr(module, "BLOCK_TOTAL", 3 * 32)  # 3 samples of 32 values: one draw a block
    capped = NoiseSource(3, [4, 5, 6])
    assert [block_draws(k, 32, 3) for k in range(4)] == [1, 1, 1, 1]
    got = [capped.randn((2, 16)) for _ in range(6)]
    alone = NoiseSource(1, [5])  # one sample: blocks of 1, 1, 2, 4 draws
    assert all(torch.equal(z[1], alone.randn((2, 16))[0]) for z in got)


@pytest.mark.parametrize("workers", [1, 3])
def test_drawing_ahead_changes_no_number_even_when_the_shape_changes_midway(monkeypatch, workers):
    """On a GPU the next block is drawn on worker threads, a slice of the samples each; a request for another shape or
    dtype puts the generators back, so the numbers are those drawn one block at a time."""
    from ddpmkit.sampling import noise as module

    monkeypatch.setattr(module, "WORKERS", workers)
    requests = [((1, 4, 4), torch.float32)] * 5 + [((2, 3), torch.float32)] * 3 + [((1, 4, 4), torch.float64)] * 4
    outs = []
    for prefetch in (False, True):
        noise = NoiseSource(4, [0, 1, 2, 3], prefetch=prefetch)
        outs.append([noise.randn(shape, dtype) for shape, dtype in requests])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    # and a sample's numbers do not depend on its batch
    alone = NoiseSource(1, [2], prefetch=True)
    assert all(torch.equal(alone.randn(shape, dtype)[0], z[2]) for (shape, dtype), z in zip(requests, outs[1]))


def test_the_block_drawn_ahead_is_the_one_used_while_the_shape_stays(monkeypatch):
    """Drawing ahead pays only if the sampler takes the block the threads drew: for one shape, every block after the
    first comes from them, none is drawn again on the sampler's thread (a changed shape, above, draws anew)."""
    from ddpmkit.sampling import noise as module

    fill, on_the_spot = module._fill, []

    def counted(block, generators, lo, hi, save_states):
        if not save_states:  # the sampler's own, synchronous draw
            on_the_spot.append(block.shape)
        return fill(block, generators, lo, hi, save_states)

    monkeypatch.setattr(module, "_fill", counted)
    noise = NoiseSource(2, [0, 1], prefetch=True)
    for _ in range(8):  # blocks of 1, 1, 2, 4 draws
        noise.randn((1, 4, 4))
    assert noise._blocks_drawn == 4 and len(on_the_spot) == 1


def test_a_block_is_one_call_per_sample(monkeypatch):
    calls, me = [], threading.current_thread()
    randn = torch.randn

    def counted(*args, **kwargs):
        if threading.current_thread() is me:  # not a sampling thread an earlier test of this worker left finishing its step
            calls.append(args)
        return randn(*args, **kwargs)

    noise = NoiseSource(5, 0)
    monkeypatch.setattr(torch, "randn", counted)
    for _ in range(1 + 1 + 2 + 4 + 8):  # five blocks
        noise.randn((1, 28, 28))
    assert len(calls) == 5 * 5


def test_the_cascades_stream_offsets_are_streams_apart_under_torchs_32_bit_seeds():
    """torch's CPU generator keeps a seed's low 32 bits (2**32 + k draws what k draws): offsets of 2**32 and 2**40 had
    given a cascade's stages and the augmentation noise sample k's base noise again."""
    from ddpmkit.pipelines.cascade import STAGE_SEED_OFFSET
    from ddpmkit.superres import AUG_SEED_OFFSET

    def first(seed: int) -> torch.Tensor:
        return torch.randn(16, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(first(2**32 + 5), first(5))  # why the offsets are below 2**32
    streams = [i * STAGE_SEED_OFFSET + a for i in range(3) for a in (0, AUG_SEED_OFFSET)]  # 3 stages, each sampler and augmentation
    gaps = [(a - b) % 2**32 for a in streams for b in streams if a != b]
    assert min(gaps) > 10**8  # cascades of fewer samples never share a seed between two streams
    assert not any(torch.equal(first(s % 2**32 + 7), first(7)) for s in streams[1:])


def test_noise_comes_contiguous_like_a_fresh_tensor():
    noise = NoiseSource(3, 0)
    assert all(noise.randn((1, 4, 4)).is_contiguous() for _ in range(6))


def test_a_forked_child_draws_ahead_with_threads_of_its_own():
    """The worker threads do not survive a fork; a child that samples (e.g. a data-loading worker) must not wait on them."""
    import os

    NoiseSource(2, [0, 1], prefetch=True).randn((4,))  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 if it drew, 1 on an error; a wait on dead threads ends at the alarm (exit code -14)
        import signal

        ok = False
        try:
            signal.alarm(20)
            noise = NoiseSource(2, [0, 1], prefetch=True)
            ok = all(z.shape == (2, 4) for z in (noise.randn((4,)) for _ in range(5)))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
