//! Weight initializers. Biases start at zero under every scheme.

use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How a layer's weights are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, std²): the "small random Gaussian" of Ioffe & Szegedy's MNIST experiment (the paper gives no
    /// scale; `batchnorm train` uses std 0.1 and says so).
    Gaussian {
        /// Standard deviation.
        std: f32,
    },
    /// Kaiming/He normal, N(0, 2 / fan_in) (for ReLU networks).
    Kaiming,
    /// Xavier/Glorot uniform, U(±sqrt(6 / (fan_in + fan_out))) (for sigmoid/tanh networks).
    Xavier,
}

impl Init {
    /// Parses `gaussian` (std 0.1), `gaussian:STD`, `kaiming` or `xavier`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for any other text or a bad std.
    pub fn parse(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "gaussian" => return Ok(Init::Gaussian { std: 0.1 }),
            "kaiming" => return Ok(Init::Kaiming),
            "xavier" => return Ok(Init::Xavier),
            _ => {}
        }
        if let Some(std) = lower.strip_prefix("gaussian:") {
            if let Ok(std) = std.parse::<f32>() {
                if std.is_finite() && std > 0.0 {
                    return Ok(Init::Gaussian { std });
                }
            }
        }
        Err(Error::config(format!(
            "unknown init '{s}': expected gaussian, gaussian:STD (STD > 0), kaiming or xavier"
        )))
    }

    /// A `[rows, fan_in]` weight matrix drawn with `rng`, with PyTorch's fans: a Linear's `fan_in` is
    /// in_features and `fan_out` out_features (= rows); a Conv2d's `fan_in` is in·kh·kw and `fan_out`
    /// out·kh·kw (not its `rows` = out: `xavier_uniform_` counts the receptive field on both sides).
    pub fn weight(
        self,
        rng: &mut impl Rng,
        rows: usize,
        fan_in: usize,
        fan_out: usize,
    ) -> Vec<f32> {
        let n = rows * fan_in;
        match self {
            Init::Gaussian { std } => normal(rng, n, std as f64),
            Init::Kaiming => normal(rng, n, (2.0 / fan_in as f64).sqrt()),
            Init::Xavier => {
                let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
                (0..n).map(|_| rng.random_range(-a..a) as f32).collect()
            }
        }
    }
}

/// `n` samples of N(0, std²) by Box–Muller (keeps `rand_distr` out of the dependencies).
pub fn normal(rng: &mut impl Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            let u2: f64 = rng.random();
            (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// The generator every initializer in a model draws from, seeded.
pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}
