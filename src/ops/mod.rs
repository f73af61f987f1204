//! GPU ops. Each records into a caller's `wgpu::CommandEncoder` on buffers it is given and owns nothing
//! but its plan (pipelines, parameters, scratch).

pub mod adam;
pub mod add;
pub mod batchnorm;
pub mod bn_variants;
pub mod conv2d;
pub mod dropout;
pub(crate) mod kernel;
pub mod linear;
pub mod noise;
pub mod pool;
pub mod probe;
pub mod relu;
pub mod sgd;
pub mod sigmoid;
pub mod softmax_xent;

/// Texture mirrors of read-only operands (lavapipe gathers texels without its per-lane loop).
pub use kernel::{texel_buffer_bytes, Texels, TEXTURE_ROW_TEXELS};
