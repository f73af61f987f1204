//! `Linear`: `y = x W^T + b`, PyTorch's `nn.Linear` (`weight [out, in]`, `bias [out]`). Its parameters
//! and gradients live in the model's arenas (see [`crate::nn::ParamSlot`]).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::nn::{BatchNorm, ParamSlot};
use crate::ops::batchnorm::BufferRef;
use crate::ops::linear::{LinearOp, LinearTexels};
use crate::ops::sgd::{SgdFusion, SgdTexels};
use crate::record::Record;

/// A fully connected layer.
#[derive(Debug)]
pub struct Linear {
    gpu: Arc<Gpu>,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Where `weight [out, in]` lives in the arenas.
    pub weight: ParamSlot,
    /// Where `bias [out]` lives, when the layer has one.
    pub bias: Option<ParamSlot>,
    ops: HashMap<usize, LinearOp>,
    texels: LinearTexels,
}

impl Linear {
    /// A layer whose parameters occupy `weight` and `bias` in the model's arenas.
    pub fn new(
        gpu: &Arc<Gpu>,
        in_features: usize,
        out_features: usize,
        weight: ParamSlot,
        bias: Option<ParamSlot>,
    ) -> Self {
        Linear {
            gpu: gpu.clone(),
            in_features,
            out_features,
            weight,
            bias,
            ops: HashMap::new(),
            texels: LinearTexels::default(),
        }
    }

    /// Reads the operands `texels` mirrors through them ([`LinearTexels`]; none by default).
    pub fn set_texels(&mut self, texels: LinearTexels) {
        for op in self.ops.values_mut() {
            op.set_texels(texels.clone());
        }
        self.texels = texels;
    }

    fn op(&mut self, n: usize) -> Result<&LinearOp> {
        if !self.ops.contains_key(&n) {
            let mut op = LinearOp::new(&self.gpu, n, self.in_features, self.out_features)?;
            op.set_texels(self.texels.clone());
            self.ops.insert(n, op);
        }
        Ok(&self.ops[&n])
    }

    /// Which of x, W and dy this layer reads through texture mirrors over `n` rows
    /// ([`LinearOp::texel_reads`]).
    ///
    /// # Errors
    /// As [`LinearOp::new`].
    pub fn texel_reads(
        &mut self,
        n: usize,
        params: &wgpu::Buffer,
        x: BufferRef,
        dy: BufferRef,
    ) -> Result<[bool; 3]> {
        let w = self.weight.at(params);
        Ok(self.op(n)?.texel_reads(&x, &w, &dy))
    }

    /// Records the forward over `n` rows, parameters from `params`.
    ///
    /// # Errors
    /// As [`LinearOp::record_forward`].
    pub fn record_forward(
        &mut self,
        encoder: &mut impl Record,
        params: &wgpu::Buffer,
        x: BufferRef,
        y: BufferRef,
        n: usize,
    ) -> Result<()> {
        let (w, b) = (
            self.weight.at(params),
            self.bias.as_ref().map(|s| s.at(params)),
        );
        self.op(n)?.record_forward(encoder, x, w, b, y)
    }

