//! The public API as users see it: linking as a backend (the caller's device, encoder and buffers),
//! the layer's PyTorch semantics over several steps, the pipeline cache, and one test per error.

mod common;

use std::sync::Arc;

use batchnorm::gpu::Gpu;
use batchnorm::nn::BatchNorm;
use batchnorm::ops::batchnorm::{
    BatchNormConfig, BatchNormOp, BufferRef, ForwardBuffers, PlanChoice,
};
use batchnorm::reference::batchnorm as reference;
use batchnorm::tensor::{Layout, Tensor};
use batchnorm::Error;
use common::*;

/// An outside program: its own instance, adapter, device, queue, one shared buffer holding x and y at
/// offsets, a parameter buffer holding weight/bias/running stats at offsets, and its own encoder and
/// submit. The op must record only: nothing runs until the caller submits.
#[test]
fn backend_api_on_callers_device_encoder_and_buffers() {
    let seed = seed();
    let mut rng = rng(seed);
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let instance = wgpu::Instance::new(desc);
    let adapter =
        pollster::block_on(instance.request_adapter(&Default::default())).expect("adapter");
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("caller's device"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .expect("device");

    let shape = [5usize, 3, 7, 4];
    let d = Layout::Nchw.dims(&shape).unwrap();
    let x = normal(&mut rng, d.numel(), 1.0, 3.0);
    let w = uniform(&mut rng, d.c, 0.5, 1.5);
    let b = uniform(&mut rng, d.c, -1.0, 1.0);
    let align = 256u64;
    let tensor_bytes = (d.numel() * 4) as u64;
    let x_off = align;
    let y_off = (x_off + tensor_bytes).div_ceil(align) * align;
    let total = y_off + tensor_bytes;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    let activations = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("caller activations"),
        size: total,
        usage,
        mapped_at_creation: false,
    });
    let poison = vec![f32::NAN; (total / 4) as usize];
    queue.write_buffer(&activations, 0, bytemuck::cast_slice(&poison));
    queue.write_buffer(&activations, x_off, bytemuck::cast_slice(&x));
    // weight, bias, running_mean, running_var, saved (2C), each at a 256-byte slot.
    let params = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("caller params"),
        size: 6 * align,
        usage,
        mapped_at_creation: false,
    });
    queue.write_buffer(&params, 0, bytemuck::cast_slice(&w));
    queue.write_buffer(&params, align, bytemuck::cast_slice(&b));
    queue.write_buffer(&params, 2 * align, bytemuck::cast_slice(&vec![0.0f32; d.c]));
    queue.write_buffer(&params, 3 * align, bytemuck::cast_slice(&vec![1.0f32; d.c]));

    let gpu = Arc::new(Gpu::from_device(device.clone(), queue.clone()));
    let op = BatchNormOp::new(
        &gpu,
        &shape,
        Layout::Nchw,
        BatchNormConfig::default(),
        PlanChoice::Auto,
    )
    .unwrap();
    let at = |offset| BufferRef {
        buffer: &params,
        offset,
    };
    let bufs = ForwardBuffers {
        x: BufferRef {
            buffer: &activations,
            offset: x_off,
        },
        y: BufferRef {
            buffer: &activations,
            offset: y_off,
        },
        weight: Some(at(0)),
        bias: Some(at(align)),
        running_mean: Some(at(2 * align)),
        running_var: Some(at(3 * align)),
        saved: at(4 * align),
    };
    let mut encoder = device.create_command_encoder(&Default::default());
    op.record_forward_train(&mut encoder, &bufs, Some(0.1))
        .unwrap();
    // Nothing may have run yet: y is still poisoned.
    let before: Vec<f32> = gpu.download(&activations, y_off, d.numel()).unwrap();
    assert!(
        before.iter().all(|v| v.is_nan()),
        "the op ran before the caller submitted"
    );
    queue.submit([encoder.finish()]);
    let y: Vec<f32> = gpu.download(&activations, y_off, d.numel()).unwrap();
    let xs: Vec<f32> = gpu.download(&activations, x_off, d.numel()).unwrap();
    assert_eq!(xs, x, "x was modified");
    let mut running = reference::RunningStats::new(d.c);
    let r = reference::forward(
        &f64s(&x),
        &shape,
        Layout::Nchw,
        Some(&f64s(&w)),
        Some(&f64s(&b)),
        Some(&mut running),
        true,
        Some(0.1),
        1e-5,
    )
    .unwrap();
    assert!(
        max_rel_err(&y, &r.y) <= 1e-4,
        "seed={seed}: y error {}",
        max_rel_err(&y, &r.y)
    );
    let rv: Vec<f32> = gpu.download(&params, 3 * align, d.c).unwrap();
    assert!(
        max_rel_err(&rv, &running.var) <= 1e-4,
        "seed={seed}: running_var"
    );
    // The caller's guard of its own bytes: the padding before x is untouched (still NaN).
    let pad: Vec<f32> = gpu.download(&activations, 0, (x_off / 4) as usize).unwrap();
    assert!(
        pad.iter().all(|v| v.is_nan()),
        "wrote outside the given regions"
    );
}

