//! 2-D convolution op: PyTorch's `nn.Conv2d` (dilation 1, groups 1, zero padding) forward
//! `y = conv(x, w) + b` and backward `dx`, `dweight`, `dbias`, on NCHW tensors.
//!
//! Every product is an implicit GEMM in `shaders/conv2d.wgsl`, with a 16×16 output block per
//! invocation in registers (the shape of `shaders/linear.wgsl`'s matmul) and the im2col/col2im indexing
//! done at the loads, so no unfolded copy of x is ever written:
//!
//! | product | GEMM rows | columns | reduction | dispatches |
//! | --- | --- | --- | --- | --- |
//! | forward (bias fused) | N·Ho·Wo output pixels | Cout | Cin·KH·KW | 1 |
//! | dx (col2im gather) | N·H·W input pixels | Cin | Cout·KH·KW | 1 |
//! | dweight, dbias | Cout | Cin·KH·KW (+1: a column of ones gives dbias) | N·Ho·Wo, split-K | 2 |
//!
//! dweight is a small matrix summed over a long reduction, so it is split into ranges of output rows
//! whose partial sums land in the op's own scratch buffer; a second dispatch adds them up and overwrites
//! dweight and dbias. The shape is baked into each pipeline as constants.
//!
//! # Shapes
//! x `[n, cin, h, w]`, weight `[cout, cin, kh, kw]`, bias `[cout]`, y and dy `[n, cout, ho, wo]` with
//! `ho = (h + 2·padding − kh) / stride + 1` (floor), likewise `wo`; all f32, contiguous.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{storage_usage, Gpu};
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, check_loop_iterations, dispatch, entry, f32_bytes, grid, nonzero};
use crate::record::Record;

const CONV2D_WGSL: &str = include_str!("../../shaders/conv2d.wgsl");

/// Rows and columns of a GEMM's output block per invocation (see the shader).
const BLOCK: usize = 16;
/// Invocations per workgroup of the GEMMs: 8 on a CPU device, so that the few blocks of a small product
/// still spread over its threads; 64 on a GPU, so a workgroup fills a wave.
const WG_CPU: usize = 8;
const WG_GPU: usize = 64;
/// The dweight GEMM is split until it has about this many blocks in flight.
const DW_TARGET_BLOCKS: usize = 1024;
/// Invocations per workgroup of the split reduction.
const REDUCE_WG: usize = 64;
/// The loop budget of an invocation on a CPU device: the dweight GEMM walks `rows_per_split · (wo + 1)`
/// iterations, the forward `cin · (kh · (kw + 1) + 1)`, dx `cout · (kh · (kw + 1) + 1)` (every loop level
/// counts, as lavapipe counts them), the reduction `splits`.
pub use crate::ops::kernel::LOOP_ITERATIONS_MAX;

/// The shape of one convolution: input `[n, cin, h, w]`, weight `[cout, cin, kh, kw]`, `stride` and zero
/// `padding` the same along both axes, and whether there is a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dShape {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes), at least 1.
    pub stride: usize,
    /// Zero padding on each side (both axes).
    pub padding: usize,
    /// Whether the convolution adds a bias `[cout]`.
    pub bias: bool,
}

impl Conv2dShape {
    /// Output height and width, as PyTorch: `floor((h + 2·padding − kh) / stride) + 1`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a zero size or stride; [`Error::ShapeMismatch`] when the kernel is larger
    /// than the padded input (the output would be empty).
    pub fn out_hw(&self) -> Result<(usize, usize)> {
        for (what, v) in [
            ("conv2d batch size", self.n),
            ("conv2d in_channels", self.cin),
            ("conv2d input height", self.h),
            ("conv2d input width", self.w),
            ("conv2d out_channels", self.cout),
            ("conv2d kernel height", self.kh),
            ("conv2d kernel width", self.kw),
            ("conv2d stride", self.stride),
        ] {
            nonzero(what, v)?;
        }
        if self.padding > u32::MAX as usize / 8 {
            return Err(Error::config(format!(
                "conv2d padding = {} is too large",
                self.padding
            )));
        }
        let out = |axis: &str, size: usize, k: usize| {
            let padded = size + 2 * self.padding;
            if padded < k {
                return Err(Error::ShapeMismatch {
                    what: format!("conv2d input {axis}"),
                    expected: format!(
                        "{axis} + 2·padding >= kernel {axis} {k} (else the output is empty)"
                    ),
                    got: format!("{axis} {size} with padding {}", self.padding),
                });
            }
            Ok((padded - k) / self.stride + 1)
        };
        Ok((
            out("height", self.h, self.kh)?,
            out("width", self.w, self.kw)?,
        ))
    }

