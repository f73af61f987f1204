// head_step: a network's head forward, its softmax cross-entropy and its backward through the
// `BatchNorm -> Sigmoid` before it, in one dispatch of one subgroup, for CPU devices. The host builds
// one module from two: the backward pair of `shaders/linear_rows_bn.wgsl` and its dW product
// (`shaders/linear_pair.wgsl`'s `run_block` / `blocks` and `_2` names; dy = dlogits, which the dx
// product takes from the registers the loss kept them in, `head_dy_h`, and the dW product from storage),
// and `shaders/linear_dot_xent.wgsl` (`dot_xent`) with every name it declares at module scope suffixed
// `_h` and its bindings moved past the pair's. Then this entry point.
//
// Why one subgroup: on lavapipe each dispatch costs a wake-up of the workers and of the queue thread
// (40-90 us inside a step, ARCHITECTURE.md), and the head is small (60 x 100 x 10 for the MNIST MLP):
// two workers ran the head's pair in 0.103 ms (median, with their wake-ups) where one thread ran it in
// 0.073 and the head with the loss in 0.029. So the loss and the pair run one after the other here, and
// the pair's blocks in a loop instead of a grid.

@compute @workgroup_size(8)
fn head_step(@builtin(subgroup_invocation_id) lane: u32) {
    // logits, dlogits, the loss's statistics: the subgroup's lanes write dlogits by rows, and the
    // pair below reads them across lanes, hence the barrier.
    dot_xent_h(lane);
    storageBarrier();
    let first = blocks();
    let all = first + blocks_2();
    for (var blk = 0u; blk < all; blk++) {
        if (blk < first) {
            run_block(blk, lane);
        } else {
            run_block_2(blk - first, lane);
        }
    }
}