    /// Records this layer's forward over `n` rows into `z` fused with the BatchNorm `bn` after it, whose
    /// output (through the sigmoid when `sigmoid`) goes to `y`: one dispatch where
    /// [`BatchNorm::record_linear_forward`] applies (`true`), nothing recorded where it does not
    /// (`false`; record the two layers apart).
    ///
    /// # Errors
    /// As [`BatchNorm::record_linear_forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_forward_with_bn(
        &mut self,
        encoder: &mut impl Record,
        params: &wgpu::Buffer,
        bn: &mut BatchNorm,
        x: BufferRef,
        z: BufferRef,
        y: BufferRef,
        n: usize,
        sigmoid: bool,
    ) -> Result<bool> {
        let (w, b) = (
            self.weight.at(params),
            self.bias.as_ref().map(|s| s.at(params)),
        );
        let op = self.op(n)?;
        bn.record_linear_forward(encoder, op, x, w, b, z, y, sigmoid)
    }

    /// Whether [`Self::record_forward_xent`] applies to `n` rows from `x` ([`LinearOp::can_fuse_xent`]).
    ///
    /// # Errors
    /// As [`LinearOp::new`] (a zero size).
    pub fn can_fuse_xent(&mut self, params: &wgpu::Buffer, x: BufferRef, n: usize) -> Result<bool> {
        let w = self.weight.at(params);
        Ok(self.op(n)?.can_fuse_xent(&x, &w))
    }

    /// This layer's forward over `n` rows into `logits` and softmax cross-entropy against `labels` in
    /// one dispatch ([`LinearOp::record_forward_xent`]).
    ///
    /// # Errors
    /// As [`LinearOp::record_forward_xent`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_forward_xent(
        &mut self,
        encoder: &mut impl Record,
        params: &wgpu::Buffer,
        x: BufferRef,
        logits: BufferRef,
        labels: BufferRef,
        dlogits: BufferRef,
        stats: BufferRef,
        n: usize,
    ) -> Result<()> {
        let (w, b) = (
            self.weight.at(params),
            self.bias.as_ref().map(|s| s.at(params)),
        );
        self.op(n)?
            .record_forward_xent(encoder, x, w, b, logits, labels, dlogits, stats)
    }

    /// This layer as a network's head over `n` rows in one dispatch ([`LinearOp::record_head_step`]): its
    /// forward from `x` (the output of the `bn → Sigmoid` before it) into `logits`, softmax
    /// cross-entropy against `labels` (`dlogits`, `stats`), and its backward through the sigmoid and
    /// `bn`: its gradients into `grads`, and the gradient at `bn`'s input `z` into `dz` (and `bn`'s own
    /// into its gradients). `Ok(false)`, with nothing recorded, where that kernel cannot take it (as
    /// [`Self::record_backward_through_sigmoid_bn`] refuses, or [`LinearOp::can_fuse_head_step`]).
    ///
    /// # Errors
    /// As [`LinearOp::record_head_step`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_head_step(
        &mut self,
        encoder: &mut impl Record,
        (params, grads): (&wgpu::Buffer, &wgpu::Buffer),
        bn: &BatchNorm,
        x: BufferRef,
        (logits, labels, dlogits, stats): (BufferRef, BufferRef, BufferRef, BufferRef),
        (z, dz): (BufferRef, BufferRef),
        n: usize,
    ) -> Result<bool> {
        let (w, b) = (
            self.weight.at(params),
            self.bias.as_ref().map(|s| s.at(params)),
        );
        let (dw, db) = (
            self.weight.at(grads),
            self.bias.as_ref().map(|s| s.at(grads)),
        );
        let in_features = self.in_features;
        let op = self.op(n)?;
        if bn.num_features() != in_features || !op.can_fuse_head_step(&x, &w) {
            return Ok(false);
        }
        let Some(parts) = bn.fused_backward_buffers(z, dz) else {
            return Ok(false);
        };
        op.record_head_step(
            encoder,
            x,
            w,
            b,
            logits,
            labels,
            dlogits,
            stats,
            (dw, db),
            &parts,
        )?;
        Ok(true)
    }

    /// Records the backward over `n` rows: gradients into `grads` (overwritten), and `dx` when given.
    ///
    /// # Errors
    /// As [`LinearOp::record_backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_backward(
        &mut self,
        encoder: &mut impl Record,
        params: &wgpu::Buffer,
        grads: &wgpu::Buffer,
        x: BufferRef,
        dy: BufferRef,
        dx: Option<BufferRef>,
        n: usize,
    ) -> Result<()> {
        self.backward(encoder, params, grads, x, dy, dx, n, false)
    }

    /// [`Self::record_backward`] without an input gradient, with SGD's update of the model's every
    /// parameter in the same dispatch ([`LinearOp::record_dw_with_sgd`]; `params` and `grads` are the
    /// arenas, `texels` their mirrors): `true` where it applies, `false`, recording nothing, elsewhere
    /// (this layer without bias, say).
    ///
    /// # Errors
    /// As [`LinearOp::record_dw_with_sgd`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_dw_with_sgd(
        &mut self,
        encoder: &mut impl Record,
        (params, grads): (&wgpu::Buffer, &wgpu::Buffer),
        x: BufferRef,
        dy: BufferRef,
        n: usize,
        texels: SgdTexels,
        sgd: &SgdFusion,
    ) -> Result<bool> {
        let Some(bias) = &self.bias else {
            return Ok(false);
        };
        let (dw, db) = (self.weight.at(grads), bias.at(grads));
        self.op(n)?
            .record_dw_with_sgd(encoder, x, dy, dw, db, (params, grads), texels, sgd)
    }

    /// [`Self::record_backward`] for a Linear whose input `x` is a sigmoid's output: `dz` receives the
    /// gradient of the sigmoid's input (the sigmoid's backward fused into the dx product).
    ///
    /// # Errors
    /// As [`LinearOp::record_backward_through_sigmoid`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_backward_through_sigmoid(
        &mut self,
        encoder: &mut impl Record,
        params: &wgpu::Buffer,
        grads: &wgpu::Buffer,
        x: BufferRef,
        dy: BufferRef,
        dz: BufferRef,
        n: usize,
    ) -> Result<()> {
        self.backward(encoder, params, grads, x, dy, Some(dz), n, true)
    }

    /// The backward of `bn → Sigmoid → this layer` over `n` rows in one dispatch
    /// ([`LinearOp::record_backward_through_sigmoid_bn`]): this layer's gradients into `grads`, and in
    /// place of the sigmoid's input gradient the BatchNorm's backward of it, into `dz` (its input
    /// gradient; `z` is its input, `s` the sigmoid's output and this layer's input). `true` where it
    /// applies ([`BatchNorm::fused_backward_buffers`], [`LinearOp::can_fuse_bn_backward`]); `false`,
    /// recording nothing, elsewhere.
    ///
    /// # Errors
    /// As [`LinearOp::record_backward_through_sigmoid_bn`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_backward_through_sigmoid_bn(
        &mut self,
        encoder: &mut impl Record,
        params: &wgpu::Buffer,
        grads: &wgpu::Buffer,
        bn: &BatchNorm,
        s: BufferRef,
        dy: BufferRef,
        z: BufferRef,
        dz: BufferRef,
        n: usize,
    ) -> Result<bool> {
        let w = self.weight.at(params);
        let dw = self.weight.at(grads);
        let db = self.bias.as_ref().map(|s| s.at(grads));
        let in_features = self.in_features;
        let op = self.op(n)?;
        if bn.num_features() != in_features || !op.can_fuse_bn_backward(&w, &s) {
            return Ok(false);
        }
        let Some(parts) = bn.fused_backward_buffers(z, dz) else {
            return Ok(false);
        };
        op.record_backward_through_sigmoid_bn(encoder, s, w, dy, dw, db, &parts)?;
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        encoder: &mut impl Record,
        params: &wgpu::Buffer,
        grads: &wgpu::Buffer,
        x: BufferRef,
        dy: BufferRef,
        dx: Option<BufferRef>,
        n: usize,
        through_sigmoid: bool,
    ) -> Result<()> {
        let w = self.weight.at(params);
        let dw = self.weight.at(grads);
        let db = self.bias.as_ref().map(|s| s.at(grads));
        let op = self.op(n)?;
        match (dx, through_sigmoid) {
            (Some(dz), true) => op.record_backward_through_sigmoid(encoder, x, w, dy, dz, dw, db),
            (dx, _) => op.record_backward(encoder, x, w, dy, dx, dw, db),
        }
    }
}
