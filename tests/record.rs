//! `OnePass` (every op's dispatches in one compute pass) against the same work recorded on a bare
//! command encoder (a pass per op): the same kernels in the same order, so the results must be equal to
//! the bit. The models include layers that need the encoder between their dispatches (ghost BatchNorm's
//! and Batch Renorm's buffer copies), so the shared pass must end and reopen around them.

mod common;

use batchnorm::gpu::Gpu;
use batchnorm::nn::{CnnConfig, Layer, MlpConfig, ModelConfig};
use batchnorm::ops::bn_variants::Renorm;
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::record::{OnePass, Record};
use batchnorm::train::Trainer;
use common::*;

/// Gives the model's first BatchNorm ghost batches of 4 and its last one Batch Renorm.
fn add_variants(t: &mut Trainer) {
    let bns: Vec<usize> = (0..t.model.layers.len())
        .filter(|&i| matches!(t.model.layers[i], Layer::BatchNorm { .. }))
        .collect();
    assert!(bns.len() >= 2, "the model has two BatchNorms to vary");
    if let Layer::BatchNorm { bn, .. } = &mut t.model.layers[bns[0]] {
        bn.set_virtual_batch_size(Some(4)).unwrap();
    }
    if let Layer::BatchNorm { bn, .. } = &mut t.model.layers[*bns.last().unwrap()] {
        bn.set_renorm(Some(Renorm {
            rmax: 1.5,
            dmax: 0.5,
        }))
        .unwrap();
    }
}

/// Forward, backward (from a given output gradient) and SGD update of `steps` batches, recorded into
/// `rec`'s kind of target; the final state dict, gradient arena and output, and the passes opened in the
/// last step when recorded through `OnePass`.
struct Run {
    state: Vec<Vec<f32>>,
    grads: Vec<f32>,
    output: Vec<f32>,
    passes: Option<usize>,
    /// SGD read the gradients through a texture (CPU devices): its copy ends the pass once more.
    grads_texels: bool,
    /// Copies into the Linears' textures (CPU devices) that ended the pass: each backward's of dy,
    /// each forward's of x but the first layer's (no pass is open yet).
    texel_copies: usize,
}

fn run(
    gpu: &std::sync::Arc<Gpu>,
    config: &ModelConfig,
    variants: bool,
    one_pass: bool,
    batches: &[(Vec<f32>, Vec<f32>)],
    n: usize,
) -> Run {
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        nesterov: true,
    };
    let mut t = Trainer::new(gpu, config, sgd, n).unwrap();
    if variants {
        add_variants(&mut t);
    }
    t.model.train(true);
    let mut passes = None;
    for (x, dy) in batches {
        gpu.queue
            .write_buffer(t.model.input(), 0, bytemuck::cast_slice(x));
        gpu.queue
            .write_buffer(t.model.output_grad(), 0, bytemuck::cast_slice(dy));
        let mut encoder = gpu.encoder("record test");
        fn step(t: &mut Trainer, rec: &mut impl Record, n: usize) {
            t.model.record_forward(rec, n).unwrap();
            t.model.record_backward(rec, n).unwrap();
            t.optim.record_step(rec, &t.model).unwrap();
        }
        if one_pass {
            let mut rec = OnePass::new(&mut encoder);
            step(&mut t, &mut rec, n);
            passes = Some(rec.passes());
        } else {
            step(&mut t, &mut encoder, n);
        }
        gpu.queue.submit([encoder.finish()]);
    }
    let sd = t.model.state_dict().unwrap();
    let arena = t.model.arena_len();
    Run {
        state: sd.tensors.into_iter().map(|(_, _, v)| v).collect(),
        grads: gpu.download::<f32>(&t.model.grads, 0, arena).unwrap(),
        output: gpu
            .download::<f32>(t.model.output(), 0, n * t.model.out_features())
            .unwrap(),
        passes,
        grads_texels: t.model.grads_texels().is_some(),
        texel_copies: {
            let layers = &t.model.layers;
            let linear = |l: &&Layer| matches!(l, Layer::Linear(_));
            let dy = layers.iter().filter(linear).count();
            let x = (1..layers.len())
                .filter(|&i| matches!(&layers[i], Layer::Linear(l) if l.in_features % 4 == 0))
                .count();
            usize::from(t.model.dy_texels()) * dy + usize::from(t.model.x_texels()) * x
        },
    }
}

fn one_pass_equals_a_pass_per_op(config: ModelConfig, n: usize, variants: bool) {
    let seed = seed();
    let gpu = gpu();
    let mut config = config;
    config.set_seed(seed);
    let probe = Trainer::new(&gpu, &config, SgdConfig::default(), n).unwrap();
    let (inputs, outputs) = (
        n * probe.model.in_features(),
        n * probe.model.out_features(),
    );
    let mut r = rng(seed);
    let batches: Vec<_> = (0..3)
        .map(|_| {
            (
                normal(&mut r, inputs, 0.0, 1.0),
                normal(&mut r, outputs, 0.0, 0.1),
            )
        })
        .collect();
    let what = format!("{} variants={variants} (seed {seed})", config.name());
    let each = run(&gpu, &config, variants, false, &batches, n);
    let one = run(&gpu, &config, variants, true, &batches, n);
    assert_eq!(one.output, each.output, "{what}: output");
    assert_eq!(one.grads, each.grads, "{what}: gradients");
    assert_eq!(one.state, each.state, "{what}: parameters and buffers");
    assert!(
        each.output.iter().all(|v| v.is_finite()) && each.output.iter().any(|&v| v != 0.0),
        "{what}: the runs computed something"
    );
    let passes = one.passes.unwrap();
    // On CPU devices SGD's copy of the gradients into their texture ends the pass before the update,
    // and so do the Linears' copies of dy before their backwards and of x before their forwards.
    let base = 1 + usize::from(one.grads_texels) + one.texel_copies;
    if variants {
        // Ghost BN copies its sub-batches in and out and Batch Renorm snapshots the running statistics:
        // each copy ends the pass.
        assert!(passes > base, "{what}: {passes} passes around the copies");
    } else {
        assert_eq!(
            passes, base,
            "{what}: a step without copies is one pass (and one more after each texture's copy)"
        );
    }
}

#[test]
fn mlp_step_in_one_pass() {
    one_pass_equals_a_pass_per_op(MlpConfig::ioffe(true, 0).into(), 12, false);
    one_pass_equals_a_pass_per_op(MlpConfig::ioffe(false, 0).into(), 7, false);
}

#[test]
fn mlp_step_with_copies_in_one_pass() {
    one_pass_equals_a_pass_per_op(MlpConfig::ioffe(true, 0).into(), 12, true);
}

#[test]
fn cnn_step_in_one_pass() {
    one_pass_equals_a_pass_per_op(CnnConfig::small(true, 0).into(), 4, false);
    one_pass_equals_a_pass_per_op(CnnConfig::small(true, 0).into(), 8, true);
}