    /// Values in x.
    pub fn x_len(&self) -> usize {
        self.n * self.cin * self.h * self.w
    }

    /// Values in the weight.
    pub fn weight_len(&self) -> usize {
        self.cout * self.cin * self.kh * self.kw
    }

    /// Values in y (and dy); 0 when the shape is invalid.
    pub fn y_len(&self) -> usize {
        self.out_hw()
            .map_or(0, |(ho, wo)| self.n * self.cout * ho * wo)
    }

    /// Multiply-adds of the forward (each of dx and dweight costs the same count).
    pub fn macs(&self) -> usize {
        self.y_len() * self.cin * self.kh * self.kw
    }
}

/// The convolution op for one shape: its pipelines' constants and the scratch of the dweight split.
#[derive(Debug)]
pub struct Conv2dOp {
    gpu: Arc<Gpu>,
    /// The shape it runs.
    pub shape: Conv2dShape,
    ho: usize,
    wo: usize,
    wg: usize,
    /// Ranges of output rows the dweight reduction is cut into, and rows per range.
    splits: usize,
    rows_per_split: usize,
    /// Columns of the dweight GEMM: `cin·kh·kw`, plus one for dbias.
    dw_cols: usize,
    partial: wgpu::Buffer,
}

impl Conv2dOp {
    /// An op for `shape`, with its scratch buffer (`splits × cout × (cin·kh·kw + 1)` f32).
    ///
    /// # Errors
    /// As [`Conv2dShape::out_hw`]; [`Error::LimitExceeded`] when a tensor has more values than the
    /// kernels' 32-bit indexing allows, when the dweight partial sums exceed one storage binding, and on
    /// a CPU device when a loop cannot stay under [`LOOP_ITERATIONS_MAX`]; device errors for the scratch.
    pub fn new(gpu: &Arc<Gpu>, shape: Conv2dShape) -> Result<Self> {
        let (ho, wo) = shape.out_hw()?;
        let s = shape;
        // Indices are i32 in the shader (padding makes them negative before masking).
        for (what, len) in [
            ("conv2d x", s.x_len()),
            ("conv2d y", s.n * s.cout * ho * wo),
            ("conv2d weight", s.weight_len()),
        ] {
            if len > i32::MAX as usize {
                return Err(Error::LimitExceeded {
                    what: format!("{what} values (32-bit indexing)"),
                    needed: len as u64,
                    limit: i32::MAX as u64,
                });
            }
        }
        let wg = if gpu.caps().cpu_device {
            WG_CPU
        } else {
            WG_GPU
        };
        let dw_cols = s.cin * s.kh * s.kw + usize::from(s.bias);
        let dw_blocks = s.cout.div_ceil(BLOCK) * dw_cols.div_ceil(BLOCK);
        let out_rows = s.n * ho;
        let wanted = DW_TARGET_BLOCKS.div_ceil(dw_blocks).clamp(1, out_rows);
        let mut rows_per_split = out_rows.div_ceil(wanted);
        if gpu.caps().cpu_device {
            // Lavapipe's loop limit: each split walks rows_per_split rows of wo + 1 iterations. Large
            // layers (few splits) over large outputs had walked past it and left dweight short.
            rows_per_split = rows_per_split.min((LOOP_ITERATIONS_MAX / (wo + 1)).max(1));
            let splits = out_rows.div_ceil(rows_per_split);
            for (what, iterations) in [
                (
                    "forward (cin · (kh · (kw + 1) + 1))",
                    s.cin * (s.kh * (s.kw + 1) + 1),
                ),
                (
                    "dx (cout · (kh · (kw + 1) + 1))",
                    s.cout * (s.kh * (s.kw + 1) + 1),
                ),
                (
                    "dweight (rows_per_split · (wo + 1))",
                    rows_per_split * (wo + 1),
                ),
                ("dweight reduction (splits)", splits),
            ] {
                check_loop_iterations(gpu, &format!("conv2d's {what} for {shape:?}"), iterations)?;
            }
        }
        let splits = out_rows.div_ceil(rows_per_split);
        let partial_bytes = f32_bytes(splits * s.cout * dw_cols);
        let binding_limit = gpu.limits().max_storage_buffer_binding_size;
        if partial_bytes > binding_limit {
            return Err(Error::LimitExceeded {
                what: format!(
                    "bytes of conv2d's dweight partial sums ({splits} splits × cout × (cin·kh·kw + \
                     bias)) for {shape:?} in one storage binding"
                ),
                needed: partial_bytes,
                limit: binding_limit,
            });
        }
        let partial =
            gpu.create_buffer("conv2d dweight partials", partial_bytes, storage_usage())?;
        Ok(Conv2dOp {
            gpu: gpu.clone(),
            shape,
            ho,
            wo,
            wg,
            splits,
            rows_per_split,
            dw_cols,
            partial,
        })
    }

    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.ho, self.wo)
    }

    /// How many ranges of output rows the dweight reduction is split into.
    pub fn dweight_splits(&self) -> usize {
        self.splits
    }

    fn prelude(&self) -> String {
        let s = &self.shape;
        format!(
            "const N: u32 = {}u;\nconst CIN: u32 = {}u;\nconst H: u32 = {}u;\nconst W: u32 = {}u;\n\
             const COUT: u32 = {}u;\nconst KH: u32 = {}u;\nconst KW: u32 = {}u;\nconst STRIDE: u32 = {}u;\n\
             const PAD: u32 = {}u;\nconst HO: u32 = {}u;\nconst WO: u32 = {}u;\nconst KC: u32 = {}u;\n\
             const SPLITS: u32 = {}u;\nconst RPS: u32 = {}u;\nconst WG: u32 = {}u;\n",
            s.n,
            s.cin,
            s.h,
            s.w,
            s.cout,
            s.kh,
            s.kw,
            s.stride,
            s.padding,
            self.ho,
            self.wo,
            self.dw_cols,
            self.splits,
            self.rows_per_split,
            self.wg
        )
    }

    fn pipeline(&self, entry_point: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = format!(
            "conv2d.{entry_point}.{:?}.{}.{}",
            self.shape, self.splits, self.wg
        );
        self.gpu.pipeline(&key, entry_point, || {
            format!("{}\n{CONV2D_WGSL}", self.prelude())
        })
    }

    /// Records `entry_point` over `invocations` invocations in workgroups of `wg`.
    fn run(
        &self,
        encoder: &mut impl Record,
        entry_point: &str,
        entries: &[wgpu::BindGroupEntry],
        invocations: usize,
        wg: usize,
    ) -> Result<()> {
        let pipeline = self.pipeline(entry_point)?;
        let (gx, gy) = grid(&self.gpu, invocations.div_ceil(wg) as u32);
        dispatch(
            &self.gpu,
            encoder,
            &format!("conv2d.{entry_point}"),
            &pipeline,
            entries,
            (gx, gy, 1),
        );
        Ok(())
    }

    fn bytes(&self) -> (u64, u64, u64, u64) {
        let s = &self.shape;
        (
            f32_bytes(s.x_len()),
            f32_bytes(s.weight_len()),
            f32_bytes(s.cout),
            f32_bytes(s.n * s.cout * self.ho * self.wo),
        )
    }

    fn check_bias(&self, what: &str, given: bool) -> Result<()> {
        if given != self.shape.bias {
            return Err(Error::config(format!(
                "conv2d {what}: the op was built {} a bias but {} given",
                if self.shape.bias { "with" } else { "without" },
                if given { "one was" } else { "none was" }
            )));
        }
        Ok(())
    }

    /// Records `y = conv(x, weight) + bias`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] / [`Error::BadConfig`] for too small or misaligned buffers, a bias given
    /// to an op built without one (or the reverse), or `y` overlapping `x`.
    pub fn record_forward(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        weight: BufferRef,
        bias: Option<BufferRef>,
        y: BufferRef,
    ) -> Result<()> {
        let (xb, wb, bb, yb) = self.bytes();
        check(&self.gpu, "conv2d x", &x, xb)?;
        check(&self.gpu, "conv2d weight", &weight, wb)?;
        check(&self.gpu, "conv2d y", &y, yb)?;
        self.check_bias("bias", bias.is_some())?;
        disjoint("conv2d y", &y, yb, "x", &x, xb)?;
        disjoint("conv2d y", &y, yb, "weight", &weight, wb)?;
        let mut entries = vec![entry(0, &x, xb), entry(1, &weight, wb), entry(2, &y, yb)];
        if let Some(b) = &bias {
            check(&self.gpu, "conv2d bias", b, bb)?;
            disjoint("conv2d y", &y, yb, "bias", b, bb)?;
            entries.push(entry(3, b, bb));
        }
        let s = &self.shape;
        let blocks = (s.n * self.ho * self.wo).div_ceil(BLOCK) * s.cout.div_ceil(BLOCK);
        let entry_point = if bias.is_some() {
            "forward_bias"
        } else {
            "forward"
        };
        self.run(encoder, entry_point, &entries, blocks, self.wg)
    }

    /// Records the backward: `dweight` and `dbias` (overwritten, not accumulated) and, when `dx` is given,
    /// `dx` (the first layer of a network needs none). `dbias` must be given exactly when the op has a bias.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] / [`Error::BadConfig`] for too small or misaligned buffers, a `dbias` that
    /// does not match the op's bias, or an output overlapping an input.
    #[allow(clippy::too_many_arguments)]
    pub fn record_backward(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        weight: BufferRef,
        dy: BufferRef,
        dx: Option<BufferRef>,
        dweight: BufferRef,
        dbias: Option<BufferRef>,
    ) -> Result<()> {
        let (xb, wb, bb, yb) = self.bytes();
        check(&self.gpu, "conv2d x", &x, xb)?;
        check(&self.gpu, "conv2d weight", &weight, wb)?;
        check(&self.gpu, "conv2d dy", &dy, yb)?;
        check(&self.gpu, "conv2d dweight", &dweight, wb)?;
        self.check_bias("dbias", dbias.is_some())?;
        for (name, r, bytes) in [("x", &x, xb), ("weight", &weight, wb), ("dy", &dy, yb)] {
            disjoint("conv2d dweight", &dweight, wb, name, r, bytes)?;
            if let Some(db) = &dbias {
                disjoint("conv2d dbias", db, bb, name, r, bytes)?;
            }
            if let Some(dx) = &dx {
                disjoint("conv2d dx", dx, xb, name, r, bytes)?;
            }
        }
        let s = &self.shape;
        if let Some(dx) = &dx {
            check(&self.gpu, "conv2d dx", dx, xb)?;
            disjoint("conv2d dx", dx, xb, "dweight", &dweight, wb)?;
            let blocks = (s.n * s.h * s.w).div_ceil(BLOCK) * s.cin.div_ceil(BLOCK);
            self.run(
                encoder,
                "backward_data",
                &[entry(0, &dy, yb), entry(1, &weight, wb), entry(2, dx, xb)],
                blocks,
                self.wg,
            )?;
        }
        let partial = BufferRef {
            buffer: &self.partial,
            offset: 0,
        };
        let pb = self.partial.size();
        let blocks = s.cout.div_ceil(BLOCK) * self.dw_cols.div_ceil(BLOCK) * self.splits;
        self.run(
            encoder,
            "backward_weight",
            &[entry(0, &dy, yb), entry(1, &x, xb), entry(2, &partial, pb)],
            blocks,
            self.wg,
        )?;
        let mut entries = vec![entry(0, &partial, pb), entry(2, &dweight, wb)];
        let entry_point = if let Some(db) = &dbias {
            check(&self.gpu, "conv2d dbias", db, bb)?;
            disjoint("conv2d dbias", db, bb, "dweight", &dweight, wb)?;
            entries.push(entry(3, db, bb));
            "reduce_weight_bias"
        } else {
            "reduce_weight"
        };
        self.run(
            encoder,
            entry_point,
            &entries,
            s.cout * self.dw_cols,
            REDUCE_WG,
        )
    }
}

/// Refuses an output region that overlaps an input region of the same buffer (the kernels read inputs
/// while other invocations write the output).
fn disjoint(
    what: &str,
    out: &BufferRef,
    out_bytes: u64,
    input: &str,
    r: &BufferRef,
    bytes: u64,
) -> Result<()> {
    if out.buffer == r.buffer && out.offset < r.offset + bytes && r.offset < out.offset + out_bytes
    {
        return Err(Error::config(format!(
            "{what} (bytes {}..{}) overlaps {input} (bytes {}..{}) in the same buffer",
            out.offset,
            out.offset + out_bytes,
            r.offset,
            r.offset + bytes
        )));
    }
    Ok(())
}