/// PyTorch's semantics over steps: momentum=None is the cumulative average over num_batches_tracked;
/// eval uses the running statistics; track_running_stats=false uses batch statistics in eval and counts
/// nothing.
#[test]
fn layer_semantics_over_several_steps() {
    let seed = seed();
    let mut rng = rng(seed);
    let gpu = gpu();
    let shape = [6usize, 4, 3, 5];
    let d = Layout::Nchw.dims(&shape).unwrap();
    for momentum in [Some(0.1f32), Some(0.5), None] {
        let config = BatchNormConfig {
            momentum,
            ..Default::default()
        };
        let mut bn = BatchNorm::new(&gpu, d.c, config).unwrap();
        let mut running = reference::RunningStats::new(d.c);
        for _ in 0..3 {
            let x = normal(&mut rng, d.numel(), 2.0, 1.5);
            let xt = Tensor::from_f32(&gpu, &shape, &x).unwrap();
            bn.forward(&xt, Layout::Nchw).unwrap();
            reference::forward(
                &f64s(&x),
                &shape,
                Layout::Nchw,
                None,
                None,
                Some(&mut running),
                true,
                momentum.map(|m| m as f64),
                1e-5,
            )
            .unwrap();
        }
        assert_eq!(bn.num_batches_tracked, 3);
        let rm = bn.read(bn.running_mean.as_ref().unwrap()).unwrap();
        let rv = bn.read(bn.running_var.as_ref().unwrap()).unwrap();
        assert!(
            max_rel_err(&rm, &running.mean) <= 1e-5,
            "seed={seed} {momentum:?} running_mean"
        );
        assert!(
            max_rel_err(&rv, &running.var) <= 1e-5,
            "seed={seed} {momentum:?} running_var"
        );
        // Eval: running statistics, nothing updated.
        bn.train(false);
        let x = normal(&mut rng, d.numel(), 0.0, 1.0);
        let y = bn
            .forward(&Tensor::from_f32(&gpu, &shape, &x).unwrap(), Layout::Nchw)
            .unwrap();
        let r = reference::forward(
            &f64s(&x),
            &shape,
            Layout::Nchw,
            None,
            None,
            Some(&mut running.clone()),
            false,
            None,
            1e-5,
        )
        .unwrap();
        assert!(
            max_rel_err(&y.to_f32().unwrap(), &r.y) <= 1e-4,
            "seed={seed} eval y"
        );
        assert_eq!(bn.num_batches_tracked, 3);
    }
    let config = BatchNormConfig {
        track_running_stats: false,
        ..Default::default()
    };
    let mut bn = BatchNorm::new(&gpu, d.c, config).unwrap();
    bn.train(false);
    let x = normal(&mut rng, d.numel(), 3.0, 2.0);
    let y = bn
        .forward(&Tensor::from_f32(&gpu, &shape, &x).unwrap(), Layout::Nchw)
        .unwrap();
    let r = reference::forward(
        &f64s(&x),
        &shape,
        Layout::Nchw,
        None,
        None,
        None,
        false,
        None,
        1e-5,
    )
    .unwrap();
    assert!(
        max_rel_err(&y.to_f32().unwrap(), &r.y) <= 1e-4,
        "seed={seed} untracked eval"
    );
    assert_eq!(bn.num_batches_tracked, 0);
    assert!(bn.running_mean.is_none());
}

