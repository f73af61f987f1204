//! 2-D max and average pooling over NCHW in f64 (square window `k`, stride `s`, no padding, floor output
//! size), with PyTorch's rules: max keeps the first maximum in row-major window order and its backward
//! routes each output gradient to that position; average weighs every window value `1/k²`.

use crate::ops::pool::{Pool2dShape, PoolKind};

/// The positions (within an `H × W` plane, row-major) of output (i, j)'s window.
fn window(s: &Pool2dShape, i: usize, j: usize) -> impl Iterator<Item = usize> + '_ {
    let (h0, w0) = (i * s.stride, j * s.stride);
    (0..s.kernel).flat_map(move |a| (0..s.kernel).map(move |b| (h0 + a) * s.w + w0 + b))
}

/// The smallest gap over `x` between a max-pooling window's largest value and the next smaller one: how
/// close the input is to a tie, where the backward's routing jumps. Exact ties of the largest value are
/// not counted: they come from identical computations (ReLU zeros; a convolution's bias alone where its
/// receptive field saw only zeros), which an f32 engine reproduces exactly and breaks by the same rule.
/// Windows with no smaller value (1×1, or all equal) are skipped.
pub fn smallest_max_gap(x: &[f64], s: &Pool2dShape) -> f64 {
    let (oh, ow) = s.out_hw();
    let mut gap = f64::INFINITY;
    for xp in x.chunks(s.h * s.w) {
        for (i, j) in (0..oh).flat_map(|i| (0..ow).map(move |j| (i, j))) {
            let (mut first, mut second) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
            for at in window(s, i, j) {
                let v = xp[at];
                if v > first {
                    (first, second) = (v, first);
                } else if v < first && v > second {
                    second = v;
                }
            }
            if second.is_finite() {
                gap = gap.min(first - second);
            }
        }
    }
    gap
}

/// Forward: the output `[N, C, OH, OW]` and, for max pooling, the index of each maximum within its
/// `H × W` plane (empty for average pooling).
pub fn forward(x: &[f64], s: &Pool2dShape, kind: PoolKind) -> (Vec<f64>, Vec<usize>) {
    let (oh, ow) = s.out_hw();
    let mut y = Vec::with_capacity(s.out_len());
    let mut argmax = Vec::new();
    for plane in 0..s.n * s.c {
        let xp = &x[plane * s.h * s.w..(plane + 1) * s.h * s.w];
        for i in 0..oh {
            for j in 0..ow {
                let window = window(s, i, j);
                match kind {
                    PoolKind::Max => {
                        let mut best_at = (i * s.stride) * s.w + j * s.stride;
                        // PyTorch's rule: strictly greater, or NaN (the last NaN wins).
                        for at in window {
                            if xp[at] > xp[best_at] || xp[at].is_nan() {
                                best_at = at;
                            }
                        }
                        y.push(xp[best_at]);
                        argmax.push(best_at);
                    }
                    PoolKind::Avg => {
                        let sum: f64 = window.map(|at| xp[at]).sum();
                        y.push(sum / (s.kernel * s.kernel) as f64);
                    }
                }
            }
        }
    }
    (y, argmax)
}

/// Backward: `dx [N, C, H, W]` from `dy [N, C, OH, OW]` (and the forward's argmax for max pooling).
pub fn backward(dy: &[f64], argmax: &[usize], s: &Pool2dShape, kind: PoolKind) -> Vec<f64> {
    let (oh, ow) = s.out_hw();
    let mut dx = vec![0.0; s.in_len()];
    let area = (s.kernel * s.kernel) as f64;
    for plane in 0..s.n * s.c {
        for i in 0..oh {
            for j in 0..ow {
                let o = (plane * oh + i) * ow + j;
                let base = plane * s.h * s.w;
                match kind {
                    PoolKind::Max => dx[base + argmax[o]] += dy[o],
                    PoolKind::Avg => {
                        for a in 0..s.kernel {
                            for b in 0..s.kernel {
                                let at = (i * s.stride + a) * s.w + j * s.stride + b;
                                dx[base + at] += dy[o] / area;
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}
