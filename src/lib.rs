//! # batchnorm
//!
//! Batch normalization on the GPU: WGSL compute kernels on wgpu with PyTorch's `nn.BatchNorm*d`
//! semantics, an f64 CPU reference for every op, and a host layer that other programs link as a GPU
//! backend (their `wgpu::Device`, `Queue`, buffers and command encoder).
//!
//! The data's path: [`gpu`] (device) -> [`tensor`] (buffers with a shape and layout) -> [`ops`] (kernels
//! recorded into an encoder) -> [`nn`] (layers with parameters and running state). [`reference`](mod@reference) holds the
//! f64 definitions every kernel is tested against.
//!
//! ```no_run
//! use std::sync::Arc;
//! use batchnorm::{gpu::Gpu, nn::BatchNorm, tensor::{Layout, Tensor}};
//! # fn main() -> batchnorm::Result<()> {
//! let gpu = Arc::new(Gpu::new()?);
//! let mut bn = BatchNorm::new(&gpu, 16, Default::default())?;
//! let x = Tensor::from_f32(&gpu, &[8, 16, 4, 4], &vec![1.0; 8 * 16 * 16])?;
//! let y = bn.forward(&x, Layout::Nchw)?;
//! println!("{:?}", &y.to_f32()?[..4]);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod bench;
pub mod data;
pub mod error;
pub mod experiment;
pub mod gpu;
pub mod io;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod record;
pub mod reference;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
