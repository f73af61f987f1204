//! Linear layer op: `y = x W^T + b` (PyTorch's `nn.Linear`, `W` stored `[out, in]`) and its backward
//! `dx = dy W`, `dW = dy^T x`, `db = sum over rows of dy`.
//!
//! All three products are one strided matmul kernel (`shaders/linear.wgsl`): the transposes are strides,
//! baked into the pipeline as constants along with the sizes, so each layer shape gets its own pipelines.
//!
//! # Shapes
//! x `[n, in]`, W `[out, in]`, b `[out]`, y and dy `[n, out]`, dx `[n, in]`; all row-major f32.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, dispatch, entry, f32_bytes, grid, nonzero};

/// Rows and columns of C per invocation of `matmul_big`, and its workgroup size (see the shader).
const BM: usize = 16;
const BN: usize = 16;
const WG: usize = 8;
/// Rows and columns of C per workgroup (one subgroup of 8) of `matmul_sub`.
const SUB_ROWS: usize = 32;
const SUB_COLS: usize = 64;
const LINEAR_WGSL: &str = include_str!("../../shaders/linear.wgsl");
const LINEAR_SUBGROUP_WGSL: &str = include_str!("../../shaders/linear_subgroup.wgsl");

/// What a product does besides C: start from a bias (binding 3, read), write the row sums of A there, or
/// scale each value stored to C by s (1 - s) with s read from there (a sigmoid's backward).
enum Extra<'a> {
    None,
    Bias(&'a BufferRef<'a>, u64),
    RowSums(&'a BufferRef<'a>, u64),
    SigmoidGrad(&'a BufferRef<'a>, u64),
}

/// The store epilogues (`fn epilogue` in `shaders/linear.wgsl`): C as computed, or times s (1 - s).
const EPILOGUE_IDENTITY: &str = "fn epilogue(i: u32, v: f32) -> f32 { return v; }\n";
const EPILOGUE_SIGMOID_GRAD: &str =
    "fn epilogue(i: u32, v: f32) -> f32 { let s = bias[i]; return v * s * (1.0 - s); }\n";

/// `C[m, n] = sum_k A[m*sam + k*sak] * B[k*sbk + n*sbn]`, C row-major `[m, n]`.
#[derive(Clone, Copy, Debug)]
struct Matmul {
    m: usize,
    n: usize,
    k: usize,
    sam: usize,
    sak: usize,
    sbk: usize,
    sbn: usize,
}

impl Matmul {
    fn prelude(&self) -> String {
        format!(
            "const M: u32 = {}u;\nconst N: u32 = {}u;\nconst K: u32 = {}u;\nconst SAM: u32 = {}u;\n\
             const SAK: u32 = {}u;\nconst SBK: u32 = {}u;\nconst SBN: u32 = {}u;\n",
            self.m, self.n, self.k, self.sam, self.sak, self.sbk, self.sbn
        )
    }
}

/// Which matmul kernel the op's products run (see `shaders/linear.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulKernel {
    /// `Subgroup` where the adapter allows it, else `Blocked`.
    #[default]
    Auto,
    /// A 16×16 block of C per invocation; runs on every adapter.
    Blocked,
    /// A 32×64 block of C per subgroup of 8 sharing A by `subgroupBroadcast`; needs the `SUBGROUP`
    /// feature and subgroups of at least 8 lanes. About half the CPU time of `Blocked` on lavapipe.
    Subgroup,
}

impl MatmulKernel {
    /// Whether `gpu` can run the subgroup kernel.
    pub fn subgroup_available(gpu: &Gpu) -> bool {
        let caps = gpu.caps();
        caps.subgroups && caps.subgroup_min_size >= 8
    }

    /// `Auto` resolved for `gpu`; an error when `Subgroup` is asked of an adapter that cannot run it.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] for `Subgroup` without subgroups of at least 8 lanes.
    pub fn resolve(self, gpu: &Gpu) -> Result<Self> {
        match self {
            MatmulKernel::Auto if Self::subgroup_available(gpu) => Ok(MatmulKernel::Subgroup),
            MatmulKernel::Auto => Ok(MatmulKernel::Blocked),
            MatmulKernel::Subgroup if !Self::subgroup_available(gpu) => Err(Error::config(
                format!(
                    "the subgroup matmul needs the SUBGROUP feature and subgroups of at least 8 lanes; \
                     this adapter has subgroups: {}, smallest subgroup: {} lanes",
                    gpu.caps().subgroups,
                    gpu.caps().subgroup_min_size
                ),
            )),
            k => Ok(k),
        }
    }
}

