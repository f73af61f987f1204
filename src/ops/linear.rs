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
use crate::ops::kernel::{
    check, dispatch, entry, f32_bytes, grid, nonzero, operand_entry, texture_entry, Texels,
    FLOAT_BITS_WGSL,
};
use crate::ops::sgd::{sgd_module, SgdFusion, SgdTexels};
use crate::record::Record;

/// Rows and columns of C per invocation of `matmul_big`, and its workgroup size (see the shader).
const BM: usize = 16;
const BN: usize = 16;
const WG: usize = 8;
/// Rows and columns of C per workgroup (one subgroup of 8) of `matmul_sub`.
const SUB_ROWS: usize = 32;
const SUB_COLS: usize = 64;
const LINEAR_WGSL: &str = include_str!("../../shaders/linear.wgsl");
const LINEAR_SUBGROUP_WGSL: &str = include_str!("../../shaders/linear_subgroup.wgsl");
const LINEAR_PAIR_WGSL: &str = include_str!("../../shaders/linear_pair.wgsl");
const LINEAR_DOT_WGSL: &str = include_str!("../../shaders/linear_dot.wgsl");
const LINEAR_DOT16_WGSL: &str = include_str!("../../shaders/linear_dot16.wgsl");
const LINEAR_OUTER_SGD_WGSL: &str = include_str!("../../shaders/linear_outer_sgd.wgsl");
const LINEAR_DOT32_WGSL: &str = include_str!("../../shaders/linear_dot32.wgsl");
const LINEAR_OUTER_WGSL: &str = include_str!("../../shaders/linear_outer.wgsl");
const LINEAR_OUTER_M32_WGSL: &str = include_str!("../../shaders/linear_outer_m32.wgsl");
const LINEAR_DOT_BN_WGSL: &str = include_str!("../../shaders/linear_dot_bn.wgsl");
const LINEAR_ROWS_BN_WGSL: &str = include_str!("../../shaders/linear_rows_bn.wgsl");
const LINEAR_DOT_XENT_WGSL: &str = include_str!("../../shaders/linear_dot_xent.wgsl");
const LINEAR_HEAD_STEP_WGSL: &str = include_str!("../../shaders/linear_head_step.wgsl");
/// Storage buffers the pair with `rows_bn` binds: dy, W, dx, s; dy, x, dW, db; z, the saved
/// statistics, gamma and its two gradients.
const BN_BACKWARD_BUFFERS: u32 = 13;
/// Bindings of the head step's loss (`shaders/linear_head_step.wgsl`) start here, past its pair's.
const HEAD_XENT_BINDING_OFFSET: u32 = BN_BACKWARD_BUFFERS;
/// Storage buffers the head step binds at most: its pair's and its loss's 7.
const HEAD_STEP_BUFFERS: u32 = BN_BACKWARD_BUFFERS + 7;
/// Storage buffers `matmul_dot_bn` binds: x, W, z, b, y, gamma, beta, the running mean and variance,
/// the saved statistics, its parameters and the op's `dims`.
const BN_EPILOGUE_BUFFERS: u32 = 12;
/// Rows and columns of C per workgroup (one subgroup of 8) of `matmul_outer`.
const OUTER_ROWS: usize = 16;
/// Rows of C per workgroup of `matmul_outer` reading A along M (`shaders/linear_outer_m32.wgsl`).
const OUTER_ROWS_ALONG_M: usize = 32;
const OUTER_COLS: usize = 64;
/// Rows of C per workgroup (one subgroup of 8) of `matmul_dot`, and its columns: 16
/// (`shaders/linear_dot16.wgsl`), or 32 on CPU devices for more than 32 (`linear_dot32.wgsl`, see
/// [`dot_cols`]).
const DOT_ROWS: usize = 64;
const DOT_COLS: usize = 16;
const DOT_COLS_WIDE: usize = 32;
/// Columns of dx per workgroup of `rows_bn` (`shaders/linear_rows_bn.wgsl`, 64 rows × 16 columns).
const ROWS_BN_COLS: usize = 16;

/// The columns per `matmul_dot` block for `n` outputs: 32 on a CPU device when there are more than 32
/// (each load of x then feeds twice the arithmetic, and a layer of 100 makes 4 blocks, 2 per core on
/// two cores, instead of 7), else 16 (a GPU wants more, smaller blocks in flight).
fn dot_cols(gpu: &Gpu, n: usize) -> usize {
    if gpu.caps().cpu_device && n > DOT_COLS_WIDE {
        DOT_COLS_WIDE
    } else {
        DOT_COLS
    }
}

/// `matmul_dot`'s block (`product_dot` and `DOT_COLS`) of `cols` columns.
fn dot_block_wgsl(cols: usize) -> &'static str {
    if cols == DOT_COLS_WIDE {
        LINEAR_DOT32_WGSL
    } else {
        LINEAR_DOT16_WGSL
    }
}
/// The longest sum (in_features for y, out_features for dx, batch rows for dW and db) a product takes on
/// a CPU device: the kernels' loops step one term at a time at worst, and lavapipe stops an
/// invocation's loops after 65 535 iterations.
pub const LOOP_K_MAX: usize = 65_000;

/// What a product does besides C: start from a bias (binding 3, read), write the row sums of A there, or
/// scale each value stored to C by s (1 - s) with s read from there (a sigmoid's backward).
enum Extra<'a> {
    None,
    Bias(&'a BufferRef<'a>, u64),
    RowSums(&'a BufferRef<'a>, u64),
    SigmoidGrad(&'a BufferRef<'a>, u64),
}

/// Where the sigmoid's s is bound, when a product stores through its derivative.
fn s_offset(extra: &Extra) -> Option<u64> {
    match extra {
        Extra::SigmoidGrad(s, _) => Some(s.offset),
        _ => None,
    }
}

/// The BatchNorm that [`LinearOp::record_forward_bn`] applies to the Linear's output z, as PyTorch's
/// `BatchNorm1d` does in training (batch statistics) or eval (running statistics). Every buffer 16-byte
/// aligned.
#[derive(Debug)]
pub struct BnEpilogue<'a> {
    /// Receives act(bn(z)), `[n, out_features]`.
    pub y: BufferRef<'a>,
    /// gamma, `[out_features]`.
    pub weight: BufferRef<'a>,
    /// beta, `[out_features]`.
    pub bias: BufferRef<'a>,
    /// The running mean, `[out_features]` (updated when `update_running`).
    pub running_mean: BufferRef<'a>,
    /// The running variance, `[out_features]` (takes the unbiased batch variance).
    pub running_var: BufferRef<'a>,
    /// save_mean then save_invstd, `[2 out_features]`, as `BatchNormOp`'s forward leaves them for
    /// its backward.
    pub saved: BufferRef<'a>,
    /// A [`BnEpilogueParams`]; read from a buffer, not baked into the pipeline, so that a factor that
    /// changes every step (the cumulative average) costs no new pipeline.
    pub params: BufferRef<'a>,
    /// y = sigmoid(bn(z)) instead of bn(z).
    pub sigmoid: bool,
    /// Normalize with the batch's statistics (training: at most 64 rows, saves them and moves the
    /// running statistics when `update_running`), or with the running statistics (eval or FrozenBN: any
    /// number of rows, saves those, updates nothing).
    pub batch_stats: bool,
    /// Move the running statistics by `params.factor` (with `batch_stats` only).
    pub update_running: bool,
}

/// The BatchNorm whose backward [`LinearOp::record_backward_through_sigmoid_bn`] runs after the
/// Linear's dx product, in `BatchNorm → Sigmoid → Linear` (the BatchNorm normalized with batch
/// statistics). Every buffer 16-byte aligned.
#[derive(Debug)]
pub struct BnBackwardEpilogue<'a> {
    /// The BatchNorm's input, `[n, in_features]`.
    pub z: BufferRef<'a>,
    /// save_mean then save_invstd, `[2 in_features]`, as its forward left them.
    pub saved: BufferRef<'a>,
    /// gamma, `[in_features]`.
    pub weight: BufferRef<'a>,
    /// Receive dgamma and dbeta, `[in_features]` each (overwritten).
    pub dweight: BufferRef<'a>,
    /// See `dweight`.
    pub dbias: BufferRef<'a>,
    /// Receives the gradient at the BatchNorm's input, `[n, in_features]`.
    pub dx: BufferRef<'a>,
    /// Values the BatchNorm's forward normalized (`saved` holds their statistics): the op refuses any
    /// count but its own `n · in_features`, since statistics of another batch would give a wrong dx.
    pub values: usize,
}

/// What [`BnEpilogue::params`] holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BnEpilogueParams {
    /// Added to the variance; must be > 0.
    pub eps: f32,
    /// running = (1 - factor) running + factor batch (the momentum, or 1 / num_batches_tracked).
    pub factor: f32,
    /// Padding to 16 bytes.
    pub pad: [u32; 2],
}

/// Bindings of a paired module's second product start here (the first uses 0–3).
const PAIR_BINDING_OFFSET: u32 = 4;

/// The names `src` declares at module scope: unindented `fn`, `const`, `alias`, `struct`, `override`
/// and `var` declarations (bindings included), as the kernel files and the host's preludes write them.
fn top_level_names(src: &str) -> Vec<&str> {
    fn ident(t: &str) -> Option<&str> {
        let t = t.trim_start();
        let end = t
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(t.len());
        (end > 0).then(|| &t[..end])
    }
    src.lines()
        .filter_map(|line| {
            for keyword in ["fn ", "const ", "alias ", "struct ", "override "] {
                if let Some(rest) = line.strip_prefix(keyword) {
                    return ident(rest);
                }
            }
            if line.starts_with("var") || line.starts_with("@group") {
                let rest = &line[line.find("var")? + 3..];
                let rest = match rest.strip_prefix('<') {
                    Some(r) => &r[r.find('>')? + 1..],
                    None => rest,
                };
                return ident(rest);
            }
            None
        })
        .collect()
}

/// `src` with every name it declares at module scope suffixed by `suffix` (members after a `.` left
/// alone) and `@binding(i)` moved to `@binding(i + PAIR_BINDING_OFFSET)`: a second copy of a kernel
/// that can share a module with the first.
fn renamed(src: &str, suffix: &str) -> String {
    renamed_from(src, suffix, PAIR_BINDING_OFFSET)
}

