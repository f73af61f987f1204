//! The crate's one error type. Every fallible call returns `Result<_, batchnorm::Error>`; bad input is
//! reported here with a message that names the input and, where there is one, the fix. Nothing panics on
//! user input.

/// Everything that can go wrong in `batchnorm`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter (GPU or CPU driver) could be found.
    #[error(
        "no GPU adapter found{detail}: install a GPU driver with Vulkan, Metal or DX12 support, or the CPU \
         Vulkan driver on Debian/Ubuntu with `apt-get install mesa-vulkan-drivers`; WGPU_BACKEND and \
         WGPU_ADAPTER_NAME narrow the choice"
    )]
    NoAdapter {
        /// What was asked for (backend or adapter name), for the message.
        detail: String,
    },

    /// The adapter refused to create a device.
    #[error("could not create a device on adapter '{adapter}': {reason}")]
    DeviceRequest {
        /// Adapter name.
        adapter: String,
        /// The driver's reason.
        reason: String,
    },

    /// Two shapes that must agree do not.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which tensor or argument.
        what: String,
        /// What was expected.
        expected: String,
        /// What was given.
        got: String,
    },

    /// A configuration value is out of range or inconsistent.
    #[error("bad configuration: {0}")]
    BadConfig(String),

    /// Batch statistics were asked for over a single value per channel (PyTorch's error, same wording).
    #[error(
        "Expected more than 1 value per channel when training, got input size {shape:?} \
         ({count} value per channel)"
    )]
    OneValuePerChannel {
        /// The input's shape as given.
        shape: Vec<usize>,
        /// Values per channel (N times the spatial size).
        count: usize,
    },

    /// A tensor or buffer exceeds what the device can hold or bind.
    #[error("device limit exceeded: {what} needs {needed} but the device allows {limit}")]
    LimitExceeded {
        /// What hit the limit.
        what: String,
        /// What was needed.
        needed: u64,
        /// The device's limit.
        limit: u64,
    },

    /// The device ran out of memory.
    #[error("device out of memory: {0}")]
    OutOfMemory(String),

    /// The device was lost (driver reset, removal) or a command failed validation.
    #[error("device lost or failed: {0}")]
    DeviceLost(String),

    /// Training produced a NaN or infinite loss; the message names the step and the checkpoint kept.
    #[error("training diverged: {0}")]
    Diverged(String),

    /// A tensor file (safetensors, dataset) could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Shorthand for results in this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A [`Error::BadConfig`] from anything printable.
    pub fn config(msg: impl Into<String>) -> Self {
        Error::BadConfig(msg.into())
    }

    /// A [`Error::File`] for `path`.
    pub fn file(path: impl AsRef<std::path::Path>, reason: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.as_ref().display().to_string(),
            reason: reason.to_string(),
        }
    }
}
