import numpy as np
import pytest
import torch

from stages import pack, rowquant, storage


def rowmax_scale(w, bits):
    return rowquant.percentile_scale(w, 100.0, rowquant.qmax_of(bits))


def rows_entry(w, bits):
    """The plain per-row round-to-nearest entry that every storage form is compared against."""
    scale = rowmax_scale(w, bits)
    q = rowquant.round_to_nearest(w, scale, rowquant.qmax_of(bits))
    entry = {"kind": "rows", "shape": list(w.shape), "bits": bits, "method": "rtn", "scale": scale.numpy(),
             "container": "packed", "data": pack.pack_codes(q.numpy(), bits)}
    return entry, rowquant.dequantize_rows(q, scale)


def predictable_columns(rows=64, cols=96, seed=0):
    """Random columns, except every 4th interior one is an exact a·left + b·right of its neighbours."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    for j in range(1, cols - 1, 4):
        w[:, j] = 0.7 * w[:, j - 1] - 0.4 * w[:, j + 1]
    return w


def laplacian(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=gen) - 0.5
    return -u.sign() * torch.log1p(-2 * u.abs())


def encoded(kind, bits=4):
    """(w, entry, w_hat) of one small matrix in storage form `kind`."""
    gen = torch.Generator().manual_seed(7)
    w = predictable_columns() if kind == "freeze_dry" else torch.randn(48, 70, generator=gen)
    scale = rowmax_scale(w, bits)
    if kind == "sparse24":
        return (w, *storage.encode_sparse24(w, bits, scale))
    if kind == "codebook":
        return (w, *storage.encode_codebook(w, bits, scale))
    if kind == "freeze_dry":
        return (w, *storage.encode_freeze_dry(w, bits, scale, tau=0.2, min_fraction=0.05))
    return (w, *storage.encode_mixed_rows(w, torch.linspace(0, 1, w.shape[0]), 3, 6, 0.25, rowmax_scale))


def through_artifact(entry):
    payload = pack.pack_tensors([dict(entry, name="w")], {}, {})
    _, tensors = pack.unpack_tensors(pack.decompress(pack.compress(payload, "zlib")))
    return tensors[0], pack.reconstruct(tensors[0])


EXERCISED = {  # each form really does its thing on the matrix `encoded` gives it
    "sparse24": lambda e, w_hat: (w_hat[:, :68] != 0).reshape(48, 17, 4).sum(-1).max() <= 2,
    "codebook": lambda e, w_hat: not np.array_equal(e["levels"], np.arange(-8, 8)),
    "freeze_dry": lambda e, w_hat: e["dropped"] > 0,
    "mixed_rows": lambda e, w_hat: set(e["row_bits"].tolist()) == {3, 6},
}


@pytest.mark.filterwarnings("error")  # e.g. torch's warning on a read-only numpy array
@pytest.mark.parametrize("kind", sorted(storage.DECODERS))
def test_every_form_round_trips_exactly_through_the_artifact(kind):
    w, entry, w_hat = encoded(kind)
    assert EXERCISED[kind](entry, w_hat)
    assert entry["kind"] == kind and w_hat.dtype == torch.float32 and list(w_hat.shape) == entry["shape"]
    assert torch.equal(storage.DECODERS[kind](entry), w_hat)
    loaded, rebuilt = through_artifact(entry)
    assert not next(v for v in loaded.values() if isinstance(v, np.ndarray)).flags.writeable
    assert torch.equal(rebuilt, w_hat)
    plain, _ = rows_entry(w, 4)
    assert plain["kind"] != kind and set(entry) - set(plain)
    assert pack.pack_tensors([dict(entry, name="w")], {}, {}) != pack.pack_tensors([dict(plain, name="w")], {}, {})
    assert storage.stored_bytes(entry) == sum(v.nbytes for v in entry.values() if isinstance(v, np.ndarray))


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_private_bit_packing_matches_pack_codes(bits):
    qmax = rowquant.qmax_of(bits)
    q = np.random.default_rng(bits).integers(-qmax, qmax + 1, size=333).astype(np.int8)
    packed = storage._pack_signed(q, bits)
    assert np.array_equal(packed, pack.pack_codes(q, bits))
    assert np.array_equal(storage._unpack_signed(packed, bits, len(q)).numpy(), q)


@pytest.mark.parametrize("cols", [64, 70])
def test_sparse24_keeps_the_two_largest_of_every_four(cols):
    gen = torch.Generator().manual_seed(cols)
    # |w| in [0.2, 1]: no kept value rounds to zero at 4 bits with a row-max scale
    w = (torch.rand(32, cols, generator=gen) * 0.8 + 0.2) * torch.randn(32, cols, generator=gen).sign()
    entry, w_hat = storage.encode_sparse24(w, 4, rowmax_scale(w, 4))
    pad = -cols % 4
    groups = torch.nn.functional.pad(w_hat, (0, pad)).reshape(32, -1, 4)
    assert ((groups != 0).sum(-1) == 2).all()
    top2 = torch.nn.functional.pad(w.abs(), (0, pad)).reshape(32, -1, 4).topk(2, dim=-1).indices
    assert (groups.gather(-1, top2) != 0).all()
    kept = w_hat != 0
    assert ((w_hat - w)[kept].abs() <= rowmax_scale(w, 4).float()[:, None].expand_as(w)[kept] * 0.51).all()
    assert storage.stored_bytes(entry) < storage.stored_bytes(rows_entry(w, 4)[0])
    assert set(entry) == {"kind", "shape", "bits", "scale", "values", "patterns"}


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dist", ["gaussian", "laplacian"])
def test_codebook_is_never_worse_than_round_to_nearest(bits, dist):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits)) if dist == "gaussian" \
        else laplacian(64, 256, bits)
    w = w * torch.linspace(0.5, 2.0, 64)[:, None]  # rows of different spread
    entry, w_hat = storage.encode_codebook(w, bits, rowmax_scale(w, bits))
    levels = entry["levels"].astype(np.float32)
    assert entry["levels"].dtype == np.float16 and len(levels) == 2 ** bits and (np.diff(levels) >= 0).all()
    codebook_error = float((w_hat - w).norm())
    rtn_error = float((rows_entry(w, bits)[1] - w).norm())
    assert codebook_error <= rtn_error
    if dist == "laplacian":
        assert codebook_error < 0.85 * rtn_error


def test_freeze_dry_drops_predictable_columns():
    w = predictable_columns()
    scale = rowmax_scale(w, 6)
    entry, w_hat = storage.encode_freeze_dry(w, 6, scale, tau=0.1, min_fraction=0.05)
    dropped = entry["dropped_columns"].astype(int)
    assert entry["dropped"] == len(dropped) > 0 and set(dropped) <= set(range(1, 95, 4))
    assert (np.diff(dropped) > 1).all() and dropped.min() > 0 and dropped.max() < w.shape[1] - 1
    rel = (w_hat - w)[:, dropped].norm(dim=0) / w[:, dropped].norm(dim=0)
    assert (rel < 0.1).all()
    assert np.allclose(entry["coefs"].astype(np.float32), [0.7, -0.4], atol=0.02)
    undropped, _ = storage.encode_freeze_dry(w, 6, scale, tau=0.0, min_fraction=0.0)
    assert undropped["dropped"] == 0
    assert storage.stored_bytes(entry) < storage.stored_bytes(undropped)
    assert len(entry["codes"]) < len(undropped["codes"]) == len(rows_entry(w, 6)[0]["data"])


def test_freeze_dry_never_drops_adjacent_columns_even_when_all_are_predictable():
    w = torch.outer(torch.randn(32), torch.ones(40)) * torch.linspace(1, 2, 40)  # rank 1: every column fits
    entry, w_hat = storage.encode_freeze_dry(w, 6, rowmax_scale(w, 6), tau=0.1, min_fraction=0.05)
    dropped = entry["dropped_columns"].astype(int)
    assert len(dropped) >= 13 and (np.diff(dropped) > 1).all()
    assert torch.allclose(w_hat, w, rtol=0, atol=0.05 * float(w.abs().max()))


def test_freeze_dry_keeps_everything_on_unpredictable_or_rarely_predictable_columns():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    entry, w_hat = storage.encode_freeze_dry(w, 6, rowmax_scale(w, 6), tau=0.1, min_fraction=0.0)
    assert entry["dropped"] == 0 and len(entry["dropped_columns"]) == 0
    assert torch.equal(w_hat, rows_entry(w, 6)[1])
    w = predictable_columns()  # 24 of 96 columns predictable: under a 50% minimum nothing is dropped
    entry, _ = storage.encode_freeze_dry(w, 6, rowmax_scale(w, 6), tau=0.1, min_fraction=0.5)
    assert entry["dropped"] == 0


def test_mixed_rows_gives_the_most_sensitive_rows_more_bits():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(40, 64, generator=gen)
    sensitivity = storage.row_sensitivity(w, torch.rand(40, 64, generator=gen) * torch.rand(40, 1, generator=gen))
    entry, w_hat = storage.encode_mixed_rows(w, sensitivity, 3, 6, 0.25, rowmax_scale)
    high = np.zeros(40, dtype=bool)
    high[np.argsort(-sensitivity.numpy())[:10]] = True
    assert np.array_equal(entry["row_bits"], np.where(high, 6, 3).astype(np.uint8))
    assert entry["row_bits"].dtype == np.uint8 and entry["scale"].dtype == np.float16
    rel = ((w_hat - w).norm(dim=1) / w.norm(dim=1)).numpy()
    assert rel[high].max() < rel[~high].min()
    all_low, w_low = storage.encode_mixed_rows(w, sensitivity, 3, 6, 0.0, rowmax_scale)
    all_high, w_high = storage.encode_mixed_rows(w, sensitivity, 3, 6, 1.0, rowmax_scale)
    assert storage.stored_bytes(all_low) < storage.stored_bytes(entry) < storage.stored_bytes(all_high)
    # an empty precision class survives the artifact too
    assert len(all_low["codes_high"]) == 0 and torch.equal(through_artifact(all_low)[1], w_low)
    assert len(all_high["codes_low"]) == 0 and torch.equal(through_artifact(all_high)[1], w_high)


def test_row_sensitivity_is_the_row_sum_of_grad_sq_times_w_sq():
    w, g = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[4.0, 1.0], [1.0, 9.0]])
    assert torch.equal(storage.row_sensitivity(w, g), torch.tensor([8.0, 9.0]))


@pytest.mark.parametrize("call, name", [
    (lambda w, s: storage.encode_sparse24(w, 9, s), "bits"),
    (lambda w, s: storage.encode_codebook(w, 1, s), "bits"),
    (lambda w, s: storage.encode_codebook(w, 4.5, s), "bits"),
    (lambda w, s: storage.encode_sparse24(w, 4, s[:3]), "scale"),
    (lambda w, s: storage.encode_codebook(w[0], 4, s), "w"),
    (lambda w, s: storage.encode_freeze_dry(w, 4, s, 0.1, 1.5), "min_fraction"),
    (lambda w, s: storage.encode_freeze_dry(w, 4, s, -0.1, 0.1), "tau"),
    (lambda w, s: storage.encode_mixed_rows(w, torch.ones(8), 3, 6, 1.2, rowmax_scale), "high_fraction"),
    (lambda w, s: storage.encode_mixed_rows(w, torch.ones(8), 3, 6, -0.1, rowmax_scale), "high_fraction"),
    (lambda w, s: storage.encode_mixed_rows(w, torch.ones(8), 1, 6, 0.5, rowmax_scale), "low_bits"),
    (lambda w, s: storage.encode_mixed_rows(w, torch.ones(8), 6, 6, 0.5, rowmax_scale), "high_bits"),
    (lambda w, s: storage.encode_mixed_rows(w, torch.ones(7), 3, 6, 0.5, rowmax_scale), "row_sensitivity"),
])
def test_bad_arguments_name_the_argument(call, name):
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=name):
        call(w, rowmax_scale(w, 4))
