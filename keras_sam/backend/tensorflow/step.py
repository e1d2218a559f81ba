"""The SAM training step on the TensorFlow backend.

One step, for a batch B:

    pass 1   g = grad L_B(w)              clean weights; state (BatchNorm moving
                                          statistics, seeds) updates here, once
    e        = rho * g / ||g||_2          keras_sam.perturbation (any ball)
    pass 2   g_sam = grad L_B(w + e)      evaluated statelessly: w is never written
    update   w <- optimizer(w, g_sam)     at the original w

Pass 2 runs inside a `keras.StatelessScope` that maps every trainable variable
to the tensor w + e and every non-trainable variable to its value before
pass 1. The variables themselves are never assigned, so there is nothing to
restore: w comes back bit for bit, replicas cannot drift apart, and whatever
pass 2 writes (BatchNorm statistics, metric states, seed states) is dropped.
Pass 2 sees the same seeds as pass 1, so both passes draw the same dropout
masks: pass 2 evaluates the very same stochastic loss at w + e.

A non-finite ||g|| (NaN or inf anywhere in g) skips pass 2 and the update.
A constant rho = 0 is Keras's own step (no norm, no conditional: the graph
rewrites then round g as in Keras's, bit for bit), rolled back if it leaves
a non-finite weight.

The variants (keras_sam.variants) change two things only: how many batches
pass 2 sees (`num_batch_splits` cuts the batch into chunks, each with its own
e at the same w) and which gradient the update applies (GSAM, every-k,
LookSAM); both are decided here, the arithmetic is theirs. Momentum-SAM
(`direction="momentum"`) replaces both passes by one at w + e, with e from
the optimizer's first moment (`passes.momentum_pass`), and
`direction="random"` by one at a random w + e (`passes.random_pass`,
keras_sam.noise); what follows, the skip and the update, is the same.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf
from keras import ops

from keras_sam import _keras_compat, step, variants
from keras_sam.backend.tensorflow import gradients, passes, replicas
from keras_sam.perturbation import global_norm, perturbation


def train_step(sam, data):
    """One SAM step of `sam` (a `keras_sam.SAMModel`) on one batch."""
    _keras_compat.ensure_built(sam, data)
    sam.build_sam_state()
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer = sam.optimizer
    options = sam.options
    variables = list(sam.trainable_variables)
    step.check_trainable(sam, variables)
    perturbed_mask = sam.perturbed_mask(variables)
    # Layer state (BatchNorm statistics, seeds), not LookSAM's own buffers.
    own = ({id(v) for v in sam.looksam_state.weights}
           if sam.looksam_state is not None else set())
    state_variables = [v for v in sam.non_trainable_variables
                       if id(v) not in own]
    # State before pass 1 (seeds, moving statistics): pass 2 starts from it.
    state_before = [tf.identity(v.value) for v in state_variables]
    iteration = optimizer.iterations
    rho = options.rho_at(iteration)
    dense = sam.jit_compile is True or options.combines_gradients

    # Pass 1 at w: the loss, metrics and state updates that the logs report.
    # rho = 0 (a constant): e = 0 and g_sam = g, so the step is the base
    # optimizer's, taken from pass 1 alone.
    one_point = options.one_point and not options.off
    if one_point:
        # Momentum-SAM or a random e: the step's only pass, at w + e.
        climb = (passes.momentum_pass if options.momentum
                 else passes.random_pass)
        y_pred, loss, grads = climb(
            sam, x, y, sample_weight, rho, perturbed_mask, state_variables)
        chunks = []
    elif options.splits == 1:
        y_pred, loss, grads = passes.clean_pass(sam, x, y, sample_weight)
        chunks = [(x, y, sample_weight, grads, None)]
    else:
        y_pred, loss, grads, chunks = passes.clean_pass_in_chunks(
            sam, x, y, sample_weight, options.splits, state_variables,
            state_before)
    sam._loss_tracker.update_state(
        _keras_compat.unscale_loss_for_distribution(loss),
        sample_weight=passes.batch_size(x),
    )
    live = [i for i, g in enumerate(grads) if g is not None]
    live_variables = [variables[i] for i in live]
    if options.off and options.splits == 1 and not replicas.needs_merge_call():
        # rho = 0: Keras's own step. The gradient goes to the update and
        # nowhere else, as in Keras's train_step, so TensorFlow's graph
        # rewrites round it alike (a norm of it, or a conditional around the
        # update, made some graphs differ in the last bits). A step that
        # leaves a non-finite weight is rolled back (a LossScaleOptimizer
        # skips it itself), with the layer state pass 1 wrote.
        replicas.apply_or_roll_back(optimizer, [grads[i] for i in live],
                                    live_variables, state_variables,
                                    state_before)
        return sam.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    ascent_ids = [i for i in live if perturbed_mask[i]]
    if dense:
        grads = gradients.densify(grads)

    # Per chunk: e(w) from the perturbed variables' gradient, from this
    # replica's shard, or from the whole batch when synchronized.
    ascents, checks = [], []
    for _, _, _, chunk_grads, size in chunks:
        ascent = [chunk_grads[i] for i in ascent_ids]
        if sam.options.sync_perturbation:
            ascent = replicas.sum_over_replicas(ascent)
        rows = [gradients.rows(g, densify=dense) for g in ascent]
        norm = gradients.fused_norm([v for v, _ in rows])
        ascents.append((rows, norm))
        chunk_finite = tf.math.is_finite(norm)
        if size is not None:   # an empty chunk (batch < splits) is left out
            chunk_finite = tf.logical_or(chunk_finite, size == 0.0)
        checks.append(chunk_finite)
    rho_ok = step.rho_is_valid(rho)
    if rho_ok is not True:   # a schedule's value: skip the step if bad,
        checks.append(rho_ok)
        if not sam.jit_compile:   # and stop (XLA drops assertions)
            tf.debugging.Assert(rho_ok, [
                "keras_sam: `rho` must be finite and >= 0; the rho schedule "
                "returned, at iteration", iteration, "the value", rho,
                "; no weight was changed. Fix the schedule, e.g. clip it "
                "with keras.ops.maximum(schedule(t), 0.0)."])
    # Unperturbed variables (all of them with one pass) must have a
    # finite gradient too.
    others = [grads[i] for i in live
              if one_point or not perturbed_mask[i]]
    if others:
        checks.append(tf.math.is_finite(gradients.fused_norm(
            [getattr(g, "values", g) for g in others])))
    finite = replicas.all_replicas(functools.reduce(tf.logical_and, checks))
    sam_step = (False if options.off else True if options.sam_every == 1
                else variants.is_sam_step(iteration, options.sam_every))

    is_lso = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    looksam = options.looksam_alpha is not None
    stored = [sam._looksam_directions[i] for i in live] if looksam else []
    # On one replica g_v is written inside the SAM branch; several replicas
    # average theirs first, outside any conditional.
    average_directions = looksam and replicas.num_replicas() > 1

    def second_pass(chunk, rows, norm):
        """(L(w + e), g_sam) of one chunk, from the state pass 1 saw."""
        cx, cy, csw, _, _ = chunk
        values = [v for v, _ in rows]
        weights = None
        if options.adaptive:
            weights = [gradients.weight_rows(variables[i], idx)
                       for i, (_, idx) in zip(ascent_ids, rows)]
        eps = perturbation(values, rho, p=options.p, weights=weights,
                           eta=options.eta, grad_norm=norm)
        # Climb to w + e(w): one tensor per variable; the variables keep w.
        perturbed = [tf.identity(v.value) for v in variables]
        for i, (_, indices), e in zip(ascent_ids, rows, eps):
            w = perturbed[i]
            e = ops.cast(e, w.dtype)
            if indices is None:
                if e.shape != w.shape:
                    # A gradient whose static shape the graph lost, e.g.
                    # (None, 8) for a (1, 8) kernel: the scope wants w's.
                    e = tf.reshape(e, w.shape)
                perturbed[i] = w + e
            else:
                perturbed[i] = tf.tensor_scatter_nd_add(w, indices[:, None], e)
        _, perturbed_loss, sam_grads, _ = passes.stateless_pass(
            sam, perturbed, state_variables, state_before, cx, cy, csw,
            watch=live)
        if dense:
            sam_grads = gradients.densify(sam_grads)
        return ops.cast(perturbed_loss, "float32"), sam_grads

    def sam_update():
        """(L(w + e), the gradient to apply, LookSAM's new g_v)."""
        results = [second_pass(c, r, n) for c, (r, n) in zip(chunks, ascents)]
        perturbed_loss, direction, new_directions = step.combine(
            options, [grads[i] for i in live], results,
            [c[4] for c in chunks])
        if looksam and not average_directions:
            for v, new in zip(stored, new_directions):
                v.assign(ops.cast(new, v.dtype))
            sam.looksam_state.norm.assign(global_norm(new_directions))
            new_directions = []
        return perturbed_loss, direction, new_directions

    def old_directions():
        return [v.value for v in stored] if average_directions else []

    def one_pass_update():
        """No pass 2: the clean gradient, or LookSAM's g + stored g_v."""
        # ||g|| is the norm already taken when all of g is perturbed.
        known = (ascents[0][1] if len(ascent_ids) == len(live)
                 and len(chunks) == 1 and not sam.options.sync_perturbation
                 else None)
        direction = step.one_pass(
            options, [grads[i] for i in live], [v.value for v in stored],
            sam.looksam_state.norm if looksam else None, grad_norm=known)
        return tf.constant(float("nan")), direction, old_directions()

    def update_direction():
        if one_point:   # the gradient at w + e, already taken
            return tf.constant(float("nan")), [grads[i] for i in live], []
        if sam_step is True:
            return sam_update()
        if sam_step is False:
            return one_pass_update()
        return tf.cond(sam_step, sam_update, one_pass_update)

    def apply(direction):
        # w <- optimizer(w, d), at the original w.
        pairs = [(g, v) for g, v in zip(direction, live_variables)
                 if g is not None]
        optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])

    if replicas.needs_merge_call():
        # The update cannot sit inside a conditional in replica context
        # (MirroredStrategy synchronizes through `merge_call`): pass 2 always
        # runs, and the skip is decided in cross-replica context.
        perturbed_loss, direction, new_directions = update_direction()
        if is_lso:
            apply(replicas.agree_on_overflow(direction, finite))
        else:
            replicas.apply_if(finite, apply, direction)
        # A skipped step keeps the layer state from before pass 1.
        for v, old in zip(state_variables, state_before):
            v.assign(tf.where(finite, v.value, old))
    else:
        def perturbed_step():
            perturbed_loss, direction, new_directions = update_direction()
            apply(replicas.agree_on_overflow(direction) if is_lso
                  else direction)
            return perturbed_loss, new_directions

        def skipped_step():
            # Pass 1's state updates (BatchNorm statistics) undone.
            for v, old in zip(state_variables, state_before):
                v.assign(old)
            if is_lso:
                # Hand over a gradient marked non-finite on every replica
                # (some may have overflowed alone): the step is skipped
                # everywhere and the loss scale drops.
                apply(replicas.scale_first([grads[i] for i in live],
                                           float("nan")))
            return tf.constant(float("nan")), old_directions()

        # Pass 2 and the update share one branch, so the update compiles
        # exactly as in Keras's own train_step.
        perturbed_loss, new_directions = tf.cond(finite, perturbed_step,
                                                 skipped_step)

    took_sam_step = tf.logical_and(finite, sam_step)
    if average_directions:
        # g_v changes on SAM steps that were applied; replicas keep the mean
        # of their g_v, so that they all hold the same direction.
        new_directions = replicas.mean_over_replicas(new_directions)
        for v, new in zip(stored, new_directions):
            v.assign(tf.where(took_sam_step, ops.cast(new, v.dtype), v.value))
        norm = sam.looksam_state.norm
        norm.assign(tf.where(took_sam_step, global_norm(new_directions),
                             norm.value))

    # sharpness = L(w + e) - L(w), first order, from the two passes.
    sharpness = _keras_compat.unscale_loss_for_distribution(
        perturbed_loss - ops.cast(loss, "float32")
    )
    step.track_sharpness(sam._sharpness_tracker, sharpness, took_sam_step,
                         passes.batch_size(x))
    if ascents and sam._gradient_norm_tracker is not None:
        # ||g|| that e was taken from (chunks: their mean), for the watch.
        step.track_gradient_norm(
            sam._gradient_norm_tracker,
            step.unscaled(tf.add_n([n for _, n in ascents]) / len(ascents),
                          optimizer), finite)
    return sam.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
