//! Tensors: a GPU buffer with a shape, a memory layout and an element type.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// How a BatchNorm input is laid out in memory. The channel axis is what BatchNorm normalizes per.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Channel-major: shape `[N, C, ...spatial]` (also `(N,C,L)` and `(N,C,D,H,W)`).
    Nchw,
    /// Channel-last: shape `[N, ...spatial, C]`.
    Nhwc,
    /// Features: shape `[N, C]` (BatchNorm1d on a 2-D input).
    Nc,
}

impl Layout {
    /// Parses `NCHW`, `NHWC` or `NC` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "NCHW" | "NCL" | "NCDHW" => Ok(Layout::Nchw),
            "NHWC" | "NLC" | "NDHWC" => Ok(Layout::Nhwc),
            "NC" => Ok(Layout::Nc),
            other => Err(Error::config(format!(
                "unknown layout '{other}': expected NCHW, NHWC or NC"
            ))),
        }
    }

    /// The layout's name as `parse` accepts it.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Nchw => "NCHW",
            Layout::Nhwc => "NHWC",
            Layout::Nc => "NC",
        }
    }

    /// Splits `shape` into (N, C, spatial size) for this layout.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the rank does not fit the layout (NC needs rank 2; NCHW and NHWC need
    /// rank 2 to 5), or a dimension is zero.
    pub fn dims(self, shape: &[usize]) -> Result<BnDims> {
        let bad = |expected: &str| Error::ShapeMismatch {
            what: format!("input of layout {}", self.name()),
            expected: expected.to_string(),
            got: format!("{shape:?}"),
        };
        if shape.contains(&0) {
            return Err(bad("no zero-sized dimension"));
        }
        match self {
            Layout::Nc if shape.len() == 2 => Ok(BnDims {
                n: shape[0],
                c: shape[1],
                spatial: 1,
            }),
            Layout::Nc => Err(bad("[N, C]")),
            Layout::Nchw if (2..=5).contains(&shape.len()) => Ok(BnDims {
                n: shape[0],
                c: shape[1],
                spatial: shape[2..].iter().product(),
            }),
            Layout::Nchw => Err(bad("[N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W]")),
            Layout::Nhwc if (2..=5).contains(&shape.len()) => Ok(BnDims {
                n: shape[0],
                c: shape[shape.len() - 1],
                spatial: shape[1..shape.len() - 1].iter().product(),
            }),
            Layout::Nhwc => Err(bad("[N, C], [N, L, C], [N, H, W, C] or [N, D, H, W, C]")),
        }
    }
}

/// A BatchNorm input reduced to what the kernels need: N samples, C channels, `spatial` positions each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BnDims {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Product of the spatial dimensions (1 for `(N, C)`).
    pub spatial: usize,
}

impl BnDims {
    /// Values per channel, M = N * spatial.
    pub fn per_channel(&self) -> usize {
        self.n * self.spatial
    }

    /// Total values, N * C * spatial.
    pub fn numel(&self) -> usize {
        self.n * self.c * self.spatial
    }

    /// Flat index of (n, c, s) in `layout`.
    pub fn index(&self, layout: Layout, n: usize, c: usize, s: usize) -> usize {
        match layout {
            Layout::Nchw | Layout::Nc => (n * self.c + c) * self.spatial + s,
            Layout::Nhwc => (n * self.spatial + s) * self.c + c,
        }
    }
}

/// Element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DType {
    /// 32-bit float.
    #[default]
    F32,
    /// IEEE 754 half (binary16): storage only; the kernels compute and accumulate in f32.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }

    /// Parses `f32`/`float32` or `f16`/`float16`/`half` (case-insensitive).
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming the accepted values.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            other => Err(Error::config(format!(
                "unknown dtype '{other}': expected f32 or f16"
            ))),
        }
    }

    /// `f32` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        }
    }
}

/// f32 values rounded to f16 (to nearest, ties to even), padded with a zero to a whole number of 4-byte
/// words: the layout f16 tensors have on the device (uploads are whole words).
pub fn f16_padded(values: &[f32]) -> Vec<half::f16> {
    let mut out: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
    if out.len() % 2 == 1 {
        out.push(half::f16::ZERO);
    }
    out
}

/// Each value rounded to the nearest f16 and back: what an f16 tensor holds, as f32.
pub fn round_to_f16(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect()
}

/// A GPU tensor: a storage buffer, a shape and a layout. The crate's own tensors; the backend API works on
/// any caller buffers instead.
pub struct Tensor {
    /// The device the buffer lives on.
    pub gpu: Arc<Gpu>,
    /// The storage buffer (STORAGE | COPY_SRC | COPY_DST).
    pub buffer: wgpu::Buffer,
    /// The shape in the layout's own order.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Tensor {
    /// Uploads f32 values of the given shape.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `data.len()` is not the product of `shape`; device errors.
    pub fn from_f32(gpu: &Arc<Gpu>, shape: &[usize], data: &[f32]) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::ShapeMismatch {
                what: "tensor data".into(),
                expected: format!("{numel} values for shape {shape:?}"),
                got: format!("{} values", data.len()),
            });
        }
        Ok(Tensor {
            gpu: gpu.clone(),
            buffer: gpu.upload("tensor", data)?,
            shape: shape.to_vec(),
            dtype: DType::F32,
        })
    }

    /// An f32 tensor filled with `value` (NaN poisons outputs in tests).
    pub fn filled(gpu: &Arc<Gpu>, shape: &[usize], value: f32) -> Result<Self> {
        let numel: usize = shape.iter().product();
        Self::from_f32(gpu, shape, &vec![value; numel])
    }

    /// Uploads f32 values of the given shape as f16 (rounded to nearest), padded to a whole word.
    ///
    /// # Errors
    /// As [`Tensor::from_f32`].
    pub fn from_f32_as_f16(gpu: &Arc<Gpu>, shape: &[usize], data: &[f32]) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::ShapeMismatch {
                what: "tensor data".into(),
                expected: format!("{numel} values for shape {shape:?}"),
                got: format!("{} values", data.len()),
            });
        }
        Ok(Tensor {
            gpu: gpu.clone(),
            buffer: gpu.upload("tensor f16", &f16_padded(data))?,
            shape: shape.to_vec(),
            dtype: DType::F16,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Downloads the values as f32 (f16 tensors are widened exactly).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.gpu.download(&self.buffer, 0, self.numel()),
            DType::F16 => Ok(self
                .gpu
                .download::<half::f16>(&self.buffer, 0, self.numel())?
                .into_iter()
                .map(half::f16::to_f32)
                .collect()),
        }
    }
}