/// [`renamed`] with the bindings moved by `offset`.
fn renamed_from(src: &str, suffix: &str, offset: u32) -> String {
    let names = top_level_names(src);
    let mut out = String::with_capacity(src.len() + src.len() / 8);
    let bytes = src.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let ch = bytes[i];
        if ch.is_ascii_alphabetic() || ch == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &src[start..i];
            out.push_str(word);
            let member = start > 0 && bytes[start - 1] == b'.';
            if !member && names.contains(&word) {
                out.push_str(suffix);
            }
        } else if src[i..].starts_with("@binding(") {
            let open = i + "@binding(".len();
            let close = open + src[open..].find(')').unwrap_or(0);
            let index: u32 = src[open..close].trim().parse().unwrap_or(0);
            out.push_str(&format!("@binding({})", index + offset));
            i = close + 1;
        } else {
            // Comments and punctuation pass through as they are (multi-byte characters included).
            let len = src[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&src[i..i + len]);
            i += len;
        }
    }
    out
}

/// The module of a `rows_bn` pair (`shaders/linear_rows_bn.wgsl` and its dW product), built only
/// where the pipeline cache misses: [`LinearOp::record_backward_through_sigmoid_bn`] and the head step.
struct RowsBnPair {
    /// (n, in_features, out_features).
    sizes: (usize, usize, usize),
    dy_vec4: bool,
    dw_kernel: BackwardKernel,
    dw_mm: Matmul,
    rowsum: bool,
    /// Whether dy, s, z and W come from their mirrors.
    textures: [bool; 4],
    /// dy from the head step's registers (`head_dy_h`, which its loss fills) instead of binding 0.
    dy_regs: bool,
}

impl RowsBnPair {
    fn key(&self) -> String {
        let ((n, i, o), [tex, s_tex, z_tex, w_tex]) = (self.sizes, self.textures);
        format!(
            "linear.rows_bn_pair.{n}.{i}.{o}.{}.{:?}.{}.{tex}.{s_tex}.{z_tex}.{w_tex}.{}",
            self.dy_vec4, self.dw_kernel, self.rowsum, self.dy_regs
        )
    }

    fn workgroups(&self) -> usize {
        self.sizes.1.div_ceil(ROWS_BN_COLS) + self.dw_kernel.blocks(self.dw_mm)
    }

    /// `dy_steps(m, k)` from dy's binding 0 or its mirror.
    fn dy_from_binding(&self, tex: bool) -> String {
        // Steps k .. k + 3 of row m are values t .. t + 3 of dy: one vec4 where 4 divides K (from
        // the mirror or storage alike, `load_dy`), else a value each (`dy_at`: a component of a
        // texel, or a scalar of storage, where dy need not be 16-byte aligned).
        if self.dy_vec4 {
            Texels::wgsl_load("dy", 0, tex)
                + "fn dy_steps(m: u32, k: u32) -> vec4<f32> { return load_dy(min(m, M - 1u) * (K / 4u) + k / 4u); }\n"
        } else {
            let at = if tex {
                Texels::wgsl_load("dy", 0, true)
                    + "fn dy_at(t: u32) -> f32 { return load_dy(t / 4u)[t % 4u]; }\n"
            } else {
                "@group(0) @binding(0) var<storage, read_write> dy: array<f32>;\n\
                 fn dy_at(t: u32) -> f32 { return dy[t]; }\n"
                    .to_string()
            };
            at + "fn dy_steps(m: u32, k: u32) -> vec4<f32> {\n\
                      let ks = vec4<u32>(k, k + 1u, k + 2u, k + 3u);\n\
                      let t = min(ks, vec4<u32>(K - 1u)) + min(m, M - 1u) * K;\n\
                      return select(vec4<f32>(0.0), vec4<f32>(dy_at(t.x), dy_at(t.y), dy_at(t.z), dy_at(t.w)), ks < vec4<u32>(K));\n\
                  }\n"
        }
    }

    /// Both products with `run_block` / `blocks` and their `_2` twins, without an entry point.
    fn source(&self) -> String {
        let ((n, i, o), [tex, s_tex, z_tex, w_tex]) = (self.sizes, self.textures);
        // Row lane + 8r of dy: the quad of steps k .. k + 3 picked by selects, so that every index
        // into the registers is a constant once r is (a dynamic one costs lavapipe a loop over the
        // lanes).
        let dy_decl = if self.dy_regs {
            "fn dy_steps_of(lane: u32, r: u32, k: u32) -> vec4<f32> {\n\
                 let b = r * 4u;\n\
                 var v = select(head_dy_h[b], head_dy_h[b + 1u], k >= 4u);\n\
                 v = select(v, head_dy_h[b + 2u], k >= 8u);\n\
                 return select(v, head_dy_h[b + 3u], k >= 12u);\n\
             }\n"
            .to_string()
        } else {
            self.dy_from_binding(tex)
                + "fn dy_steps_of(lane: u32, r: u32, k: u32) -> vec4<f32> { return dy_steps(lane + 8u * r, k); }\n"
        };
        let loads = Texels::wgsl_load("s", 3, s_tex)
            + &Texels::wgsl_load("z", 8, z_tex)
            + &Texels::wgsl_load("w", 1, w_tex);
        let first = format!(
            "const M: u32 = {n}u;\nconst N: u32 = {i}u;\nconst K: u32 = {o}u;\n{dy_decl}{loads}\n\
             {LINEAR_ROWS_BN_WGSL}\n\
             fn run_block(blk: u32, lane: u32) {{\n    rows_bn_block(blk, lane);\n}}\n\
             fn blocks() -> u32 {{\n    return rows_bn_blocks();\n}}\n"
        );
        let dw_module = self
            .dw_kernel
            .pair_module(self.dw_mm, false, self.rowsum, (tex, s_tex));
        let second = renamed(&dw_module, "_2");
        format!("{first}\n{second}")
    }
}

/// The operands of a head's forward with its loss ([`LinearOp::record_forward_xent`]).
struct XentHead<'r, 'a> {
    x: &'r BufferRef<'a>,
    weight: &'r BufferRef<'a>,
    bias: Option<&'r BufferRef<'a>>,
    logits: &'r BufferRef<'a>,
    labels: &'r BufferRef<'a>,
    dlogits: &'r BufferRef<'a>,
    stats: &'r BufferRef<'a>,
}

/// The module of `matmul_dot_xent` (`shaders/linear_dot_xent.wgsl`), built only where the pipeline
/// cache misses.
struct XentModule {
    /// (n, in_features, out_features).
    sizes: (usize, usize, usize),
    bias: bool,
    /// Whether the loss keeps each row's dlogits in registers (`head_dy`, for the head step's pair)
    /// beside storing them.
    keep: bool,
    /// Whether x and W come from their mirrors.
    textures: [bool; 2],
}

impl XentModule {
    fn key(&self) -> String {
        let ((n, i, o), [tex, w_tex]) = (self.sizes, self.textures);
        format!(
            "linear.matmul_dot_xent.{n}.{o}.{i}.{}.{tex}.{w_tex}.{}",
            self.bias, self.keep
        )
    }

    fn source(&self) -> String {
        let ((n, i, o), [tex, w_tex]) = (self.sizes, self.textures);
        // Row lane + 8r's dlogits as 4 vec4s at head_dy[4r ..] (classes past N stay zero): the head
        // step's `rows_bn` takes its dy from there (`RowsBnPair::dy_regs`). 8 rows of 16 classes a
        // lane: the loss takes at most DOT_ROWS = 64 rows and DOT_COLS = 16 classes.
        const _: () = assert!(DOT_ROWS <= 8 * 8 && DOT_COLS <= 16);
        let keep = if self.keep {
            "var<private> head_dy: array<vec4<f32>, 32>;\n\
             fn xent_keep(r: u32, k: u32, v: f32) { head_dy[r * 4u + k / 4u][k % 4u] = v; }\n"
        } else {
            "fn xent_keep(r: u32, k: u32, v: f32) {}\n"
        };
        format!(
            "{}{}{LINEAR_DOT_WGSL}\n{LINEAR_DOT16_WGSL}\n{DOT_OUT_STORE_WGSL}{FLOAT_BITS_WGSL}\
             {keep}{LINEAR_DOT_XENT_WGSL}",
            a_source(tex) + &b_source(w_tex),
            dot_module_head(n, o, Some(i), DOT_STORE_SCALAR, self.bias)
        )
    }
}

/// The subgroup kernel a backward product runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackwardKernel {
    /// `matmul_sub` (`shaders/linear_subgroup.wgsl`): any strides and sizes.
    Sub,
    /// `matmul_outer` (`shaders/linear_outer.wgsl`): B along N in memory, 4 dividing N, K and B's row
    /// stride, B and C 16-byte aligned; A read as the [`AQuads`] says.
    Outer(AQuads),
}

/// How `matmul_outer` reads A (`A_QUADS` in `shaders/linear_outer.wgsl`): a storage load costs
/// lavapipe as much for a vec4 as for a scalar, so A goes as vec4s where its layout allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AQuads {
    /// Scalars, any strides.
    Scalars,
    /// vec4s of 4 steps of K (a Linear's dx, A = dy).
    AlongK,
    /// vec4s of 4 rows (a Linear's dW, A = dy^T).
    AlongM,
}

impl AQuads {
    /// How A at `a_offset` bytes into its buffer can be read for `mm`.
    fn for_product(mm: Matmul, a_offset: u64) -> Self {
        if a_offset % 16 != 0 {
            AQuads::Scalars
        } else if mm.sak == 1 && mm.k % 4 == 0 && mm.sam % 4 == 0 {
            AQuads::AlongK
        } else if mm.sam == 1 && mm.m % 4 == 0 && mm.sak % 4 == 0 {
            AQuads::AlongM
        } else {
            AQuads::Scalars
        }
    }