/// State-dict keys are PyTorch's.
#[test]
fn state_dict_names() {
    let gpu = gpu();
    let bn = BatchNorm::new(&gpu, 3, Default::default()).unwrap();
    let names: Vec<String> = bn
        .state_dict("1.")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        names,
        ["1.weight", "1.bias", "1.running_mean", "1.running_var"]
    );
    let sd = bn.state_dict("").unwrap();
    assert_eq!(sd[0].1, vec![1.0; 3]);
    assert_eq!(sd[3].1, vec![1.0; 3]);
}

/// Building the same plan twice compiles nothing new (a private device, so other tests don't interfere).
#[test]
fn pipelines_are_built_once() {
    let gpu = Arc::new(Gpu::new().unwrap());
    let mut bn = BatchNorm::new(&gpu, 4, Default::default()).unwrap();
    let x = Tensor::filled(&gpu, &[3, 4, 5], 1.5).unwrap();
    bn.forward(&x, Layout::Nchw).unwrap();
    let built = gpu.pipelines_built();
    assert!(built > 0);
    let mut bn2 = BatchNorm::new(&gpu, 4, Default::default()).unwrap();
    bn2.forward(&x, Layout::Nchw).unwrap();
    bn.forward(&x, Layout::Nchw).unwrap();
    assert_eq!(gpu.pipelines_built(), built);
}

#[test]
fn error_shape_mismatch() {
    let gpu = gpu();
    let mut bn = BatchNorm::new(&gpu, 4, Default::default()).unwrap();
    let x = Tensor::filled(&gpu, &[2, 5, 3], 0.0).unwrap();
    let e = bn.forward(&x, Layout::Nchw).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("num_features"), "{e}");
    // A buffer too small for the shape.
    let op = BatchNormOp::new(
        &gpu,
        &[2, 4, 3],
        Layout::Nchw,
        Default::default(),
        PlanChoice::Auto,
    )
    .unwrap();
    let small = gpu.upload("x", &[0.0f32; 5]).unwrap();
    let big = gpu.upload("y", &[0.0f32; 64]).unwrap();
    let e = op
        .record_forward_train(
            &mut gpu.encoder("t"),
            &ForwardBuffers {
                x: (&small).into(),
                y: (&big).into(),
                weight: Some((&big).into()),
                bias: Some((&big).into()),
                running_mean: None,
                running_var: None,
                saved: (&big).into(),
            },
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    // PyTorch's BatchNorm2d takes 4-D input only.
    let mut bn2d = BatchNorm::new_2d(&gpu, 4, Default::default()).unwrap();
    let x3 = Tensor::filled(&gpu, &[2, 4, 3], 0.0).unwrap();
    let e = bn2d.forward(&x3, Layout::Nchw).unwrap_err();
    assert!(e.to_string().contains("4D input"), "{e}");
    let mut bn1d = BatchNorm::new_1d(&gpu, 4, Default::default()).unwrap();
    bn1d.forward(&x3, Layout::Nchw).unwrap();
    let e = Layout::Nc.dims(&[2, 3, 4]).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}

