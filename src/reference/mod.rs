//! f64 CPU implementations of every GPU op, with the same names and semantics. Public, so users can check
//! the engine (and their own code) against them. Slow and simple on purpose: these are the definitions.

pub mod adam;
pub mod add;
pub mod batchnorm;
pub mod batchnorm_fused;
pub mod bn_variants;
pub mod cnn;
pub mod conv2d;
pub mod dropout;
pub mod linear;
pub mod mlp;
pub mod noise;
pub mod pool;
pub mod probe;
pub mod relu;
pub mod sgd;
pub mod sigmoid;
pub mod softmax_xent;
