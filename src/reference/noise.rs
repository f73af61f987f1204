//! Santurkar et al.'s noisy-BatchNorm perturbation in f64 with the GPU's own draws (the hash of
//! `shaders/hash.wgsl` + `shaders/noise.wgsl`): `y = x·s + m`, `dx = dy·s`, so a GPU run is checked value
//! for value.

use crate::ops::noise::NoiseConfig;
use crate::reference::dropout::{step_key, uniform01};

/// Sub-stream constants, as in the shader.
const UNIT_SCALE: u32 = 0x9e37_79b9;
const UNIT_SHIFT: u32 = 0x85eb_ca6b;
const VALUE_SCALE: u32 = 0xc2b2_ae35;
const VALUE_SHIFT: u32 = 0x27d4_eb2f;

fn centered(key: u32, stream: u32, i: u32) -> f64 {
    2.0 * uniform01(key, stream, i) - 1.0
}

/// The per-unit centre of the scale and of the shift at `step`: `(1 + scale_range·c, shift_range·c′)`.
pub fn unit_params(seed: u64, step: u32, unit: u32, config: &NoiseConfig) -> (f64, f64) {
    let key = step_key(seed, step);
    (
        1.0 + config.scale_range as f64 * centered(key, UNIT_SCALE, unit),
        config.shift_range as f64 * centered(key, UNIT_SHIFT, unit),
    )
}

/// The scale `s` and shift `m` of each of `len` values at `step` of stream `seed`; value i belongs to unit
/// `(i / inner) % units`.
pub fn draws(
    seed: u64,
    step: u32,
    len: usize,
    units: usize,
    inner: usize,
    config: &NoiseConfig,
) -> (Vec<f64>, Vec<f64>) {
    let key = step_key(seed, step);
    (0..len as u32)
        .map(|i| {
            let unit = (i / inner as u32) % units as u32;
            let (scale, shift) = unit_params(seed, step, unit, config);
            (
                scale + config.scale_jitter as f64 * centered(key, VALUE_SCALE, i),
                shift + config.shift_jitter as f64 * centered(key, VALUE_SHIFT, i),
            )
        })
        .unzip()
}

/// `y = x·s + m`.
pub fn forward(x: &[f64], scale: &[f64], shift: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(scale.iter().zip(shift))
        .map(|(v, (s, m))| v * s + m)
        .collect()
}

/// `dx = dy·s` (the derivative of `x·s + m` in x).
pub fn backward(dy: &[f64], scale: &[f64]) -> Vec<f64> {
    dy.iter().zip(scale).map(|(g, s)| g * s).collect()
}
