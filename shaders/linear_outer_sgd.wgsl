// matmul_outer_sgd: a network's first Linear's dW = dy^T x and db (shaders/linear_outer.wgsl with A along
// M, 32-row blocks: shaders/linear_outer_m32.wgsl) with SGD's update of every parameter of the model in the
// same dispatch (LinearOp::record_dw_with_sgd in src/ops/linear.rs): on lavapipe a dispatch costs 40-90 us
// beside its work, and this one replaces SGD's own. The host appends shaders/sgd.wgsl renamed into bindings
// 4-9 (every module-scope name suffixed _2: `sgd_apply_2`, `load_grad_2`, `hyper_2`, `LEN_2`, its units
// vec4s, each operand read from its texture mirror) and prepends `W_UNIT0` and `B_UNIT0` (W's and b's
// first vec4 units in the arenas: W at 0, b after it past the arena's alignment padding), `REST_UNIT0`
// (the first unit past W: the padding, then every unit but b's, which the blocks share) and
// `REST_PER_BLOCK`. Every update goes through `sgd_apply_2`, the function SGD's own kernel calls, so the
// parameters, momentum and gradients are those of the backward followed by SGD to the bit.

// db, as vec4s (4 divides M, the Linear's out_features).
@group(0) @binding(3) var<storage, read_write> bias: array<vec4<f32>>;

// The hyperparameters' texel, fetched once per invocation at the entry point.
var<private> sgd_hyper: vec4<u32>;

// outer_rowsum's store (linear_outer.wgsl); the entry point below stores db a quad at a time instead.
fn store_bias(j: u32, v: f32) {
    bias[j / 4u][j % 4u] = v;
}

// Each quad of dW as it is stored (flat index i in C = W's layout): its gradient is final, so W's unit
// is updated from it here, and the quad stored as computed.
fn epilogue4(i: u32, v: vec4<f32>) -> vec4<f32> {
    sgd_apply_2(W_UNIT0 + i / 4u, v, sgd_hyper);
    return v;
}

// Each block computes its tile of dW (updating W as it stores); the blocks of the first column block also
// store db from their row sums and update b; and every block then updates its share of the arena's other
// units, whose gradients the backward's earlier dispatches wrote, its 8 lanes on consecutive units. No block
// returns early or branches on its kind: lavapipe runs both sides of a branch under a mask.
@compute @workgroup_size(8)
fn matmul_outer_sgd(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk < outer_blocks()) {
        sgd_hyper = textureLoad(hyper_2, vec2<u32>(0u), 0);
        let rs = product_block(blk, lane, true);
        // Lane l holds the row sums of rows m0 + 4l .. + 3 (A along M): db's quad j / 4.
        let j = (blk / OUT_COL_BLOCKS) * OUT_ROWS + 4u * lane;
        if (blk % OUT_COL_BLOCKS == 0u && j < M) {
            bias[j / 4u] = rs;
            sgd_apply_2(B_UNIT0 + j / 4u, rs, sgd_hyper);
        }
        let first = REST_UNIT0 + blk * REST_PER_BLOCK;
        let end = min(first + REST_PER_BLOCK, LEN_2);
        for (var i = first + lane; i < end; i += 8u) {
            // b's units were updated above, from their row sums.
            if (i < B_UNIT0 || i >= B_UNIT0 + M / 4u) {
                sgd_apply_2(i, load_grad_2(i), sgd_hyper);
            }
        }
    }
}
