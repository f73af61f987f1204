// Float tests on the bits, prepended by the host to the kernels that need PyTorch's answers for NaN, -0 and
// infinities (pool, relu, dropout, softmax_xent, linear_dot_xent, linear_dot_bn, the BatchNorm kernels): Vulkan lets a
// compiler assume floats are never NaN, and would then be free to drop `v != v` or turn a float
// compare-and-select into a max (which on lavapipe gave 0 for a NaN).

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

// v < 0 for v's bits b: the sign bit set, and not -0 or a NaN (0x80000001 ..= 0xff800000, -inf included).
fn below_zero(b: u32) -> bool {
    return b > 0x80000000u && b <= 0xff800000u;
}

fn is_nan4(v: vec4<f32>) -> vec4<bool> {
    return (bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu)) > vec4<u32>(0x7f800000u);
}

// v, or 0 where v is not finite: a shift that keeps an infinity's sum an infinity (batchnorm_common.wgsl).
fn finite_or_zero4(v: vec4<f32>) -> vec4<f32> {
    let exponent = bitcast<vec4<u32>>(v) & vec4<u32>(0x7f800000u);
    return select(v, vec4<f32>(0.0), exponent == vec4<u32>(0x7f800000u));
}

fn finite_or_zero1(v: f32) -> f32 {
    return select(v, 0.0, !is_finite(v));
}

// v where ok, else a NaN (built from `ok` so that no NaN constant reaches the shader compiler, which
// rejects one).
fn or_nan(v: f32, ok: bool) -> f32 {
    return select(bitcast<f32>(0x7fc00000u | u32(ok)), v, ok);
}
