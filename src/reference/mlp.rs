//! One training step of an MLP (`Linear → [BatchNorm1d] → Sigmoid` per hidden layer, a `Linear` head,
//! softmax cross-entropy, SGD with momentum) in f64, composed of the other reference ops. The whole-step
//! check of the GPU engine runs against this.

use crate::error::Result;
use crate::reference::{batchnorm, linear, sgd, sigmoid, softmax_xent};
use crate::tensor::Layout;

/// One hidden or output block's parameters and state.
#[derive(Clone, Debug)]
pub struct Block {
    /// Linear weight `[out, in]`.
    pub weight: Vec<f64>,
    /// Linear bias `[out]`.
    pub bias: Vec<f64>,
    /// BatchNorm `(weight, bias, running stats)` when the block has one (hidden blocks with BN).
    pub bn: Option<(Vec<f64>, Vec<f64>, batchnorm::RunningStats)>,
}

/// Momentum buffers, one per parameter, in the order weight, bias, [bn weight, bn bias] per block.
pub type Momentum = Vec<Vec<f64>>;

/// SGD hyperparameters for [`train_step`].
#[derive(Clone, Copy, Debug)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Nesterov.
    pub nesterov: bool,
}

/// One step on `x [n, sizes[0]]` with `labels`: returns the mean loss; updates `blocks` (parameters
/// and running statistics, BN momentum 0.1, eps 1e-5) and `momentum` in place.
///
/// # Errors
/// Shape errors from the BatchNorm reference.
pub fn train_step(
    blocks: &mut [Block],
    momentum: &mut Momentum,
    x: &[f64],
    labels: &[u32],
    opt: Sgd,
) -> Result<f64> {
    let n = labels.len();
    let last = blocks.len() - 1;
    // Per block: input, linear output, bn output, sigmoid output; kept for the backward.
    let mut inputs = Vec::new();
    let mut pre = Vec::new();
    let mut bn_out = Vec::new();
    let mut h = x.to_vec();
    for (b, block) in blocks.iter_mut().enumerate() {
        let (out_f, in_f) = (block.bias.len(), block.weight.len() / block.bias.len());
        let z = linear::forward(&h, &block.weight, Some(&block.bias), n, in_f, out_f);
        inputs.push(h);
        if b == last {
            h = z.clone();
            pre.push(z);
            bn_out.push(None);
            break;
        }
        let a = if let Some((w, bb, running)) = &mut block.bn {
            let f = batchnorm::forward(
                &z,
                &[n, out_f],
                Layout::Nc,
                Some(w),
                Some(bb),
                Some(running),
                true,
                Some(0.1),
                1e-5,
            )?;
            let y = f.y.clone();
            bn_out.push(Some(f));
            y
        } else {
            bn_out.push(None);
            z.clone()
        };
        pre.push(z);
        h = sigmoid::forward(&a);
    }
    let xent = softmax_xent::forward_backward(&h, labels, blocks[last].bias.len());
    let mut dy = xent.dlogits;
    let mut grads: Vec<Vec<Vec<f64>>> = vec![Vec::new(); blocks.len()];
    for b in (0..blocks.len()).rev() {
        let block = &blocks[b];
        let (out_f, in_f) = (block.bias.len(), block.weight.len() / block.bias.len());
        if b != last {
            // dy is w.r.t. this block's sigmoid output; the sigmoid output is the next block's input.
            let s = &inputs[b + 1];
            let mut da = sigmoid::backward(s, &dy);
            if let (Some((w, _, _)), Some(f)) = (&block.bn, &bn_out[b]) {
                let bw = batchnorm::backward(
                    &pre[b],
                    &da,
                    &[n, out_f],
                    Layout::Nc,
                    Some(w),
                    &f.mean,
                    &f.invstd,
                    true,
                )?;
                da = bw.dx;
                grads[b].push(bw.dweight);
                grads[b].push(bw.dbias);
            }
            dy = da;
        }
        let g = linear::backward(&inputs[b], &block.weight, &dy, n, in_f, out_f);
        grads[b].insert(0, g.dbias);
        grads[b].insert(0, g.dweight);
        dy = g.dx;
    }
    let mut k = 0;
    for (block, g) in blocks.iter_mut().zip(&grads) {
        let mut params: Vec<&mut Vec<f64>> = vec![&mut block.weight, &mut block.bias];
        if let Some((w, bb, _)) = &mut block.bn {
            params.push(w);
            params.push(bb);
        }
        for (p, gi) in params.into_iter().zip(g) {
            sgd::step(
                p,
                gi,
                &mut momentum[k],
                opt.lr,
                opt.momentum,
                opt.weight_decay,
                opt.nesterov,
            );
            k += 1;
        }
    }
    Ok(xent.loss)
}