/// The linear op for one batch size and layer shape.
#[derive(Clone, Debug)]
pub struct LinearOp {
    gpu: Arc<Gpu>,
    /// Rows (batch size).
    pub n: usize,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    kernel: MatmulKernel,
}

impl LinearOp {
    /// An op for `x [n, in_features] -> y [n, out_features]`.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] when a size is 0.
    pub fn new(gpu: &Arc<Gpu>, n: usize, in_features: usize, out_features: usize) -> Result<Self> {
        nonzero("batch size", n)?;
        nonzero("in_features", in_features)?;
        nonzero("out_features", out_features)?;
        Ok(LinearOp {
            gpu: gpu.clone(),
            n,
            in_features,
            out_features,
            kernel: MatmulKernel::Auto.resolve(gpu)?,
        })
    }

    /// The same op running `kernel` (tests and benchmarks compare them).
    ///
    /// # Errors
    /// As [`MatmulKernel::resolve`].
    pub fn with_kernel(mut self, kernel: MatmulKernel) -> Result<Self> {
        self.kernel = kernel.resolve(&self.gpu)?;
        Ok(self)
    }

    /// The kernel the products run (never `Auto`).
    pub fn kernel(&self) -> MatmulKernel {
        self.kernel
    }

    fn pipeline(
        &self,
        entry_point: &str,
        mm: Matmul,
        sigmoid_grad: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = format!("linear.{entry_point}.{mm:?}.{sigmoid_grad}");
        // The subgroup kernel is a separate source: a device without subgroups rejects any module
        // that mentions them.
        let subgroup = entry_point.starts_with("matmul_sub");
        self.gpu.pipeline(&key, entry_point, || {
            let epilogue = if sigmoid_grad {
                EPILOGUE_SIGMOID_GRAD
            } else {
                EPILOGUE_IDENTITY
            };
            let mut source = format!("{}{epilogue}\n{LINEAR_WGSL}", mm.prelude());
            if subgroup {
                source.push_str(LINEAR_SUBGROUP_WGSL);
            }
            source
        })
    }

    fn record_matmul(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        mm: Matmul,
        a: (&BufferRef, u64),
        b: (&BufferRef, u64),
        c: (&BufferRef, u64),
        extra: Extra,
    ) -> Result<()> {
        let subgroup = self.kernel == MatmulKernel::Subgroup;
        let entry_point = match (subgroup, &extra) {
            (true, Extra::Bias(..)) => "matmul_sub_bias",
            (true, Extra::RowSums(..)) => "matmul_sub_rowsum",
            (true, Extra::None | Extra::SigmoidGrad(..)) => "matmul_sub",
            (false, Extra::Bias(..)) => "matmul_big_bias",
            (false, Extra::RowSums(..)) => "matmul_big_rowsum",
            (false, Extra::None | Extra::SigmoidGrad(..)) => "matmul_big",
        };
        let sigmoid_grad = matches!(extra, Extra::SigmoidGrad(..));
        let pipeline = self.pipeline(entry_point, mm, sigmoid_grad)?;
        let mut entries = vec![entry(0, a.0, a.1), entry(1, b.0, b.1), entry(2, c.0, c.1)];
        if let Extra::Bias(r, bytes) | Extra::RowSums(r, bytes) | Extra::SigmoidGrad(r, bytes) =
            extra
        {
            entries.push(entry(3, r, bytes));
        }
        let workgroups = if subgroup {
            mm.m.div_ceil(SUB_ROWS) * mm.n.div_ceil(SUB_COLS)
        } else {
            (mm.m.div_ceil(BM) * mm.n.div_ceil(BN)).div_ceil(WG)
        };
        let (gx, gy) = grid(&self.gpu, workgroups as u32);
        let groups = (gx, gy, 1);
        dispatch(
            &self.gpu,
            encoder,
            "linear.matmul",
            &pipeline,
            &entries,
            groups,
        );
        Ok(())
    }

