// Counter-based random numbers shared by the stochastic kernels (dropout, noise): a draw is a pure
// function of (seed, step, stream, index), so a backward recomputes its forward's draws instead of storing
// them and the CPU references (src/reference/dropout.rs) reproduce them bit for bit. The host prepends this
// file to the kernel's own source.

// "lowbias32" (Chris Wellons' integer hash search): full avalanche with two multiplies.
fn mix32(v: u32) -> u32 {
    var h = v;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

// The key of one step of the stream rng = [seed low 32 bits, seed high 32 bits, step, unused].
fn step_key(seed_lo: u32, seed_hi: u32, step: u32) -> u32 {
    return mix32(seed_lo ^ mix32(seed_hi ^ mix32(step)));
}

// Uniform on [0, 1) in steps of 2^-24 (exact in f32), for value `i` of sub-stream `stream` (0 for kernels
// with one draw per value).
fn uniform01(key: u32, stream: u32, i: u32) -> f32 {
    let r = mix32(mix32(i) ^ key ^ stream);
    return f32(r >> 8u) * (1.0 / 16777216.0);
}
