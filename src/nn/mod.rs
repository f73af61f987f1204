//! Layers: parameters, gradients and running state, with PyTorch's names and defaults.

pub mod batchnorm;
pub mod conv2d;
pub mod init;
pub mod linear;
pub mod sequential;
pub mod sigmoid;

pub use batchnorm::BatchNorm;
pub use conv2d::{Conv2d, Conv2dConfig};
pub use init::Init;
pub use linear::Linear;
pub use sequential::{Layer, MlpConfig, NamedTensor, ParamSlot, Sequential, StateDict};
pub use sigmoid::Sigmoid;