/// PyTorch 2.15's eps rule in the layer: eps = 0 builds, runs in eval (with the running statistics), and
/// is refused in training and without running statistics ("eps must be positive during training").
#[test]
fn eps_zero_only_in_eval() {
    let gpu = gpu();
    let x = Tensor::from_f32(&gpu, &[4, 3, 2, 2], &[0.25f32; 48]).unwrap();
    let zero = BatchNormConfig {
        eps: 0.0,
        ..Default::default()
    };
    let mut bn = BatchNorm::new(&gpu, 3, zero).unwrap();
    let e = bn.forward(&x, Layout::Nchw).unwrap_err();
    assert!(
        matches!(e, Error::BadConfig(_)) && e.to_string().contains("eps must be > 0"),
        "{e}"
    );
    bn.train(false);
    // Running statistics (0, 1): y = x exactly.
    let y = bn.forward(&x, Layout::Nchw).unwrap().to_f32().unwrap();
    assert!(y.iter().all(|&v| v == 0.25), "{y:?}");
    let mut untracked = BatchNorm::new(
        &gpu,
        3,
        BatchNormConfig {
            track_running_stats: false,
            ..zero
        },
    )
    .unwrap();
    untracked.train(false);
    assert!(matches!(
        untracked.forward(&x, Layout::Nchw),
        Err(Error::BadConfig(_))
    ));
}

#[test]
fn error_bad_config() {
    let gpu = gpu();
    for config in [
        BatchNormConfig {
            eps: -1e-5,
            ..Default::default()
        },
        BatchNormConfig {
            eps: f32::NAN,
            ..Default::default()
        },
        BatchNormConfig {
            eps: f32::INFINITY,
            ..Default::default()
        },
        BatchNormConfig {
            momentum: Some(f32::NAN),
            ..Default::default()
        },
    ] {
        let e = BatchNorm::new(&gpu, 3, config).unwrap_err();
        assert!(matches!(e, Error::BadConfig(_)), "{e}");
    }
    let e = Layout::parse("NWHC").unwrap_err();
    assert!(e.to_string().contains("unknown layout"), "{e}");
    // In-place is refused, not silently wrong.
    let op = BatchNormOp::new(
        &gpu,
        &[2, 4],
        Layout::Nc,
        Default::default(),
        PlanChoice::Auto,
    )
    .unwrap();
    let buf = gpu.upload("x", &[0.0f32; 64]).unwrap();
    let e = op
        .record_forward_train(
            &mut gpu.encoder("t"),
            &ForwardBuffers {
                x: (&buf).into(),
                y: (&buf).into(),
                weight: Some((&buf).into()),
                bias: Some((&buf).into()),
                running_mean: None,
                running_var: None,
                saved: (&buf).into(),
            },
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::BadConfig(_)), "{e}");
    // Backward before forward.
    let mut bn = BatchNorm::new(&gpu, 4, Default::default()).unwrap();
    let x = Tensor::filled(&gpu, &[2, 4], 1.0).unwrap();
    let e = bn.backward(&x, &x, Layout::Nc).unwrap_err();
    assert!(matches!(e, Error::BadConfig(_)), "{e}");
}

#[test]
fn error_one_value_per_channel() {
    let gpu = gpu();
    for (shape, layout) in [
        (&[1usize, 3][..], Layout::Nc),
        (&[1, 3, 1, 1][..], Layout::Nchw),
    ] {
        let mut bn = BatchNorm::new(&gpu, 3, Default::default()).unwrap();
        let x = Tensor::filled(&gpu, shape, 1.0).unwrap();
        let e = bn.forward(&x, layout).unwrap_err();
        assert!(matches!(e, Error::OneValuePerChannel { .. }), "{e}");
        assert!(
            e.to_string().contains("more than 1 value per channel"),
            "{e}"
        );
        // Eval with running statistics is fine with one value.
        bn.train(false);
        bn.forward(&x, layout).unwrap();
    }
}

