//! Dropout in f64 with the GPU's own mask: the same counter-based hash of (seed, step, index) as
//! `shaders/hash.wgsl` + `shaders/dropout.wgsl`, so a GPU run can be checked value for value.

/// The shader's 32-bit mixing function ("lowbias32").
pub fn mix32(v: u32) -> u32 {
    let mut h = v;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The key of `step` of the stream `seed` (the shader's `step_key`).
pub fn step_key(seed: u64, step: u32) -> u32 {
    mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ mix32(step)))
}

/// The shader's `uniform01`: value `i` of sub-stream `stream` under `key`, uniform on [0, 1) in steps of
/// 2⁻²⁴.
pub fn uniform01(key: u32, stream: u32, i: u32) -> f64 {
    let r = mix32(mix32(i) ^ key ^ stream);
    (r >> 8) as f64 / 16_777_216.0
}

/// Whether value `i` is kept at `step` of the stream `seed` with drop probability `p`.
pub fn kept(seed: u64, step: u32, i: u32, p: f32) -> bool {
    uniform01(step_key(seed, step), 0, i) >= p as f64
}

/// The multiplier of each of `len` values: `1/(1 − p)` where kept, 0 where dropped (all 0 when `p = 1`).
pub fn mask(seed: u64, step: u32, len: usize, p: f32) -> Vec<f64> {
    let scale = if p >= 1.0 {
        0.0
    } else {
        1.0 / (1.0 - p as f64)
    };
    (0..len)
        .map(|i| {
            if kept(seed, step, i as u32, p) {
                scale
            } else {
                0.0
            }
        })
        .collect()
}

/// `y = x · mask`.
pub fn forward(x: &[f64], mask: &[f64]) -> Vec<f64> {
    x.iter().zip(mask).map(|(a, m)| a * m).collect()
}

/// `dx = dy · mask`.
pub fn backward(dy: &[f64], mask: &[f64]) -> Vec<f64> {
    forward(dy, mask)
}