    /// A's binding and accessors, as `shaders/linear_outer.wgsl` takes them: from storage, or where
    /// `texture`, from A's [`Texels`] mirror (texel i4 is A's vec4 i4, which is what `a_quad(i4)` means
    /// in every mode, so one fetch serves all three).
    fn binding(self, texture: bool) -> String {
        let mode = match self {
            AQuads::Scalars => "A_SCALARS",
            AQuads::AlongK => "A_ALONG_K",
            AQuads::AlongM => "A_ALONG_M",
        };
        if texture {
            let quads = Texels::wgsl_load("a", 0, true);
            return format!(
                "{quads}fn a_quad(i4: u32) -> vec4<f32> {{ return load_a(i4); }}\n\
                 fn a_at(i: u32) -> f32 {{ return load_a(i / 4u)[i % 4u]; }}\n\
                 const A_QUADS: u32 = {mode};\n"
            );
        }
        let (decl, at, quad) = if self == AQuads::Scalars {
            (
                "array<f32>",
                "a[i]",
                "vec4<f32>(a[4u * i4], a[4u * i4 + 1u], a[4u * i4 + 2u], a[4u * i4 + 3u])",
            )
        } else {
            ("array<vec4<f32>>", "a[i / 4u][i % 4u]", "a[i4]")
        };
        format!(
            "@group(0) @binding(0) var<storage, read_write> a: {decl};\n\
             fn a_at(i: u32) -> f32 {{ return {at}; }}\n\
             fn a_quad(i4: u32) -> vec4<f32> {{ return {quad}; }}\n\
             const A_QUADS: u32 = {mode};\n"
        )
    }
}

impl BackwardKernel {
    /// `Outer` where `mm` (A at `a_offset`, B at `b_offset`, C at `c_offset` bytes into their buffers, and
    /// the sigmoid's s at `s_offset` when C goes through its derivative) allows it.
    fn for_product(
        mm: Matmul,
        a_offset: u64,
        b_offset: u64,
        c_offset: u64,
        s_offset: Option<u64>,
    ) -> Self {
        if mm.sbn == 1
            && mm.n % 4 == 0
            && mm.sbk % 4 == 0
            && b_offset % 16 == 0
            && c_offset % 16 == 0
            && s_offset.is_none_or(|o| o % 16 == 0)
        {
            BackwardKernel::Outer(AQuads::for_product(mm, a_offset))
        } else {
            BackwardKernel::Sub
        }
    }

    /// Workgroups (subgroups of 8) covering C.
    fn blocks(self, mm: Matmul) -> usize {
        match self {
            BackwardKernel::Sub => mm.m.div_ceil(SUB_ROWS) * mm.n.div_ceil(SUB_COLS),
            BackwardKernel::Outer(quads) => {
                let rows = if quads == AQuads::AlongM {
                    OUTER_ROWS_ALONG_M
                } else {
                    OUTER_ROWS
                };
                mm.m.div_ceil(rows) * mm.n.div_ceil(OUTER_COLS)
            }
        }
    }

    /// The module for `mm` through `sigmoid_grad`'s epilogue, with `fn run_block(blk, lane)` (the
    /// product's block, and the row sums of A into `bias` when `rowsum`) and `fn blocks() -> u32` for
    /// the pair entry point (`shaders/linear_pair.wgsl`).
    /// `matmul_outer` reads A and B from their textures where `textures` says so.
    fn pair_module(
        self,
        mm: Matmul,
        sigmoid_grad: bool,
        rowsum: bool,
        textures: (bool, bool),
    ) -> String {
        let (source, prefix) = match self {
            BackwardKernel::Sub => (kernel_source(mm, sigmoid_grad, true), "sub"),
            BackwardKernel::Outer(a) => (
                outer_source(mm, sigmoid_grad, a, textures.0, textures.1),
                "outer",
            ),
        };
        let variant = if rowsum { "rowsum" } else { "plain" };
        format!(
            "{source}\nfn run_block(blk: u32, lane: u32) {{\n    {prefix}_{variant}(blk, lane);\n}}\n\
             fn blocks() -> u32 {{\n    return {prefix}_blocks();\n}}\n"
        )
    }
}

/// The WGSL of `matmul_outer` for `mm` (`shaders/linear_outer.wgsl` with its constants, A's binding and
/// B's (each from a texture where `a_texture` / `b_texture`) and the epilogue).
fn outer_source(
    mm: Matmul,
    sigmoid_grad: bool,
    a: AQuads,
    a_texture: bool,
    b_texture: bool,
) -> String {
    let binding3 = if sigmoid_grad {
        OUTER_SIGMOID_GRAD
    } else {
        OUTER_PLAIN
    };
    outer_source_with(mm, binding3, a, a_texture, b_texture)
}

/// [`outer_source`] with `binding3`: binding 3, `fn store_bias(j, v)` and `fn epilogue4(i, v)`.
fn outer_source_with(
    mm: Matmul,
    binding3: &str,
    a: AQuads,
    a_texture: bool,
    b_texture: bool,
) -> String {
    let block = if a == AQuads::AlongM {
        format!(
            "fn product_block(blk: u32, lane: u32, rowsum: bool) -> vec4<f32> {{\n    \
             return product_outer_m32(blk, lane, rowsum);\n}}\n{LINEAR_OUTER_M32_WGSL}"
        )
    } else {
        "fn product_block(blk: u32, lane: u32, rowsum: bool) -> vec4<f32> {\n    \
         return product_outer(blk, lane, rowsum);\n}\n"
            .to_string()
    };
    let b = Texels::wgsl_load("b", 1, b_texture);
    format!(
        "{}{}{b}{binding3}\n{LINEAR_OUTER_WGSL}\n{block}",
        mm.prelude(),
        a.binding(a_texture)
    )
}

/// `matmul_dot`'s A declaration and `load_a`: from x's texture ([`Texels`]) or from storage.
fn a_source(texture: bool) -> String {
    Texels::wgsl_load("a", 0, texture)
}

/// `matmul_dot`'s B (W) declaration and `load_b`: from W's texture ([`Texels`]) or from storage.
fn b_source(texture: bool) -> String {
    Texels::wgsl_load("b", 1, texture)
}

/// `matmul_outer`'s binding 3 and what uses it: f32s (the row sums, db) with C stored as computed, or the
/// sigmoid's s as vec4s (4 divides N, and the host checks s's alignment), C stored times s (1 - s).
const OUTER_PLAIN: &str = "@group(0) @binding(3) var<storage, read_write> bias: array<f32>;\n\
     fn store_bias(j: u32, v: f32) { bias[j] = v; }\n\
     fn epilogue4(i: u32, v: vec4<f32>) -> vec4<f32> { return v; }\n";
const OUTER_SIGMOID_GRAD: &str =
    "@group(0) @binding(3) var<storage, read_write> bias: array<vec4<f32>>;\n\
     fn store_bias(j: u32, v: f32) { bias[j / 4u][j % 4u] = v; }\n\
     fn epilogue4(i: u32, v: vec4<f32>) -> vec4<f32> { let s = bias[i / 4u]; return v * s * (1.0 - s); }\n";

/// The store epilogue: C as computed, or through the sigmoid's derivative.
fn epilogue(sigmoid_grad: bool) -> &'static str {
    if sigmoid_grad {
        EPILOGUE_SIGMOID_GRAD
    } else {
        EPILOGUE_IDENTITY
    }
}

/// The WGSL of the kernels for `mm`: `shaders/linear.wgsl` with its constants and store epilogue, and
/// the subgroup kernels when `subgroup` (a separate source: a device without subgroups rejects any
/// module that mentions them).
fn kernel_source(mm: Matmul, sigmoid_grad: bool, subgroup: bool) -> String {
    let epilogue = epilogue(sigmoid_grad);
    let mut source = format!("{}{epilogue}\n{LINEAR_WGSL}", mm.prelude());
    if subgroup {
        source.push_str(LINEAR_SUBGROUP_WGSL);
    }
    source
}

/// `matmul_dot`'s C and `fn store_dot(m, n, v)` (`shaders/linear_dot.wgsl`): columns n .. n + 3 of row m
/// as one vec4 (4 divides N and C is 16-byte aligned), or as scalars up to N.
const DOT_STORE_VEC4: &str =
    "@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;\n\
     fn store_dot(m: u32, n: u32, v: vec4<f32>) {\n\
         if (m < M && n < N) {\n            c[(m * N + n) / 4u] = v;\n        }\n    }\n";
const DOT_STORE_SCALAR: &str = "@group(0) @binding(2) var<storage, read_write> c: array<f32>;\n\
     fn store_dot(m: u32, n: u32, v: vec4<f32>) {\n\
         if (m >= M) {\n            return;\n        }\n\
         for (var j = 0u; j < 4u; j++) {\n            if (n + j < N) {\n                c[m * N + n + j] = v[j];\n            }\n        }\n    }\n";

/// `matmul_dot`'s epilogue where the module has no other (`shaders/linear_dot.wgsl`): the block's values
/// stored as they are (the plain forward's C; the head's logits, which `shaders/linear_dot_xent.wgsl`
/// reads back).
const DOT_OUT_STORE_WGSL: &str = "fn dot_prologue(mode: u32, lane: u32, n0: u32) {}\n\
     fn dot_out(mode: u32, lane: u32, m0: u32, n: u32, q: u32, rows: array<vec4<f32>, 8>) {\n    \
     dot_store_rows(m0, n, rows);\n}\n";

/// The start of a module with `shaders/linear_dot.wgsl` for `C [m, n] = A [m, k] B [n, k]^T`: the
/// sizes, C's binding with its `store` (one of the `DOT_STORE_*`), and `fn dot_init(n0)`, where the
/// fused entry points start the accumulators of columns n0 .. n0 + 15: the bias, or zeros.
///
/// K is a constant where `k` is given; without it the module appended after `shaders/linear_dot.wgsl`
/// defines `fn dot_k4()` (`shaders/linear_dot_bn.wgsl` reads it from a binding).
fn dot_module_head(m: usize, n: usize, k: Option<usize>, store: &str, bias: bool) -> String {
    let init = if bias {
        "dot_bias_init(n0)"
    } else {
        "array<vec4<f32>, DOT_QUADS>()"
    };
    format!(
        "const M: u32 = {m}u;\nconst N: u32 = {n}u;\n{}{store}\n\
         fn dot_init(n0: u32) -> array<vec4<f32>, DOT_QUADS> {{ return {init}; }}\n",
        k.map(dot_k_constant).unwrap_or_default()
    )
}

