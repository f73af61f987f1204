//! 2-D convolution in f64 (PyTorch's `nn.Conv2d`, dilation 1, groups 1, zero padding), NCHW:
//! `y[n,co,oh,ow] = b[co] + Σ_{ci,kh,kw} x[n,ci,oh·s−p+kh,ow·s−p+kw] · w[co,ci,kh,kw]`, taps outside the
//! input reading 0. Backward: `dx` scatters `dy · w` back along the same taps, `dw[co,ci,kh,kw] =
//! Σ_{n,oh,ow} dy[n,co,oh,ow] · x[n,ci,oh·s−p+kh,ow·s−p+kw]`, `db[co] = Σ_{n,oh,ow} dy[n,co,oh,ow]`.
//!
//! Written as direct loops over the definition (not as a GEMM), so it shares no indexing with the kernels.

use crate::error::Result;
use crate::ops::conv2d::Conv2dShape;

/// Calls `f(x index, y index, weight index)` for every tap that reads inside the input.
fn for_each_tap(s: &Conv2dShape, mut f: impl FnMut(usize, usize, usize)) -> Result<()> {
    let (ho, wo) = s.out_hw()?;
    for n in 0..s.n {
        for co in 0..s.cout {
            for oh in 0..ho {
                for ow in 0..wo {
                    let yi = ((n * s.cout + co) * ho + oh) * wo + ow;
                    for ci in 0..s.cin {
                        for kh in 0..s.kh {
                            let ih = (oh * s.stride + kh) as isize - s.padding as isize;
                            if ih < 0 || ih >= s.h as isize {
                                continue;
                            }
                            for kw in 0..s.kw {
                                let iw = (ow * s.stride + kw) as isize - s.padding as isize;
                                if iw < 0 || iw >= s.w as isize {
                                    continue;
                                }
                                let xi = ((n * s.cin + ci) * s.h + ih as usize) * s.w + iw as usize;
                                let wi = ((co * s.cin + ci) * s.kh + kh) * s.kw + kw;
                                f(xi, yi, wi);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// `y [n, cout, ho, wo]` from `x [n, cin, h, w]`, `weight [cout, cin, kh, kw]` and `bias [cout]`
/// (`shape.bias` is ignored: the bias is used when given).
///
/// # Errors
/// As [`Conv2dShape::out_hw`].
pub fn forward(
    x: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    shape: &Conv2dShape,
) -> Result<Vec<f64>> {
    let (ho, wo) = shape.out_hw()?;
    let plane = ho * wo;
    let mut y: Vec<f64> = (0..shape.n * shape.cout * plane)
        .map(|i| bias.map_or(0.0, |b| b[(i / plane) % shape.cout]))
        .collect();
    for_each_tap(shape, |xi, yi, wi| y[yi] += x[xi] * weight[wi])?;
    Ok(y)
}

/// Gradients of [`forward`].
#[derive(Clone, Debug)]
pub struct Conv2dGrads {
    /// `dx [n, cin, h, w]`.
    pub dx: Vec<f64>,
    /// `dweight [cout, cin, kh, kw]`.
    pub dweight: Vec<f64>,
    /// `dbias [cout]`.
    pub dbias: Vec<f64>,
}

/// Backward of [`forward`] for `dy [n, cout, ho, wo]`.
///
/// # Errors
/// As [`Conv2dShape::out_hw`].
pub fn backward(x: &[f64], weight: &[f64], dy: &[f64], shape: &Conv2dShape) -> Result<Conv2dGrads> {
    let (ho, wo) = shape.out_hw()?;
    let mut dx = vec![0.0; shape.x_len()];
    let mut dweight = vec![0.0; shape.weight_len()];
    for_each_tap(shape, |xi, yi, wi| {
        dx[xi] += dy[yi] * weight[wi];
        dweight[wi] += dy[yi] * x[xi];
    })?;
    let plane = ho * wo;
    let mut dbias = vec![0.0; shape.cout];
    for (i, g) in dy.iter().enumerate() {
        dbias[(i / plane) % shape.cout] += g;
    }
    Ok(Conv2dGrads { dx, dweight, dbias })
}
