//! Where ops record their work: straight into a `wgpu::CommandEncoder`, or through a [`OnePass`] over
//! one.
//!
//! Every `record_*` method in [`crate::ops`], [`crate::nn`] and [`crate::optim`] takes
//! `&mut impl Record`, so a caller's own `&mut wgpu::CommandEncoder` works as it is: each op then
//! records its dispatches in a compute pass of its own, as a caller would expect from a library that
//! shares their encoder. A [`OnePass`] instead keeps one compute pass open across ops, so that a whole
//! training step is one pass, and ends it only when an op needs the encoder itself (a buffer copy or
//! clear), opening a new one at the next dispatch.
//!
//! Why: wgpu records each compute pass as its own command buffer (with the pass's barriers in one
//! more), and lavapipe pays for each of them. Measured with `examples/dispatch_probe.rs` on this
//! machine's lavapipe: 19 dependent one-workgroup dispatches took 0.99–1.02 ms in one pass and
//! 1.92–2.15 ms in a pass each (2 worker threads); 0.16 against 0.54 ms with `LP_NUM_THREADS=0`.
//! Order is unchanged: wgpu puts the same barriers between the dispatches of one pass as between
//! passes (each dispatch is its own usage scope), so a read-after-write across ops stays ordered.

/// A recording target for ops: a compute pass to dispatch in, and the encoder for everything else.
pub trait Record {
    /// Runs `f` with a compute pass to record dispatches in. On a bare encoder the pass is opened for
    /// `f` and ended after it; on a [`OnePass`] it is the shared pass (opened if none is).
    fn with_pass<T>(&mut self, label: &str, f: impl FnOnce(&mut wgpu::ComputePass<'_>) -> T) -> T;

    /// The encoder, for copies and clears: a [`OnePass`] ends its open pass first (a pass locks its
    /// encoder), so the copy lands between the dispatches recorded before and after it.
    fn encoder(&mut self) -> &mut wgpu::CommandEncoder;
}

impl Record for wgpu::CommandEncoder {
    fn with_pass<T>(&mut self, label: &str, f: impl FnOnce(&mut wgpu::ComputePass<'_>) -> T) -> T {
        let mut pass = self.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: None,
        });
        f(&mut pass)
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self
    }
}

/// Records every op's dispatches into one compute pass of `encoder`, until something needs the encoder
/// ([`Record::encoder`]); the pass ends when this is dropped (or [`OnePass::finish`]ed), after which the
/// encoder can be finished and submitted.
///
/// ```no_run
/// # fn main() -> batchnorm::Result<()> {
/// # let gpu = std::sync::Arc::new(batchnorm::gpu::Gpu::new()?);
/// # let mut trainer = batchnorm::train::Trainer::new(&gpu, &batchnorm::nn::MlpConfig::ioffe(true, 0),
/// #     batchnorm::ops::sgd::SgdConfig::default(), 60)?;
/// use batchnorm::record::OnePass;
/// let mut encoder = gpu.encoder("step");
/// {
///     let mut rec = OnePass::new(&mut encoder);
///     trainer.model.record_forward(&mut rec, 60)?;
///     trainer.model.record_backward(&mut rec, 60)?;
/// } // the pass ends here
/// gpu.queue.submit([encoder.finish()]);
/// # Ok(()) }
/// ```
pub struct OnePass<'e> {
    encoder: &'e mut wgpu::CommandEncoder,
    // 'static through `forget_lifetime`: the pass cannot borrow `encoder` beside the field that holds
    // it; wgpu keeps the encoder locked while the pass lives instead, and `encoder()` ends it first.
    pass: Option<wgpu::ComputePass<'static>>,
    passes: usize,
    per_op: bool,
}

impl<'e> OnePass<'e> {
    /// Starts recording into `encoder`; no pass is opened until the first dispatch.
    pub fn new(encoder: &'e mut wgpu::CommandEncoder) -> Self {
        OnePass {
            encoder,
            pass: None,
            passes: 0,
            per_op: false,
        }
    }

    /// The same recorder, but with a pass per op, as on a bare encoder: for dispatch profiles
    /// ([`crate::gpu::Gpu::start_dispatch_profile`]), whose timestamp pairs each bracket their
    /// dispatch's own device time only between passes on lavapipe (inside one shared pass the pairs
    /// overlap the neighbouring dispatches, and together they slowed the step down by a quarter).
    pub fn pass_per_op(encoder: &'e mut wgpu::CommandEncoder) -> Self {
        OnePass {
            per_op: true,
            ..OnePass::new(encoder)
        }
    }

    /// Ends the open pass, if any; the same as dropping this.
    pub fn finish(self) {}

    /// Compute passes opened so far: 1 for a step that never needed the encoder in between.
    pub fn passes(&self) -> usize {
        self.passes
    }
}

impl Record for OnePass<'_> {
    fn with_pass<T>(&mut self, _label: &str, f: impl FnOnce(&mut wgpu::ComputePass<'_>) -> T) -> T {
        let pass = match &mut self.pass {
            Some(pass) => pass,
            none => {
                self.passes += 1;
                none.insert(
                    self.encoder
                        .begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some("one pass"),
                            timestamp_writes: None,
                        })
                        .forget_lifetime(),
                )
            }
        };
        let out = f(pass);
        if self.per_op {
            self.pass = None;
        }
        out
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder
    }
}
