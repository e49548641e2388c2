"""RoPE and ALiBi against independent references (the formulas and the published slopes)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model.positions import alibi_slopes, apply_rope


def test_alibi_slopes_published_values():
    # Press et al.: 8 heads -> 1/2 ... 1/256; 16 heads -> 2^-0.5 ... 2^-8
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(16), [2.0 ** -(0.5 * (i + 1)) for i in range(16)],
                               rtol=1e-6)
    # 12 heads: the 8-head slopes then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (Press et al. 2022, ALiBi,
    # sec. 3: non-power-of-two head counts)
    want12 = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5,
                                                     2.0 ** -3.5]
    np.testing.assert_allclose(alibi_slopes(12), want12, rtol=1e-6)
    # 6 heads: 4-head slopes (2^-2, 2^-4, 2^-6, 2^-8) then the first two of every other
    # slope of the 8-head sequence (2^-1, 2^-3)
    np.testing.assert_allclose(alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                                 2.0 ** -1, 2.0 ** -3], rtol=1e-6)


def test_alibi_slopes_rejects_zero_heads():
    with pytest.raises(ValueError):
        alibi_slopes(0)


def rope_direct(x, positions, base=10000.0):
    """Rotation matrix applied pair by pair, half-split layout: pair i = (x[i], x[i + d/2])."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    b, s, _h, d = x.shape
    for bi in range(b):
        for t in range(s):
            m = positions[bi, t]
            for i in range(d // 2):
                theta = base ** (-2.0 * i / d)
                c, sn = math.cos(m * theta), math.sin(m * theta)
                a, bb = x[bi, t, :, i], x[bi, t, :, i + d // 2]
                out[bi, t, :, i] = c * a - sn * bb
                out[bi, t, :, i + d // 2] = sn * a + c * bb
    return out


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_apply_rope_matches_rotation_formula(base):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 0, 1, 100, 2]])
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), base))
    np.testing.assert_allclose(got, rope_direct(x, pos, base), atol=2e-5, rtol=1e-5)


def test_rope_relative_property():
    # <rope(q, m), rope(k, n)> depends only on m - n
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)

    def dot(m, n):
        a = apply_rope(jnp.asarray(q), jnp.asarray([[m]]))
        b = apply_rope(jnp.asarray(k), jnp.asarray([[n]]))
        return float((a * b).sum())
    assert abs(dot(5, 3) - dot(12, 10)) < 1e-4
    assert abs(dot(5, 3) - dot(3, 5)) > 1e-3
