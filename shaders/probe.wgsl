// Measurements on flat f32 vectors that live on the GPU (a model's parameter and gradient arenas), so an
// experiment reads back four numbers instead of two whole vectors. The host prepends `const LEN: u32`.
//
// axpy:       out[i] = a[i] + alpha * b[i]           (a step along a direction: params - eta * grad)
// diff_stats: out = [sum (a-b)^2, sum a*b, sum a^2, sum b^2]
//             (||G - G'||, cos(G, G') and the norms, from one pass)

struct Scalar {
    alpha: f32,
}

@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> scalar: Scalar;

@compute @workgroup_size(256)
fn axpy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    out[i] = a[i] + scalar.alpha * b[i];
}

const WG: u32 = 256u;
var<workgroup> partial: array<vec4<f32>, WG>;

// One workgroup: the vectors are parameter-sized (1e4..1e7 values), read once; a single group avoids a
// second pass and any cross-workgroup merge. Each invocation sums a strided slice (adjacent invocations
// on adjacent addresses), then a tree in workgroup memory; f32 sums of squares are accurate to ~1e-6
// relative here, far below what the experiments resolve.
@compute @workgroup_size(256)
fn diff_stats(@builtin(local_invocation_index) lid: u32) {
    var acc = vec4<f32>(0.0);
    for (var i = lid; i < LEN; i += WG) {
        let x = a[i];
        let y = b[i];
        let d = x - y;
        acc += vec4<f32>(d * d, x * y, x * x, y * y);
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[0] = partial[0].x;
        out[1] = partial[0].y;
        out[2] = partial[0].z;
        out[3] = partial[0].w;
    }
}
