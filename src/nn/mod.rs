//! Layers: parameters, gradients and running state, with PyTorch's names and defaults.

pub mod batchnorm;
pub mod conv2d;
pub mod dropout;
pub mod fold;
pub mod init;
pub mod linear;
pub mod noise;
pub mod pool;
pub mod precise;
pub mod relu;
pub mod sequential;
pub mod sigmoid;

pub use batchnorm::BatchNorm;
pub use conv2d::{Conv2d, Conv2dConfig};
pub use dropout::Dropout;
pub use init::Init;
pub use linear::Linear;
pub use noise::Noise;
pub use pool::Pool2d;
pub use relu::Relu;
pub use sequential::{
    CnnConfig, Layer, LayerSpec, MlpConfig, ModelConfig, NamedTensor, ParamSlot, Sequential,
    StateDict,
};
pub use sigmoid::Sigmoid;
