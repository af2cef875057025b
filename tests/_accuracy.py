"""The accuracy rule every parity test applies, in one place.

For each compared quantity our max-abs error against a float64 reference must be
at most twice nn.BatchNorm2d's own max-abs error on the same (low-precision) input
plus a tiny dtype-keyed floor:

    err(ours) <= 2 * err(nn) + FLOOR[dtype] * max|reference|

NaN/Inf never pass unless nn produces them at exactly the same positions.
"""
import torch

# Relative floors, multiplied by the magnitude (max |reference|) of the quantity.
# float32: ~8 ulps; float64: ~4500 ulps of 2**-52 but still 1e-12; bfloat16 and
# float16: one ulp of the quantity's scale (finfo.eps is the ulp at 1.0).
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}


def floor_for(dtype, scale):
    return FLOOR[dtype] * float(scale)


def check_bound(err_ours, err_nn, scale, dtype, name, detail=""):
    """The rule itself, on precomputed errors (used by chunked checks of huge tensors)."""
    floor = floor_for(dtype, scale)
    bound = 2.0 * err_nn + floor
    assert err_ours <= bound, (
        f"{name}: ours max-abs error {err_ours:.6e} exceeds 2 x nn error {err_nn:.6e} "
        f"+ floor {floor:.3e} (= {bound:.6e}); dtype {dtype}, scale {scale:.4e}{detail}")


def assert_same_nonfinite(ours, nn_result, name):
    nan_o, nan_n = torch.isnan(ours), torch.isnan(nn_result)
    if not torch.equal(nan_o, nan_n):
        extra = (nan_o & ~nan_n).nonzero()[:5].tolist()
        missing = (nan_n & ~nan_o).nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: NaN positions differ from nn: ours has {int(nan_o.sum())} NaN, nn "
            f"{int(nan_n.sum())}; NaN only in ours at e.g. {extra}, only in nn at e.g. {missing}")
    inf_o, inf_n = torch.isinf(ours), torch.isinf(nn_result)
    if not torch.equal(inf_o, inf_n) or not torch.equal(ours[inf_o], nn_result[inf_n]):
        raise AssertionError(f"{name}: +-Inf positions or signs differ from nn")


def max_abs_error(value, reference, mask):
    if not bool(mask.any()):
        return 0.0, None
    diff = (value - reference).abs()
    diff = torch.where(mask, diff, torch.zeros_like(diff))
    flat = int(diff.argmax())
    return float(diff.reshape(-1)[flat]), flat


def assert_accurate(ours, nn_result, reference, dtype=None, name="value"):
    """Assert ``ours`` meets the accuracy rule.

    ours, nn_result: our and nn.BatchNorm2d's result for the same low-precision
    input and parameters; reference: the float64 result. ``dtype`` keys the floor
    (default: the dtype of ``ours``).
    """
    assert isinstance(ours, torch.Tensor), f"{name}: ours is {type(ours)}, not a tensor"
    dtype = dtype or ours.dtype
    assert ours.shape == nn_result.shape == reference.shape, (
        f"{name}: shapes differ: ours {tuple(ours.shape)}, nn {tuple(nn_result.shape)}, "
        f"reference {tuple(reference.shape)}")
    o = ours.detach().cpu().to(torch.float64)
    n = nn_result.detach().cpu().to(torch.float64)
    r = reference.detach().cpu().to(torch.float64)
    assert_same_nonfinite(o, n, name)
    mask = torch.isfinite(n) & torch.isfinite(r)
    err_o, worst = max_abs_error(o, r, mask)
    err_n, _ = max_abs_error(n, r, mask)
    scale = float(r[mask].abs().max()) if bool(mask.any()) else 0.0
    detail = ""
    if worst is not None:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), o.shape)) if o.dim() else ()
        detail = (f"; worst at index {idx}: ours {float(o.reshape(-1)[worst]):.9g}, "
                  f"nn {float(n.reshape(-1)[worst]):.9g}, reference {float(r.reshape(-1)[worst]):.9g}; "
                  f"shape {tuple(o.shape)}")
    check_bound(err_o, err_n, scale, dtype, name, detail)


def assert_consistent(ours_a, ours_b, nn_a, nn_b, dtype=None, name="value"):
    """Our disagreement between two runs (e.g. CUDA vs CPU) must be at most twice
    nn's disagreement between the same two runs plus the floor."""
    dtype = dtype or ours_a.dtype
    oa, ob = (t.detach().cpu().to(torch.float64) for t in (ours_a, ours_b))
    na, nb = (t.detach().cpu().to(torch.float64) for t in (nn_a, nn_b))
    assert_same_nonfinite(oa, ob, name + " (ours a vs b)")
    assert_same_nonfinite(na, oa, name + " (nn a vs ours a)")
    mask = torch.isfinite(oa) & torch.isfinite(na) & torch.isfinite(nb)
    err_o, _ = max_abs_error(oa, ob, mask)
    err_n, _ = max_abs_error(na, nb, mask)
    scale = float(ob[mask].abs().max()) if bool(mask.any()) else 0.0
    check_bound(err_o, err_n, scale, dtype, name, "; (cross-run disagreement)")
