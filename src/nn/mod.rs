//! Layers: parameters, gradients and running state, with PyTorch's names and defaults.

pub mod batchnorm;

pub use batchnorm::BatchNorm;