#[test]
fn error_limit_exceeded() {
    let gpu = gpu();
    // More elements than 32-bit indexing covers: refused at planning, nothing allocated.
    let e = BatchNormOp::new(
        &gpu,
        &[1 << 16, 2, 1 << 16],
        Layout::Nchw,
        Default::default(),
        PlanChoice::Auto,
    )
    .unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { .. }), "{e}");
    let e = gpu
        .create_buffer(
            "too big",
            gpu.limits().max_buffer_size + 4,
            batchnorm::gpu::storage_usage(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { .. }), "{e}");
    // One sample larger than a storage binding cannot be chunked by samples.
    let binding = gpu.limits().max_storage_buffer_binding_size as usize;
    let e = BatchNormOp::new(
        &gpu,
        &[2, 1, binding / 4 + 1024],
        Layout::Nchw,
        Default::default(),
        PlanChoice::Auto,
    )
    .unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { .. }), "{e}");
    // The fused plan cannot take a chunked tensor.
    let e = BatchNormOp::new(
        &gpu,
        &[40, 1, binding / 32],
        Layout::Nchw,
        Default::default(),
        PlanChoice::Fused,
    )
    .unwrap_err();
    assert!(matches!(e, Error::BadConfig(_)), "{e}");
    // The per-channel coefficients (16 bytes a channel) and the partial statistics (16 bytes a channel
    // and part) are bound whole: 40 000 channels do not fit a 512 KiB binding (the tensor itself would
    // be chunked). Before the check: a validation error at the first dispatch, reported as a lost device.
    let small = Arc::new(
        Gpu::with_limits(|l| l.max_storage_buffer_binding_size = 512 << 10).expect("device"),
    );
    for fuse_relu in [false, true] {
        let e = BatchNormOp::with_options(
            &small,
            &[4, 40_000],
            Layout::Nc,
            Default::default(),
            PlanChoice::Auto,
            batchnorm::ops::batchnorm::OpOptions {
                fuse_relu,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::LimitExceeded { limit: 524_288, .. })
                && e.to_string().contains("in one storage binding"),
            "{e}"
        );
    }
    // 4 000 channels fit, and the layer normalizes them (chunked: x is 2.4 bindings).
    let seed = seed();
    let shape = [80usize, 4_000];
    let x = normal(&mut rng(seed), 80 * 4_000, 1.0, 2.0);
    let mut bn = BatchNorm::new(&small, 4_000, BatchNormConfig::default()).unwrap();
    let y = bn
        .forward(&Tensor::from_f32(&small, &shape, &x).unwrap(), Layout::Nc)
        .unwrap();
    let want = reference::forward(
        &f64s(&x),
        &shape,
        Layout::Nc,
        None,
        None,
        None,
        true,
        Some(0.1),
        1e-5,
    )
    .unwrap();
    let err = max_rel_err(&y.to_f32().unwrap(), &want.y);
    assert!(err <= 1e-5, "y error {err} (seed {seed})");
}

#[test]
fn error_device_lost() {
    let gpu = Arc::new(Gpu::new().unwrap());
    let mut bn = BatchNorm::new(&gpu, 2, Default::default()).unwrap();
    let x = Tensor::filled(&gpu, &[3, 2], 1.0).unwrap();
    gpu.device.destroy();
    let e = bn.forward(&x, Layout::Nc).unwrap_err();
    assert!(matches!(e, Error::DeviceLost(_)), "{e}");
}

/// The dispatch profile: one timed entry per dispatch recorded while it is on, labelled by op or entry
/// point, none after it ends; errors for a missing profile and a zero capacity.
#[test]
fn dispatch_profile_times_each_dispatch() {
    // A device of its own: a profile takes a slot for every dispatch recorded on its Gpu, and the other
    // tests of this file dispatch on the shared one in parallel.
    let gpu = Arc::new(Gpu::new().unwrap());
    if !gpu
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    {
        let err = gpu.start_dispatch_profile(8).unwrap_err();
        assert!(matches!(err, Error::BadConfig(_)), "{err}");
        return;
    }
    assert!(matches!(
        gpu.finish_dispatch_profile(),
        Err(Error::BadConfig(_))
    ));
    assert!(matches!(
        gpu.start_dispatch_profile(0),
        Err(Error::BadConfig(_))
    ));
    let (n, c) = (16usize, 5usize);
    let mut rng = rng(seed());
    let x = Tensor::from_f32(&gpu, &[n, c], &normal(&mut rng, n * c, 0.0, 1.0)).unwrap();
    let mut bn = BatchNorm::new(&gpu, c, BatchNormConfig::default()).unwrap();
    gpu.start_dispatch_profile(1).unwrap();
    // Two forwards; the profile holds one dispatch, the rest run untimed.
    let _ = bn.forward(&x, Layout::Nc).unwrap();
    let _ = bn.forward(&x, Layout::Nc).unwrap();
    let times = gpu.finish_dispatch_profile().unwrap();
    assert_eq!(times.len(), 1, "{times:?}");
    assert!(times[0].label.starts_with("batchnorm "), "{times:?}");
    assert!(times[0].ms >= 0.0 && times[0].ms < 10_000.0, "{times:?}");
    assert!(gpu.finish_dispatch_profile().is_err(), "the profile ended");
}