    /// Records `y = x W^T + b` (`b` optional).
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] / [`crate::Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: BufferRef,
        weight: BufferRef,
        bias: Option<BufferRef>,
        y: BufferRef,
    ) -> Result<()> {
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        let (xb, wb, bb, yb) = (
            f32_bytes(n * i),
            f32_bytes(o * i),
            f32_bytes(o),
            f32_bytes(n * o),
        );
        check(&self.gpu, "linear x", &x, xb)?;
        check(&self.gpu, "linear weight", &weight, wb)?;
        check(&self.gpu, "linear y", &y, yb)?;
        if let Some(b) = &bias {
            check(&self.gpu, "linear bias", b, bb)?;
        }
        let mm = Matmul {
            m: n,
            n: o,
            k: i,
            sam: i,
            sak: 1,
            sbk: 1,
            sbn: i,
        };
        self.record_matmul(
            encoder,
            mm,
            (&x, xb),
            (&weight, wb),
            (&y, yb),
            match &bias {
                Some(b) => Extra::Bias(b, bb),
                None => Extra::None,
            },
        )
    }

    /// Records the backward: `dweight = dy^T x` and `dbias = sum_rows dy` (overwritten, not accumulated)
    /// and, when `dx` is given, `dx = dy W` (the first layer of a network needs no dx).
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] / [`crate::Error::BadConfig`] for too small or misaligned buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn record_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: BufferRef,
        weight: BufferRef,
        dy: BufferRef,
        dx: Option<BufferRef>,
        dweight: BufferRef,
        dbias: Option<BufferRef>,
    ) -> Result<()> {
        self.backward(encoder, x, weight, dy, dx, dweight, dbias, false)
    }

    /// The backward of `Linear ∘ Sigmoid` when `x` is a sigmoid's output s: as [`Self::record_backward`]
    /// except that `dz` receives the gradient of the sigmoid's *input*, `(dy W) ⊙ s ⊙ (1 − s)`, computed
    /// as the dx product stores it (the sigmoid's backward then needs no dispatch of its own).
    ///
    /// # Errors
    /// As [`Self::record_backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_backward_through_sigmoid(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: BufferRef,
        weight: BufferRef,
        dy: BufferRef,
        dz: BufferRef,
        dweight: BufferRef,
        dbias: Option<BufferRef>,
    ) -> Result<()> {
        self.backward(encoder, x, weight, dy, Some(dz), dweight, dbias, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: BufferRef,
        weight: BufferRef,
        dy: BufferRef,
        dx: Option<BufferRef>,
        dweight: BufferRef,
        dbias: Option<BufferRef>,
        through_sigmoid: bool,
    ) -> Result<()> {
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        let (xb, wb, bb, yb) = (
            f32_bytes(n * i),
            f32_bytes(o * i),
            f32_bytes(o),
            f32_bytes(n * o),
        );
        check(&self.gpu, "linear x", &x, xb)?;
        check(&self.gpu, "linear weight", &weight, wb)?;
        check(&self.gpu, "linear dy", &dy, yb)?;
        check(&self.gpu, "linear dweight", &dweight, wb)?;
        if let Some(dx) = &dx {
            check(&self.gpu, "linear dx", dx, xb)?;
            let mm = Matmul {
                m: n,
                n: i,
                k: o,
                sam: o,
                sak: 1,
                sbk: i,
                sbn: 1,
            };
            let extra = if through_sigmoid {
                Extra::SigmoidGrad(&x, xb)
            } else {
                Extra::None
            };
            self.record_matmul(encoder, mm, (&dy, yb), (&weight, wb), (dx, xb), extra)?;
        }
        let mm = Matmul {
            m: o,
            n: i,
            k: n,
            sam: 1,
            sak: o,
            sbk: i,
            sbn: 1,
        };
        // db = the row sums of A = dy^T, summed by the dW kernel as it walks them.
        let extra = match &dbias {
            Some(db) => {
                check(&self.gpu, "linear dbias", db, bb)?;
                Extra::RowSums(db, bb)
            }
            None => Extra::None,
        };
        self.record_matmul(encoder, mm, (&dy, yb), (&x, xb), (&dweight, wb), extra)?;
        Ok(())
    }
}
