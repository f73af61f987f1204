//! The subcommands of the `batchnorm` binary.

pub mod demo;
pub mod experiment;
pub mod info;
pub mod parity;
pub mod train;