/// `const K` and `fn dot_k4()` from it, for `shaders/linear_dot.wgsl`.
fn dot_k_constant(k: usize) -> String {
    format!("const K: u32 = {k}u;\nfn dot_k4() -> u32 {{ return K / 4u; }}\n")
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
    /// The subgroup kernels (need the `SUBGROUP` feature and subgroups of at least 8 lanes): the
    /// forward by `matmul_dot` where 4 divides in_features, dx and dW by `matmul_outer` where 4 divides
    /// in_features (their N and B's row stride; any K), in one dispatch (`matmul_pair`), and `matmul_sub` (a 32×64 block
    /// per subgroup sharing A by `subgroupBroadcast`) for every other product. On lavapipe
    /// `matmul_sub` takes about half the time of `Blocked`, and `matmul_dot` / `matmul_outer` 25–45%
    /// less than `matmul_sub` on the MNIST MLP's products.
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

/// Texture mirrors ([`Texels`]) a [`LinearOp`] reads its operands through (on CPU devices: lavapipe
/// loads an image's texels without its per-lane loop), each where it mirrors the operand ([`Texels::mirrors`]).
#[derive(Clone, Debug, Default)]
pub struct LinearTexels {
    /// x, for the forward, dW and the fused backward's s (this Linear's x). Each forward records x's
    /// copy before its dispatch; the backward reads x as that copy left it, as dW = dyᵀx reads the x
    /// of the forward.
    pub x: Option<Arc<Texels>>,
    /// W's region of the parameter arena ([`Texels::new_at`]), for the forward and the fused
    /// backward's dx ([`LinearOp::record_backward_through_sigmoid_bn`]). The owner records its copy
    /// before the forward, after the last update.
    pub w: Option<Arc<Texels>>,
    /// dy, for both backward products. Each backward records dy's copy before its
    /// dispatch (ending a [`crate::record::OnePass`]'s pass): the owner records nothing.
    pub dy: Option<Arc<Texels>>,
    /// The input z of the BatchNorm before the Sigmoid before this Linear, for the fused backward,
    /// which copies it beside dy.
    pub z: Option<Arc<Texels>>,
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
    texels: LinearTexels,
    /// `in_features / 4` and three zeros (read-only storage): where `shaders/linear_dot_bn.wgsl`
    /// reads K; and the in_features it was written for.
    dims: (wgpu::Buffer, usize),
}

/// Bytes of [`LinearOp`]'s `dims`.
const DIMS_BYTES: u64 = 16;

impl LinearOp {
    /// An op for `x [n, in_features] -> y [n, out_features]`.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] when a size is 0.
    pub fn new(gpu: &Arc<Gpu>, n: usize, in_features: usize, out_features: usize) -> Result<Self> {
        nonzero("batch size", n)?;
        nonzero("in_features", in_features)?;
        nonzero("out_features", out_features)?;
        let dims = gpu.create_buffer(
            "linear.dims",
            DIMS_BYTES,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )?;
        let k4 = [(in_features / 4) as u32, 0, 0, 0];
        gpu.queue.write_buffer(&dims, 0, bytemuck::cast_slice(&k4));
        Ok(LinearOp {
            gpu: gpu.clone(),
            n,
            in_features,
            out_features,
            kernel: MatmulKernel::Auto.resolve(gpu)?,
            texels: LinearTexels::default(),
            dims: (dims, in_features),
        })
    }

    /// Reads the operands `texels` mirrors through those textures where each applies, or from
    /// storage (`None`, the default for each).
    pub fn set_texels(&mut self, texels: LinearTexels) {
        self.texels = texels;
    }

    /// W's mirror, where there is one for this W and the subgroup kernels read it as vec4s.
    fn w_texture_for(&self, w: &BufferRef) -> Option<&Texels> {
        let t = self.texels.w.as_ref()?;
        (self.kernel == MatmulKernel::Subgroup
            && self.in_features % 4 == 0
            && t.mirrors(w, self.out_features * self.in_features))
        .then_some(t.as_ref())
    }

    /// Which of x, W and dy this op reads through their mirrors ([`LinearTexels`]) at these buffers: a
    /// mirror that does not cover its operand (another buffer, offset or size) is passed over for
    /// storage, so this is how a caller checks that its mirrors apply.
    pub fn texel_reads(&self, x: &BufferRef, w: &BufferRef, dy: &BufferRef) -> [bool; 3] {
        [
            self.x_texture_for(x).is_some(),
            self.w_texture_for(w).is_some(),
            self.dy_texture_for(dy).is_some(),
        ]
    }

    /// The mirror standing in for dy, where there is one for this dy and the subgroup kernels read it.
    fn dy_texture_for(&self, dy: &BufferRef) -> Option<&Texels> {
        let t = self.texels.dy.as_ref()?;
        (self.kernel == MatmulKernel::Subgroup && t.mirrors(dy, self.n * self.out_features))
            .then_some(t.as_ref())
    }

    /// The mirror standing in for x, where there is one for this x and the vec4 kernels read it.
    fn x_texture_for(&self, x: &BufferRef) -> Option<&Texels> {
        let t = self.texels.x.as_ref()?;
        (self.kernel == MatmulKernel::Subgroup
            && self.in_features % 4 == 0
            && t.mirrors(x, self.n * self.in_features))
        .then_some(t.as_ref())
    }

    /// A forward's x: where a mirror stands in for it, records x's copy into it (as x is now, which
    /// the backward's dW reads too) and returns it.
    fn copy_x(&self, encoder: &mut impl Record, x: &BufferRef) -> Option<&Texels> {
        let t = self.x_texture_for(x)?;
        t.record_copy(encoder, self.n * self.in_features);
        Some(t)
    }

    /// The same op running `kernel` (tests and benchmarks compare them).
    ///
    /// # Errors
    /// As [`MatmulKernel::resolve`].
    pub fn with_kernel(mut self, kernel: MatmulKernel) -> Result<Self> {
        self.kernel = kernel.resolve(&self.gpu)?;
        Ok(self)
    }

    /// Refuses, on a CPU device, a product whose sum runs over more than [`LOOP_K_MAX`] terms: lavapipe
    /// ends a shader invocation's loops after 65 535 iterations in all and would silently drop the rest
    /// of the sum (`sizes`: the reductions this recording runs, by name).
    fn check_loop_limit(&self, sizes: &[(&str, usize)]) -> Result<()> {
        if !self.gpu.caps().cpu_device {
            return Ok(());
        }
        match sizes.iter().find(|(_, k)| *k > LOOP_K_MAX) {
            Some((what, k)) => Err(Error::LimitExceeded {
                what: format!(
                    "terms of one matmul sum ({what}) on a CPU device (lavapipe ends a shader's loops \
                     after 65 535 iterations)"
                ),
                needed: *k as u64,
                limit: LOOP_K_MAX as u64,
            }),
            None => Ok(()),
        }
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
        outer: Option<AQuads>,
        a_texture: bool,
        b_texture: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key =
            format!("linear.{entry_point}.{mm:?}.{sigmoid_grad}.{outer:?}.{a_texture}.{b_texture}");
        self.gpu.pipeline(&key, entry_point, || {
            if let Some(quads) = outer {
                outer_source(mm, sigmoid_grad, quads, a_texture, b_texture)
            } else {
                kernel_source(mm, sigmoid_grad, entry_point.starts_with("matmul_sub"))
            }
        })
    }

    /// The pipeline running dx = `dx.1` through `dx.0` (through the sigmoid's derivative when
    /// `sigmoid_grad`) and dW = `dw.1` through `dw.0` (with db when `rowsum`) in one dispatch:
    /// `shaders/linear_pair.wgsl`.
    fn pair_pipeline(
        &self,
        dx: (BackwardKernel, Matmul),
        sigmoid_grad: bool,
        dw: (BackwardKernel, Matmul),
        rowsum: bool,
        (dy_texture, x_texture): (bool, bool),
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = format!(
            "linear.matmul_pair.{dx:?}.{sigmoid_grad}.{dw:?}.{rowsum}.{dy_texture}.{x_texture}"
        );
        self.gpu.pipeline(&key, "matmul_pair", || {
            let first =
                dx.0.pair_module(dx.1, sigmoid_grad, false, (dy_texture, false));
            let dw_module =
                dw.0.pair_module(dw.1, false, rowsum, (dy_texture, x_texture));
            let second = renamed(&dw_module, "_2");
            format!("{first}\n{second}\n{LINEAR_PAIR_WGSL}")
        })
    }

    /// Records one dispatch of `workgroups` workgroups (as a grid within the per-dimension limit).
    fn dispatch_blocks(
        &self,
        encoder: &mut impl Record,
        label: &str,
        pipeline: &wgpu::ComputePipeline,
        entries: &[wgpu::BindGroupEntry],
        workgroups: usize,
    ) {
        let (gx, gy) = grid(&self.gpu, workgroups as u32);
        dispatch(&self.gpu, encoder, label, pipeline, entries, (gx, gy, 1));
    }

    /// `a_texture`: A's mirror (dy's, copied by the caller), which `matmul_outer` reads instead of A.
    #[allow(clippy::too_many_arguments)]
    fn record_matmul(
        &self,
        encoder: &mut impl Record,
        mm: Matmul,
        a: (&BufferRef, u64),
        a_texture: Option<&Texels>,
        b: (&BufferRef, u64),
        c: (&BufferRef, u64),
        extra: Extra,
    ) -> Result<()> {
        let subgroup = self.kernel == MatmulKernel::Subgroup;
        let outer = match BackwardKernel::for_product(
            mm,
            a.0.offset,
            b.0.offset,
            c.0.offset,
            s_offset(&extra),
        ) {
            BackwardKernel::Outer(quads) if subgroup && !matches!(extra, Extra::Bias(..)) => {
                Some(quads)
            }
            _ => None,
        };
        let entry_point = match (subgroup, &extra) {
            _ if outer.is_some() && matches!(extra, Extra::RowSums(..)) => "matmul_outer_rowsum",
            _ if outer.is_some() => "matmul_outer",
            (true, Extra::Bias(..)) => "matmul_sub_bias",
            (true, Extra::RowSums(..)) => "matmul_sub_rowsum",
            (true, Extra::None | Extra::SigmoidGrad(..)) => "matmul_sub",
            (false, Extra::Bias(..)) => "matmul_big_bias",
            (false, Extra::RowSums(..)) => "matmul_big_rowsum",
            (false, Extra::None | Extra::SigmoidGrad(..)) => "matmul_big",
        };
        let sigmoid_grad = matches!(extra, Extra::SigmoidGrad(..));
        // B from x's texture where B is this op's x (dW = dy^T x); only matmul_outer reads B through
        // `load_b`.
        let b_texture = self.x_texture_for(b.0).filter(|_| outer.is_some());
        let a_texture = a_texture.filter(|_| outer.is_some());
        let pipeline = self.pipeline(
            entry_point,
            mm,
            sigmoid_grad,
            outer,
            a_texture.is_some(),
            b_texture.is_some(),
        )?;
        let mut entries = vec![
            operand_entry(0, a.0, a.1, a_texture),
            operand_entry(1, b.0, b.1, b_texture),
            entry(2, c.0, c.1),
        ];
        if let Extra::Bias(r, bytes) | Extra::RowSums(r, bytes) | Extra::SigmoidGrad(r, bytes) =
            extra
        {
            entries.push(entry(3, r, bytes));
        }
        let workgroups = if let Some(quads) = outer {
            BackwardKernel::Outer(quads).blocks(mm)
        } else if subgroup {
            BackwardKernel::Sub.blocks(mm)
        } else {
            (mm.m.div_ceil(BM) * mm.n.div_ceil(BN)).div_ceil(WG)
        };
        self.dispatch_blocks(encoder, "linear.matmul", &pipeline, &entries, workgroups);
        Ok(())
    }

    /// Whether [`Self::record_forward_bn`] can run for x, W, z and y at these offsets: the subgroup
    /// kernel with 11 storage buffers a stage, 4 dividing in_features and out_features, the four 16-byte
    /// aligned, and with `batch_stats` 2 to 64 rows (one block of `matmul_dot` holds them all).
    pub fn can_fuse_bn(
        &self,
        x: &BufferRef,
        weight: &BufferRef,
        z: &BufferRef,
        y: &BufferRef,
        batch_stats: bool,
    ) -> bool {
        self.fuse_bn_refusal(x, weight, z, y, batch_stats).is_none()
    }

    fn fuse_bn_refusal(
        &self,
        x: &BufferRef,
        weight: &BufferRef,
        z: &BufferRef,
        y: &BufferRef,
        batch_stats: bool,
    ) -> Option<String> {
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        if self.kernel != MatmulKernel::Subgroup {
            return Some("it needs the subgroup matmul kernel".into());
        }
        if self.gpu.limits().max_storage_buffers_per_shader_stage < BN_EPILOGUE_BUFFERS {
            return Some(format!(
                "it binds {BN_EPILOGUE_BUFFERS} storage buffers and the device allows {} a stage",
                self.gpu.limits().max_storage_buffers_per_shader_stage
            ));
        }
        if batch_stats && !(2..=DOT_ROWS).contains(&n) {
            return Some(format!(
                "with batch statistics it takes 2 to {DOT_ROWS} rows, not {n}"
            ));
        }
        if i % 4 != 0 || o % 4 != 0 {
            return Some(format!(
                "4 must divide in_features and out_features ({i} and {o})"
            ));
        }
        if i != self.dims.1 {
            return Some(format!(
                "the op was made for in_features {} and now says {i} (its K binding would be stale): \
                 make a new op",
                self.dims.1
            ));
        }
        let misaligned: Vec<&str> = [("x", x), ("weight", weight), ("z", z), ("y", y)]
            .into_iter()
            .filter(|(_, r)| r.offset % 16 != 0)
            .map(|(name, _)| name)
            .collect();
        (!misaligned.is_empty()).then(|| {
            format!(
                "{} must sit at 16-byte aligned offsets",
                misaligned.join(", ")
            )
        })
    }

    /// Records `z = x W^T + b` (`b` optional) and BatchNorm over its rows,
    /// `bn.y = act(gamma (z - mean) / sqrt(var + eps) + beta)` (act: identity or the logistic sigmoid;
    /// mean and var the batch's or the running ones, [`BnEpilogue::batch_stats`]), as one dispatch
    /// (`shaders/linear_dot_bn.wgsl`). z is stored too (BatchNorm's backward reads it). The saved
    /// statistics and running update are [`crate::ops::batchnorm::BatchNormOp`]'s, so its backward
    /// follows this forward as it follows its own.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] where [`Self::can_fuse_bn`] is false (saying why) or a BatchNorm
    /// buffer is not 16-byte aligned; [`crate::Error::ShapeMismatch`] for too small buffers.
    pub fn record_forward_bn(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        weight: BufferRef,
        bias: Option<BufferRef>,
        z: BufferRef,
        bn: &BnEpilogue,
    ) -> Result<()> {
        self.check_loop_limit(&[("in_features", self.in_features)])?;
        if let Some(why) = self.fuse_bn_refusal(&x, &weight, &z, &bn.y, bn.batch_stats) {
            return Err(Error::config(format!(
                "a Linear fused with the BatchNorm after it cannot run here: {why}"
            )));
        }
        let (n, o) = (self.n, self.out_features);
        let (xb, wb, bb, yb) = self.operand_bytes();
        check(&self.gpu, "linear x", &x, xb)?;
        check(&self.gpu, "linear weight", &weight, wb)?;
        check(&self.gpu, "linear z", &z, yb)?;
        if let Some(b) = &bias {
            check(&self.gpu, "linear bias", b, bb)?;
        }
        let params_bytes = std::mem::size_of::<BnEpilogueParams>() as u64;
        let bn_buffers = [
            ("batchnorm y", &bn.y, yb),
            ("batchnorm weight", &bn.weight, bb),
            ("batchnorm bias", &bn.bias, bb),
            ("batchnorm running_mean", &bn.running_mean, bb),
            ("batchnorm running_var", &bn.running_var, bb),
            ("batchnorm saved", &bn.saved, 2 * bb),
            ("batchnorm epilogue params", &bn.params, params_bytes),
        ];
        for (what, r, bytes) in bn_buffers {
            if r.offset % 16 != 0 {
                return Err(Error::config(format!(
                    "{what}: offset {} is not 16-byte aligned (the fused Linear + BatchNorm reads vec4s)",
                    r.offset
                )));
            }
            check(&self.gpu, what, r, bytes)?;
        }
        let sigmoid = bn.sigmoid;
        let has_bias = bias.is_some();
        let entry_point = if bn.batch_stats {
            "matmul_dot_bn"
        } else {
            "matmul_dot_bn_eval"
        };
        let update = bn.batch_stats && bn.update_running;
        let cols = dot_cols(&self.gpu, o);
        let x_texture = self.copy_x(encoder, &x);
        let tex = x_texture.is_some();
        let w_texture = self.w_texture_for(&weight);
        let w_tex = w_texture.is_some();
        // Not K: the kernel reads it from `dims`, so that the Linears of a stack of equal widths share
        // this pipeline whatever their inputs (on lavapipe each costs ~85 ms to build).
        let key = format!(
            "linear.{entry_point}.{n}.{o}.{has_bias}.{sigmoid}.{update}.{cols}.{tex}.{w_tex}"
        );
        let pipeline = self.gpu.pipeline(&key, entry_point, || {
            // As shaders/sigmoid.wgsl: exp of a non-positive number, so neither side overflows.
            let activation = if sigmoid {
                "let e = exp(-abs(v)); let s = 1.0 / (1.0 + e); return select(e * s, s, v >= vec4<f32>(0.0));"
            } else {
                "return v;"
            };
            format!(
                "{}{}const UPDATE: bool = {update};\n\
                 fn activation(v: vec4<f32>) -> vec4<f32> {{ {activation} }}\n\
                 {LINEAR_DOT_WGSL}\n{}\n{FLOAT_BITS_WGSL}{LINEAR_DOT_BN_WGSL}",
                a_source(tex) + &b_source(w_tex),
                dot_module_head(n, o, None, DOT_STORE_VEC4, has_bias),
                dot_block_wgsl(cols)
            )
        })?;
        let mut entries = vec![
            operand_entry(0, &x, xb, x_texture),
            operand_entry(1, &weight, wb, w_texture),
            entry(2, &z, yb),
        ];
        if let Some(b) = &bias {
            entries.push(entry(3, b, bb));
        }
        entries.extend(
            bn_buffers
                .iter()
                .enumerate()
                .map(|(k, (_, r, bytes))| entry(4 + k as u32, r, *bytes)),
        );
        entries.push(entry(11, &(&self.dims.0).into(), DIMS_BYTES));
        let row_blocks = if bn.batch_stats {
            1
        } else {
            n.div_ceil(DOT_ROWS)
        };
        self.dispatch_blocks(
            encoder,
            "linear.matmul + batchnorm",
            &pipeline,
            &entries,
            row_blocks * o.div_ceil(cols),
        );
        Ok(())
    }

    /// Whether [`Self::record_backward_through_sigmoid_bn`] can run for W, s (this Linear's input) and
    /// dy at these offsets: the subgroup kernels with 13 storage buffers a stage, 2 to 64 rows, 4 dividing
    /// in_features, W and s 16-byte aligned (the BatchNorm's buffers are checked when recording).
    pub fn can_fuse_bn_backward(&self, weight: &BufferRef, s: &BufferRef) -> bool {
        self.fuse_bn_backward_refusal(weight, s).is_none()
    }

    fn fuse_bn_backward_refusal(&self, weight: &BufferRef, s: &BufferRef) -> Option<String> {
        let (n, i) = (self.n, self.in_features);
        let have = self.gpu.limits().max_storage_buffers_per_shader_stage;
        if self.kernel != MatmulKernel::Subgroup {
            Some("it needs the subgroup matmul kernels".into())
        } else if have < BN_BACKWARD_BUFFERS {
            Some(format!(
                "it binds {BN_BACKWARD_BUFFERS} storage buffers and the device allows {have} a stage"
            ))
        } else if !(2..=DOT_ROWS).contains(&n) {
            Some(format!("it takes 2 to {DOT_ROWS} rows, not {n}"))
        } else if i % 4 != 0 {
            Some(format!("4 must divide in_features ({i})"))
        } else if weight.offset % 16 != 0 || s.offset % 16 != 0 {
            Some("weight and the sigmoid's output must sit at 16-byte aligned offsets".into())
        } else {
            None
        }
    }

    /// The backward of `BatchNorm → Sigmoid → this Linear` in one dispatch, for `s` the sigmoid's
    /// output (this Linear's input): dW and db as [`Self::record_backward`], and, in place of the
    /// gradient at the sigmoid's input, the BatchNorm's backward of it (batch statistics):
    /// `bn.dx`, `bn.dweight` and `bn.dbias`, as [`crate::ops::batchnorm::BatchNormOp::record_backward`]
    /// computes them (`shaders/linear_rows_bn.wgsl`). The gradient between the layers is never written.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] where [`Self::can_fuse_bn_backward`] is false (saying why) or a
    /// BatchNorm buffer is not 16-byte aligned; [`crate::Error::ShapeMismatch`] for too small buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn record_backward_through_sigmoid_bn(
        &self,
        encoder: &mut impl Record,
        s: BufferRef,
        weight: BufferRef,
        dy: BufferRef,
        dweight: BufferRef,
        dbias: Option<BufferRef>,
        bn: &BnBackwardEpilogue,
    ) -> Result<()> {
        let (pair, entries) = self.rows_bn_pair(
            encoder,
            &s,
            &weight,
            &dy,
            &dweight,
            dbias.as_ref(),
            bn,
            false,
        )?;
        let pipeline = self.gpu.pipeline(&pair.key(), "matmul_pair", || {
            format!("{}\n{LINEAR_PAIR_WGSL}", pair.source())
        })?;
        self.dispatch_blocks(
            encoder,
            "linear.matmul dx+dW + batchnorm backward",
            &pipeline,
            &entries,
            pair.workgroups(),
        );
        Ok(())
    }

    /// What [`Self::record_backward_through_sigmoid_bn`] dispatches, checked: its module and its bindings
    /// (0-12), with dy's and z's copies into their mirrors recorded where they have them and
    /// not `in_head_step` (whose loss writes dy in the same dispatch and hands its dx product the rows in
    /// registers: binding 0 is then left out).
    #[allow(clippy::too_many_arguments)]
    fn rows_bn_pair<'a>(
        &'a self,
        encoder: &mut impl Record,
        s: &BufferRef<'a>,
        weight: &BufferRef<'a>,
        dy: &BufferRef<'a>,
        dweight: &BufferRef<'a>,
        dbias: Option<&BufferRef<'a>>,
        bn: &BnBackwardEpilogue<'a>,
        in_head_step: bool,
    ) -> Result<(RowsBnPair, Vec<wgpu::BindGroupEntry<'a>>)> {
        self.check_loop_limit(&[("batch rows", self.n), ("out_features", self.out_features)])?;
        if let Some(why) = self.fuse_bn_backward_refusal(weight, s) {
            return Err(Error::config(format!(
                "a Linear's backward fused with the BatchNorm before its sigmoid cannot run here: {why}"
            )));
        }
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        let (xb, wb, bb, yb, cb) = (
            f32_bytes(n * i),
            f32_bytes(o * i),
            f32_bytes(o),
            f32_bytes(n * o),
            f32_bytes(i),
        );
        check(&self.gpu, "linear x", s, xb)?;
        check(&self.gpu, "linear weight", weight, wb)?;
        check(&self.gpu, "linear dy", dy, yb)?;
        check(&self.gpu, "linear dweight", dweight, wb)?;
        if let Some(db) = dbias {
            check(&self.gpu, "linear dbias", db, bb)?;
        }
        let bn_buffers = [
            ("batchnorm x", &bn.z, xb, 8),
            ("batchnorm saved", &bn.saved, 2 * cb, 9),
            ("batchnorm weight", &bn.weight, cb, 10),
            ("batchnorm dweight", &bn.dweight, cb, 11),
            ("batchnorm dbias", &bn.dbias, cb, 12),
        ];
        if bn.values != n * i {
            return Err(Error::ShapeMismatch {
                what: "the BatchNorm's last forward (the statistics its backward uses)".into(),
                expected: format!("[{n}, {i}] ({} values)", n * i),
                got: format!("{} values", bn.values),
            });
        }
        for (what, r, bytes, _) in bn_buffers.iter().chain([&("batchnorm dx", &bn.dx, xb, 2)]) {
            if r.offset % 16 != 0 {
                return Err(Error::config(format!(
                    "{what}: offset {} is not 16-byte aligned (the fused backward reads vec4s)",
                    r.offset
                )));
            }
            check(&self.gpu, what, r, *bytes)?;
        }
        // dW = dy^T s (and db), as `backward` pairs it.
        let dw_mm = self.dw_product();
        let dw_kernel =
            BackwardKernel::for_product(dw_mm, dy.offset, s.offset, dweight.offset, None);
        let rowsum = dbias.is_some();
        let dy_vec4 = o % 4 == 0 && dy.offset % 16 == 0;
        // dy from its mirror where there is one (both products), copied first, as dy is now.
        let dy_texture = self
            .dy_texture_for(dy)
            .filter(|_| !in_head_step && dw_kernel != BackwardKernel::Sub);
        if let Some(t) = dy_texture {
            t.record_copy(encoder, n * o);
        }
        // s is this Linear's x: from the forward's copy where x has a mirror (dW's B and the
        // sigmoid's derivative).
        let s_texture = self
            .x_texture_for(s)
            .filter(|_| dw_kernel != BackwardKernel::Sub);
        // z as it is now, copied beside dy where it has a mirror; W from its mirror, as the forward
        // copied it.
        let z_texture = self
            .texels
            .z
            .as_deref()
            .filter(|t| self.kernel == MatmulKernel::Subgroup && t.mirrors(&bn.z, n * i));
        if let Some(t) = z_texture {
            t.record_copy(encoder, n * i);
        }
        let w_texture = self.w_texture_for(weight);
        let pair = RowsBnPair {
            sizes: (n, i, o),
            dy_vec4,
            dw_kernel,
            dw_mm,
            rowsum,
            textures: [
                dy_texture.is_some(),
                s_texture.is_some(),
                z_texture.is_some(),
                w_texture.is_some(),
            ],
            dy_regs: in_head_step,
        };
        let off = PAIR_BINDING_OFFSET;
        let mut entries = vec![
            operand_entry(1, weight, wb, w_texture),
            entry(2, &bn.dx, xb),
            operand_entry(3, s, xb, s_texture),
            operand_entry(off, dy, yb, dy_texture),
            operand_entry(off + 1, s, xb, s_texture),
            entry(off + 2, dweight, wb),
        ];
        if !in_head_step {
            entries.push(operand_entry(0, dy, yb, dy_texture));
        }
        if let Some(db) = dbias {
            entries.push(entry(off + 3, db, bb));
        }
        entries.extend(bn_buffers.iter().map(|(_, r, bytes, binding)| {
            operand_entry(*binding, r, *bytes, z_texture.filter(|_| *binding == 8))
        }));
        Ok((pair, entries))
    }

    /// Whether [`Self::record_forward_xent`] can run for x and W at these offsets: the subgroup kernel,
    /// 1 to 64 rows and 2 to 16 classes (one block of `matmul_dot` holds every logit), 4 dividing
    /// in_features, x and W 16-byte aligned.
    pub fn can_fuse_xent(&self, x: &BufferRef, weight: &BufferRef) -> bool {
        self.fuse_xent_refusal(x, weight).is_none()
    }

    fn fuse_xent_refusal(&self, x: &BufferRef, weight: &BufferRef) -> Option<String> {
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        if self.kernel != MatmulKernel::Subgroup {
            Some("it needs the subgroup matmul kernel".into())
        } else if n > DOT_ROWS {
            Some(format!("it takes at most {DOT_ROWS} rows, not {n}"))
        } else if !(2..=DOT_COLS).contains(&o) {
            Some(format!("it takes 2 to {DOT_COLS} classes, not {o}"))
        } else if i % 4 != 0 {
            Some(format!("4 must divide in_features ({i})"))
        } else if x.offset % 16 != 0 || weight.offset % 16 != 0 {
            Some("x and weight must sit at 16-byte aligned offsets".into())
        } else {
            None
        }
    }

    /// Records the head's forward `logits = x W^T + b` (`b` optional) and softmax cross-entropy over
    /// the logits in one dispatch (`shaders/linear_dot_xent.wgsl`), with
    /// [`crate::ops::softmax_xent::SoftmaxXentOp::record_train`]'s outputs and semantics: `dlogits`
    /// (the loss's gradient at the logits, mean over the rows), this batch's mean loss in `stats[0]`,
    /// and Σ loss, Σ correct and the rows added to `stats[1..4]`. A label past the classes makes its
    /// row's loss and dlogits NaN, as there.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] where [`Self::can_fuse_xent`] is false (saying why);
    /// [`crate::Error::ShapeMismatch`] for too small buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn record_forward_xent(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        weight: BufferRef,
        bias: Option<BufferRef>,
        logits: BufferRef,
        labels: BufferRef,
        dlogits: BufferRef,
        stats: BufferRef,
    ) -> Result<()> {
        let head = XentHead {
            x: &x,
            weight: &weight,
            bias: bias.as_ref(),
            logits: &logits,
            labels: &labels,
            dlogits: &dlogits,
            stats: &stats,
        };
        let (module, entries) = self.xent_head(encoder, &head, false)?;
        let pipeline = self
            .gpu
            .pipeline(&module.key(), "matmul_dot_xent", || module.source())?;
        self.dispatch_blocks(
            encoder,
            "linear.matmul + softmax_xent",
            &pipeline,
            &entries,
            1,
        );
        Ok(())
    }

    /// What [`Self::record_forward_xent`] dispatches, checked: its module and its bindings (0-6), with
    /// x's copy into its mirror recorded where it has one.
    fn xent_head<'a>(
        &'a self,
        encoder: &mut impl Record,
        head: &XentHead<'_, 'a>,
        keep: bool,
    ) -> Result<(XentModule, Vec<wgpu::BindGroupEntry<'a>>)> {
        self.check_loop_limit(&[("in_features", self.in_features)])?;
        if let Some(why) = self.fuse_xent_refusal(head.x, head.weight) {
            return Err(Error::config(format!(
                "a Linear fused with softmax cross-entropy cannot run here: {why}"
            )));
        }
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        let (xb, wb, bb, yb, lb) = (
            f32_bytes(n * i),
            f32_bytes(o * i),
            f32_bytes(o),
            f32_bytes(n * o),
            4 * n as u64,
        );
        let sb = f32_bytes(crate::ops::softmax_xent::STATS_LEN);
        check(&self.gpu, "linear x", head.x, xb)?;
        check(&self.gpu, "linear weight", head.weight, wb)?;
        check(&self.gpu, "logits", head.logits, yb)?;
        check(&self.gpu, "labels", head.labels, lb)?;
        check(&self.gpu, "dlogits", head.dlogits, yb)?;
        check(&self.gpu, "stats", head.stats, sb)?;
        if let Some(b) = head.bias {
            check(&self.gpu, "linear bias", b, bb)?;
        }
        let x_texture = self.copy_x(encoder, head.x);
        let w_texture = self.w_texture_for(head.weight);
        let module = XentModule {
            sizes: (n, i, o),
            bias: head.bias.is_some(),
            keep,
            textures: [x_texture.is_some(), w_texture.is_some()],
        };
        let mut entries = vec![
            operand_entry(0, head.x, xb, x_texture),
            operand_entry(1, head.weight, wb, w_texture),
            entry(2, head.logits, yb),
        ];
        if let Some(b) = head.bias {
            entries.push(entry(3, b, bb));
        }
        entries.extend([
            entry(4, head.labels, lb),
            entry(5, head.dlogits, yb),
            entry(6, head.stats, sb),
        ]);
        Ok((module, entries))
    }

    /// Whether [`Self::record_head_step`] can run for x (the sigmoid's output) and W at these
    /// offsets: where both [`Self::can_fuse_xent`] and [`Self::can_fuse_bn_backward`] can, and the
    /// device allows its 20 storage buffers a stage.
    pub fn can_fuse_head_step(&self, x: &BufferRef, weight: &BufferRef) -> bool {
        self.head_step_refusal(x, weight).is_none()
    }

    fn head_step_refusal(&self, x: &BufferRef, weight: &BufferRef) -> Option<String> {
        let have = self.gpu.limits().max_storage_buffers_per_shader_stage;
        self.fuse_xent_refusal(x, weight)
            .or_else(|| self.fuse_bn_backward_refusal(weight, x))
            .or_else(|| {
                (have < HEAD_STEP_BUFFERS).then(|| {
                    format!(
                        "it binds {HEAD_STEP_BUFFERS} storage buffers and the device allows {have} a stage"
                    )
                })
            })
    }

    /// A network's head in one dispatch of one subgroup (`shaders/linear_head_step.wgsl`): its forward
    /// with softmax cross-entropy, as [`Self::record_forward_xent`] records it (logits, dlogits,
    /// `stats`), then its backward through the `BatchNorm → Sigmoid` before it with dy = dlogits, as
    /// [`Self::record_backward_through_sigmoid_bn`] records it (dW, db and the BatchNorm's `bn.dx`,
    /// `bn.dweight` and `bn.dbias`). `x` is the sigmoid's output, the head's input. Outputs and
    /// numerics are the two ops' own; one dispatch instead of two, and one thread instead of two
    /// workers woken for a small product (lavapipe; the trainer takes it on CPU devices).
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] where [`Self::can_fuse_head_step`] is false (saying why) or a
    /// BatchNorm buffer is not 16-byte aligned; [`crate::Error::ShapeMismatch`] for too small buffers
    /// or statistics of another batch in `bn`.
    #[allow(clippy::too_many_arguments)]
    pub fn record_head_step(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        weight: BufferRef,
        bias: Option<BufferRef>,
        logits: BufferRef,
        labels: BufferRef,
        dlogits: BufferRef,
        stats: BufferRef,
        (dweight, dbias): (BufferRef, Option<BufferRef>),
        bn: &BnBackwardEpilogue,
    ) -> Result<()> {
        if let Some(why) = self.head_step_refusal(&x, &weight) {
            return Err(Error::config(format!(
                "a head's forward, loss and backward cannot run as one dispatch here: {why}"
            )));
        }
        let head = XentHead {
            x: &x,
            weight: &weight,
            bias: bias.as_ref(),
            logits: &logits,
            labels: &labels,
            dlogits: &dlogits,
            stats: &stats,
        };
        let (xent, xent_entries) = self.xent_head(encoder, &head, true)?;
        // dy is dlogits, written in this dispatch: the dx product takes its rows from the loss's
        // registers, the dW product from storage (not a mirror).
        let (pair, mut entries) = self.rows_bn_pair(
            encoder,
            &x,
            &weight,
            &dlogits,
            &dweight,
            dbias.as_ref(),
            bn,
            true,
        )?;
        entries.extend(xent_entries.into_iter().map(|mut e| {
            e.binding += HEAD_XENT_BINDING_OFFSET;
            e
        }));
        let key = format!("linear.head_step.{}.{}", pair.key(), xent.key());
        let pipeline = self.gpu.pipeline(&key, "head_step", || {
            format!(
                "{}\n{}\n{LINEAR_HEAD_STEP_WGSL}",
                pair.source(),
                renamed_from(&xent.source(), "_h", HEAD_XENT_BINDING_OFFSET)
            )
        })?;
        self.dispatch_blocks(
            encoder,
            "linear.matmul + softmax_xent + dx+dW + batchnorm backward",
            &pipeline,
            &entries,
            1,
        );
        Ok(())
    }

    /// Records `y = x W^T + b` (`b` optional).
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] / [`crate::Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_forward(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        weight: BufferRef,
        bias: Option<BufferRef>,
        y: BufferRef,
    ) -> Result<()> {
        self.check_loop_limit(&[("in_features", self.in_features)])?;
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        let (xb, wb, bb, yb) = self.operand_bytes();
        check(&self.gpu, "linear x", &x, xb)?;
        check(&self.gpu, "linear weight", &weight, wb)?;
        check(&self.gpu, "linear y", &y, yb)?;
        if let Some(b) = &bias {
            check(&self.gpu, "linear bias", b, bb)?;
        }
        // x and W both run along K (in_features): with the subgroup kernel, `matmul_dot` takes them 4
        // steps of K at a time where K and the bindings allow vec4 loads.
        if self.kernel == MatmulKernel::Subgroup
            && i % 4 == 0
            && x.offset % 16 == 0
            && weight.offset % 16 == 0
        {
            let x_texture = self.copy_x(encoder, &x);
            let tex = x_texture.is_some();
            let w_texture = self.w_texture_for(&weight);
            let w_tex = w_texture.is_some();
            let mut entries = vec![
                operand_entry(0, &x, xb, x_texture),
                operand_entry(1, &weight, wb, w_texture),
                entry(2, &y, yb),
            ];
            if let Some(b) = &bias {
                entries.push(entry(3, b, bb));
            }
            let entry_point = if bias.is_some() {
                "matmul_dot_bias"
            } else {
                "matmul_dot"
            };
            let vec4_store = o % 4 == 0 && y.offset % 16 == 0;
            let store = if vec4_store {
                DOT_STORE_VEC4
            } else {
                DOT_STORE_SCALAR
            };
            let cols = dot_cols(&self.gpu, o);
            let key = format!("linear.{entry_point}.{n}.{o}.{i}.{vec4_store}.{cols}.{tex}.{w_tex}");
            let pipeline = self.gpu.pipeline(&key, entry_point, || {
                format!(
                    "{}const M: u32 = {n}u;\nconst N: u32 = {o}u;\n{}{store}\n\
                     {LINEAR_DOT_WGSL}\n{}\n{DOT_OUT_STORE_WGSL}",
                    a_source(tex) + &b_source(w_tex),
                    dot_k_constant(i),
                    dot_block_wgsl(cols)
                )
            })?;
            let workgroups = n.div_ceil(DOT_ROWS) * o.div_ceil(cols);
            self.dispatch_blocks(encoder, "linear.matmul", &pipeline, &entries, workgroups);
            return Ok(());
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
            None,
            (&weight, wb),
            (&y, yb),
            match &bias {
                Some(b) => Extra::Bias(b, bb),
                None => Extra::None,
            },
        )
    }

    /// Bytes of x, W, b and y (or their gradients) for this op's shapes.
    fn operand_bytes(&self) -> (u64, u64, u64, u64) {
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        (
            f32_bytes(n * i),
            f32_bytes(o * i),
            f32_bytes(o),
            f32_bytes(n * o),
        )
    }

    /// The product dW = dy^T x: A = dy^T, B = x [n, i]; db = the row sums of A = dy^T, which the dW
    /// kernel sums as it walks them.
    fn dw_product(&self) -> Matmul {
        Matmul {
            m: self.out_features,
            n: self.in_features,
            k: self.n,
            sam: 1,
            sak: self.out_features,
            sbk: self.in_features,
            sbn: 1,
        }
    }

    /// The backward of a network's first Linear (no dx: `dweight = dy^T x` and `dbias`, as
    /// [`Self::record_backward`] records them) with SGD's update of every parameter of the model in the
    /// same dispatch (`matmul_outer_sgd`): lavapipe spends 40-90 µs a dispatch beside its work. Each
    /// block updates W's units as it stores their gradient and b's from its row sums, and a share of
    /// the arena's other units, whose gradients the backward's earlier dispatches wrote; the update is
    /// `shaders/sgd.wgsl`'s own function, so the parameters, momentum and gradients are those of the
    /// backward followed by [`crate::ops::sgd::SgdOp::record_step_via`] to the bit. It records the
    /// arenas' copies into their mirrors first, as that does.
    ///
    /// `params`, `grads` and `sgd.momentum` are the arenas (`sgd.op.len` values each), `dweight` and
    /// `dbias` this Linear's W and b in `grads`, at its first units (W at 0, b after it at a 16-byte
    /// offset, past the arena's alignment padding, whose units the blocks update as SGD does), and
    /// `texels` their mirrors. Returns `false`, recording nothing, where it does not apply: another
    /// kernel than the subgroup one, dW's product not read along M (`matmul_outer_m32`), 4 not
    /// dividing out_features or the arena, W and b elsewhere in the arenas, an arena without its
    /// mirror, or more units for a block than lavapipe's loops allow.
    ///
    /// # Errors
    /// As [`Self::record_backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_dw_with_sgd(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        dy: BufferRef,
        dweight: BufferRef,
        dbias: BufferRef,
        (params, grads): (&wgpu::Buffer, &wgpu::Buffer),
        texels: SgdTexels,
        sgd: &SgdFusion,
    ) -> Result<bool> {
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        let len = sgd.op.len;
        let (xb, wb, bb, yb) = self.operand_bytes();
        check(&self.gpu, "linear x", &x, xb)?;
        check(&self.gpu, "linear dy", &dy, yb)?;
        check(&self.gpu, "linear dweight", &dweight, wb)?;
        check(&self.gpu, "linear dbias", &dbias, bb)?;
        self.check_loop_limit(&[("batch rows", n), ("out_features", o)])?;
        let dw_mm = self.dw_product();
        let kernel = BackwardKernel::for_product(dw_mm, dy.offset, x.offset, dweight.offset, None);
        let arena = |r: &BufferRef, buffer: &wgpu::Buffer, units: u64| {
            *r.buffer == *buffer && r.offset == 16 * units
        };
        // W's units, then (past the arena's alignment padding) b's: every other unit from W's end on is
        // the rest the blocks share, b's skipped.
        let w_units = o * i / 4;
        let b_unit0 = (dbias.offset / 16) as usize;
        let (param_t, grad_t, buf_t) = match (texels.param, texels.grad, sgd.momentum_texels) {
            (Some(p), Some(g), Some(b))
                if p.mirrors(&params.into(), len)
                    && g.mirrors(&grads.into(), len)
                    && b.mirrors(&sgd.momentum.into(), len) =>
            {
                (p, g, b)
            }
            _ => return Ok(false),
        };
        let blocks = kernel.blocks(dw_mm);
        let rest = (len / 4).saturating_sub(w_units);
        let per_block = rest.div_ceil(blocks.max(1));
        if self.kernel != MatmulKernel::Subgroup
            || kernel != BackwardKernel::Outer(AQuads::AlongM)
            || o % 4 != 0
            || len % 4 != 0
            || b_unit0 < w_units
            || b_unit0 + o / 4 > len / 4
            || !arena(&dweight, grads, 0)
            || !arena(&dbias, grads, b_unit0 as u64)
            || per_block / 8 + 1 > LOOP_K_MAX
        {
            return Ok(false);
        }
        let dy_texture = self.dy_texture_for(&dy);
        let x_texture = self.x_texture_for(&x);
        let textures = (dy_texture.is_some(), x_texture.is_some());
        let key =
            format!("linear.matmul_outer_sgd.{dw_mm:?}.{textures:?}.{len}.{b_unit0}.{per_block}");
        let pipeline = self.gpu.pipeline(&key, "matmul_outer_sgd", || {
            let outer = outer_source_with(
                dw_mm,
                LINEAR_OUTER_SGD_WGSL,
                AQuads::AlongM,
                textures.0,
                textures.1,
            );
            let update = renamed(&sgd_module(true, len / 4, (true, true, true)), "_2");
            format!(
                "{outer}\n{update}\nconst W_UNIT0: u32 = 0u;\nconst B_UNIT0: u32 = {b_unit0}u;\n\
                 const REST_UNIT0: u32 = {w_units}u;\nconst REST_PER_BLOCK: u32 = {per_block}u;\n"
            )
        })?;
        // The copies, as dy is now and as the arenas are before the update: the gradients past W's
        // rows (every other layer's final; W's and b's come from the product, so W's rows of the
        // mirror are never read), the parameters past W's rows where W's own mirror is the arena's
        // (the forward copied W's rows into it, and nothing writes W between the forward and its
        // update), and all the momentum.
        if let Some(t) = dy_texture {
            t.record_copy(encoder, n * o);
        }
        let past_w = 4 * w_units;
        let w_in_arena_mirror = self
            .texels
            .w
            .as_ref()
            .is_some_and(|w| w.texture == param_t.texture);
        param_t.record_copy_from(encoder, if w_in_arena_mirror { past_w } else { 0 }, len);
        grad_t.record_copy_from(encoder, past_w, len);
        buf_t.record_copy(encoder, len);
        let arena_bytes = f32_bytes(len);
        let off = PAIR_BINDING_OFFSET;
        let entries = vec![
            operand_entry(0, &dy, yb, dy_texture),
            operand_entry(1, &x, xb, x_texture),
            entry(2, &dweight, wb),
            entry(3, &dbias, bb),
            entry(off, &params.into(), arena_bytes),
            texture_entry(off + 1, &grad_t.view),
            entry(off + 2, &sgd.momentum.into(), arena_bytes),
            texture_entry(off + 3, sgd.op.hyper_view()),
            texture_entry(off + 4, &param_t.view),
            texture_entry(off + 5, &buf_t.view),
        ];
        self.dispatch_blocks(
            encoder,
            "linear.matmul dW + sgd",
            &pipeline,
            &entries,
            blocks,
        );
        Ok(true)
    }

    /// Records the backward: `dweight = dy^T x` and `dbias = sum_rows dy` (overwritten, not accumulated)
    /// and, when `dx` is given, `dx = dy W` (the first layer of a network needs no dx).
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] / [`crate::Error::BadConfig`] for too small or misaligned buffers.
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
        self.check_loop_limit(&[("batch rows", self.n), ("out_features", self.out_features)])?;
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
        encoder: &mut impl Record,
        x: BufferRef,
        weight: BufferRef,
        dy: BufferRef,
        dz: BufferRef,
        dweight: BufferRef,
        dbias: Option<BufferRef>,
    ) -> Result<()> {
        self.check_loop_limit(&[("batch rows", self.n), ("out_features", self.out_features)])?;
        self.backward(encoder, x, weight, dy, Some(dz), dweight, dbias, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        weight: BufferRef,
        dy: BufferRef,
        dx: Option<BufferRef>,
        dweight: BufferRef,
        dbias: Option<BufferRef>,
        through_sigmoid: bool,
    ) -> Result<()> {
        let (n, i, o) = (self.n, self.in_features, self.out_features);
        let (xb, wb, bb, yb) = self.operand_bytes();
        check(&self.gpu, "linear x", &x, xb)?;
        check(&self.gpu, "linear weight", &weight, wb)?;
        check(&self.gpu, "linear dy", &dy, yb)?;
        check(&self.gpu, "linear dweight", &dweight, wb)?;
        if let Some(db) = &dbias {
            check(&self.gpu, "linear dbias", db, bb)?;
        }
        // dy from its mirror where there is one: the copy first, as dy is now.
        let dy_texture = self.dy_texture_for(&dy);
        if let Some(t) = dy_texture {
            t.record_copy(encoder, n * o);
        }
        // dx = dy W: A = dy [n, o], B = W [o, i].
        let dx_mm = Matmul {
            m: n,
            n: i,
            k: o,
            sam: o,
            sak: 1,
            sbk: i,
            sbn: 1,
        };
        let dw_mm = self.dw_product();
        if let Some(dx) = &dx {
            check(&self.gpu, "linear dx", dx, xb)?;
            // The pair binds dy, W, dx, dy, x, dW, and s and db where asked: on a device allowing fewer
            // storage buffers per stage (WebGPU's default is 8) the products go one dispatch each.
            let pair_buffers = 6 + u32::from(through_sigmoid) + u32::from(dbias.is_some());
            if self.kernel == MatmulKernel::Subgroup
                && self.gpu.limits().max_storage_buffers_per_shader_stage >= pair_buffers
            {
                let s_offset = through_sigmoid.then_some(x.offset);
                let dx_kernel = BackwardKernel::for_product(
                    dx_mm,
                    dy.offset,
                    weight.offset,
                    dx.offset,
                    s_offset,
                );
                let dw_kernel =
                    BackwardKernel::for_product(dw_mm, dy.offset, x.offset, dweight.offset, None);
                // Either product reads dy from its mirror only as matmul_outer.
                let dy_texture = dy_texture.filter(|_| {
                    dx_kernel != BackwardKernel::Sub && dw_kernel != BackwardKernel::Sub
                });
                // dW's B is x, from the forward's copy where x has a mirror.
                let x_texture = self
                    .x_texture_for(&x)
                    .filter(|_| dw_kernel != BackwardKernel::Sub);
                let pipeline = self.pair_pipeline(
                    (dx_kernel, dx_mm),
                    through_sigmoid,
                    (dw_kernel, dw_mm),
                    dbias.is_some(),
                    (dy_texture.is_some(), x_texture.is_some()),
                )?;
                let mut entries = vec![
                    operand_entry(0, &dy, yb, dy_texture),
                    entry(1, &weight, wb),
                    entry(2, dx, xb),
                ];
                if through_sigmoid {
                    entries.push(entry(3, &x, xb));
                }
                let off = PAIR_BINDING_OFFSET;
                entries.extend([
                    operand_entry(off, &dy, yb, dy_texture),
                    operand_entry(off + 1, &x, xb, x_texture),
                    entry(off + 2, &dweight, wb),
                ]);
                if let Some(db) = &dbias {
                    entries.push(entry(off + 3, db, bb));
                }
                let workgroups = dx_kernel.blocks(dx_mm) + dw_kernel.blocks(dw_mm);
                self.dispatch_blocks(
                    encoder,
                    "linear.matmul dx+dW",
                    &pipeline,
                    &entries,
                    workgroups,
                );
                return Ok(());
            }
            let extra = if through_sigmoid {
                Extra::SigmoidGrad(&x, xb)
            } else {
                Extra::None
            };
            let (a, b, c) = ((&dy, yb), (&weight, wb), (dx, xb));
            self.record_matmul(encoder, dx_mm, a, dy_texture, b, c, extra)?;
        }
        let extra = match &dbias {
            Some(db) => Extra::RowSums(db, bb),
            None => Extra::None,
        };
        let mm = dw_mm;
        let (a, b, c) = ((&dy, yb), (&x, xb), (&dweight, wb));
        self.record_matmul(encoder, mm, a, dy_texture, b, c, extra)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::renamed;

    #[test]
    fn renamed_suffixes_module_scope_names_and_moves_bindings() {
        let src = "const M: u32 = 4u;\n\
                   @group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;\n\
                   var<workgroup> tile: array<f32, 8>;\n\
                   fn load(m: u32) -> f32 {\n    let c4 = c[min(m, M)];\n    return c4.x + tile[m];\n}\n";
        let want = "const M_2: u32 = 4u;\n\
                    @group(0) @binding(6) var<storage, read_write> c_2: array<vec4<f32>>;\n\
                    var<workgroup> tile_2: array<f32, 8>;\n\
                    fn load_2(m: u32) -> f32 {\n    let c4 = c_2[min(m, M_2)];\n    return c4.x + tile_2[m];\n}\n";
        assert_eq!(renamed(src, "_2"), want);
    }
}