/// `BatchNorm::use_arena`: gamma and beta move into the given ranges of a model's arenas (their values
/// with them), the layer reads and writes them there, and bad requests are typed errors.
#[test]
fn batchnorm_parameters_in_an_arena() {
    let gpu = gpu();
    let c = 5usize;
    let usage = batchnorm::gpu::storage_usage();
    let params = gpu.create_buffer("params", 4096, usage).unwrap();
    let grads = gpu.create_buffer("grads", 4096, usage).unwrap();
    let align = gpu.limits().min_storage_buffer_offset_alignment as u64;

    let mut plain = BatchNorm::new(
        &gpu,
        c,
        BatchNormConfig {
            affine: false,
            ..Default::default()
        },
    )
    .unwrap();
    let err = plain.use_arena(&params, &grads, 0, 256).unwrap_err();
    assert!(matches!(err, Error::BadConfig(_)), "{err}");

    let mut bn = BatchNorm::new(&gpu, c, BatchNormConfig::default()).unwrap();
    if align > 1 {
        let err = bn.use_arena(&params, &grads, 1, 256).unwrap_err();
        assert!(err.to_string().contains("multiple of"), "{err}");
    }
    let err = bn.use_arena(&params, &grads, 0, 4096).unwrap_err();
    assert!(matches!(err, Error::BadConfig(_)), "{err}");
    bn.use_arena(&params, &grads, 0, 256).unwrap();
    assert!(bn.weight.is_none() && bn.dweight.is_none());
    assert_eq!(bn.weight_values().unwrap(), Some(vec![1.0; c]));
    assert_eq!(bn.bias_values().unwrap(), Some(vec![0.0; c]));
    let arena: Vec<f32> = gpu.download(&params, 256, c).unwrap();
    assert_eq!(arena, vec![0.0; c], "beta at its offset");

    // A forward and backward read gamma from the arena and write the gradients there.
    let n = 8;
    let mut rng = rng(seed());
    let x = Tensor::from_f32(&gpu, &[n, c], &normal(&mut rng, n * c, 0.0, 1.0)).unwrap();
    gpu.queue
        .write_buffer(&params, 0, bytemuck::cast_slice(&vec![2.0f32; c]));
    let y = bn.forward(&x, Layout::Nc).unwrap().to_f32().unwrap();
    let mean_abs = y.iter().map(|v| v.abs() as f64).sum::<f64>() / y.len() as f64;
    assert!(
        mean_abs > 1.2,
        "gamma 2 from the arena scales y: {mean_abs}"
    );
    let dy = Tensor::from_f32(&gpu, &[n, c], &vec![1.0; n * c]).unwrap();
    let _ = bn.backward(&x, &dy, Layout::Nc).unwrap();
    let (dw, db) = bn.grad_values().unwrap().unwrap();
    let db_arena: Vec<f32> = gpu.download(&grads, 256, c).unwrap();
    assert_eq!(db, db_arena);
    assert!(db.iter().all(|&v| (v - n as f32).abs() < 1e-4), "{db:?}");
    assert!(dw.iter().all(|v| v.abs() < 1e-3), "{dw:?}");
}
