"""Numba kernels for the proximal operator of the Lovász hinge (docs/design.md, the prox).

Every kernel works on one segment (one image, or the whole batch) in margin space: with
y = ±1 the label sign, m0 = 1 − y·F are the hinge margins of the input logits F and the prox
solves min_m Δ̄_J(relu(m)) + ‖m − m0‖² / (2λ). Pixels with m0 ≤ 0 keep their value, so a
kernel only touches V+ = {valid pixels with m0 > 0}; Δ_J of a set of a foreground and b
background pixels of V+ is φ(a, b) = (a + b) / (n_fg + b), where n_fg counts *every*
foreground pixel of the segment.

Two kernels, both writing the prox logits, the direction (F − prox) / λ and two loss values
per segment. The direction is built from each pixel's shift per unit of λ, never as a
difference of F and the prox: that difference keeps only the digits of F that λ moves, none
at all once λ is below the logits' resolution.

- :func:`_prox_exact_rows`: projection onto the base polytope, then clipping at 0. The
  foreground and background margins are sorted; one merge of the two lists by their
  would-be prox values, with adjacent violators pooled, gives a candidate that a check of
  each pooled group certifies (:func:`_merge_and_pool`, :func:`_certify_groups`: linear
  time). Where the check fails, the divide and conquer (docs/design.md) solves the segment
  (:func:`_solve_block`, ~log2 P sweeps per pixel).
- :func:`_prox_greedy_rows`: the paper's greedy minimization path (Appendix C).

Both run on the worker threads of :mod:`lovasz_kernels._numba_core` (kernels compiled
``nogil``, threads that block when idle): rows over threads when there are several, or, for
one large row, its steps split in two (the two label lists sorted at once, the merge beside
the prefix sums, the certificate and the writes in halves). The sort of the margins and the
Jaccard increments are the backend's (:mod:`lovasz_kernels._numba_core`).

This module imports without numba; :data:`NUMBA_AVAILABLE` says whether the kernels exist.
fastmath stays off everywhere: the exact prox is tested to 1e-9 against a certificate, and
reassociating the running sums of the sweep would move the split decisions.
"""

from __future__ import annotations

import threading

import numpy as np

from lovasz_kernels import _numba_core as core
from lovasz_kernels._numba_core import (  # NUMBA_*: what prox.py reports when numba is missing
    NUMBA_AVAILABLE,  # noqa: F401
    NUMBA_IMPORT_ERROR,  # noqa: F401
    RADIX_MIN_KEYS,
    SORT_LSD,
    fetch_add,
    jaccard_increment,
    njit,
    sort_keys,
)
from lovasz_kernels._scratch import scratch

# blocks of the recursive splitting up to this many pixels first try one merge
# (:func:`_merge_and_pool`)
MERGE_LIMIT = 128
# Rows of at least this many pixels have their steps split across threads (when there are
# fewer rows than threads); smaller ones run whole on one thread.
SPLIT_MIN_PIXELS = 1 << 15
# Segments of at least this many pixels sort with the radix sort measured fastest here.
SORT_CHOICE_MIN_PIXELS = 1 << 16


@njit(cache=True)
def _jaccard_delta(a1, b1, a2, b2, n_fg):
    """φ(a2, b2) − φ(a1, b1) for nested sets, φ(a, b) = (a + b) / (n_fg + b), φ(0, 0) = 0.

    The numerator is formed in exact integer arithmetic (no cancellation of two close
    ratios), then divided once.
    """
    if a2 + b2 == 0:
        return 0.0
    if a1 + b1 == 0:
        return (a2 + b2) / (n_fg + b2)
    numerator = (a2 + b2) * (n_fg + b1) - (a1 + b1) * (n_fg + b2)
    return numerator / ((n_fg + b2) * (n_fg + b1))

@njit(cache=True)
def _take_wide(workspace, start, count, example):
    """``count`` 8-byte items (the type of ``example``: float64 or int64) carved from the
    float64 ``workspace`` at slot ``start``; returns (view, next free slot)."""
    view = workspace[start:start + count]
    if isinstance(example, np.float64):
        return view, start + count
    return view.view(np.int64), start + count

@njit(cache=True)
def _take_narrow(workspace, start, count, example):
    """``count`` 4-byte items (float32 or uint32, the type of ``example``) carved from the
    float64 ``workspace`` at slot ``start``; returns (view, next free slot)."""
    slots = (count + 1) // 2
    view = workspace[start:start + slots]
    if isinstance(example, np.float32):
        return view.view(np.float32)[:count], start + slots
    return view.view(np.uint32)[:count], start + slots

@njit(cache=True)
def workspace_slots(num_pixels):
    """float64 slots of workspace the kernels need for rows of ``num_pixels`` = P
    pixels: the label lists 2 P, the sorted lists 2 P (their radix sorts borrow 2 P past
    them), the levels P, the shifts P and the exact prox's arrays 10 P. The kernels check
    it: a slice past the end would silently come out short."""
    return 16 * num_pixels + 64

@njit(cache=True)
def _sort_margins(margins32, positions, count, logits, sign, z, order, workspace, method):
    """Sort one label's V+ pixels by decreasing margin into ``z`` (float64 margins) and
    ``order`` (their positions in the row); tied margins come out by pixel index.

    Sorts values, not indices (docs/design.md, performance model): each pixel is one uint64
    key, the complement of the float32 bits of its margin (positive floats order like their
    bits) above its position,
    sorted by the backend's sort (:func:`lovasz_kernels._numba_core.sort_keys`, ``method``).
    float32 rounding can merge distinct float64 margins: runs of equal margins are re-sorted
    by the float64 values afterwards (stable, so ties stay in pixel order). ``sign`` is y: the
    margin of pixel i is 1 − y·logits[i]. ``workspace`` (float64, 2 · count + 4 slots) holds
    the sort's keys and buffer.
    """
    bits = margins32[:count].view(np.uint32)
    keys = workspace[:count].view(np.uint64)
    buffer = workspace[count:2 * count].view(np.uint64)
    for k in range(count):
        keys[k] = ((np.uint64(0xFFFFFFFF) - np.uint64(bits[k])) << np.uint64(32)) | np.uint64(
            positions[k])
    sorted_keys = sort_keys(keys, buffer, count, RADIX_MIN_KEYS, method)
    for k in range(count):
        position = np.int64(sorted_keys[k] & np.uint64(0xFFFFFFFF))
        z[k] = 1.0 - sign * np.float64(logits[position])
        order[k] = position
    start = 0
    while start < count:
        margin_bits = sorted_keys[start] >> np.uint64(32)
        stop = start + 1
        while stop < count and (sorted_keys[stop] >> np.uint64(32)) == margin_bits:
            stop += 1
        if stop - start > 1:
            ordered = True  # usually the float64 margins are equal too: no re-sort
            for k in range(start + 1, stop):
                if z[k] > z[k - 1]:
                    ordered = False
                    break
            if not ordered:
                run = np.argsort(-z[start:stop], kind="mergesort")
                z[start:stop] = z[start:stop][run]
                order[start:stop] = order[start:stop][run]
        start = stop


@njit(cache=True)
def _label_lists(logits, labels, ignore_label, has_ignore, workspace):
    """The V+ pixels of a row split by label, unsorted: (n_fg, n_pos, n_neg).

    ``logits`` one row (float32 or float64), ``labels`` its labels: a pixel is valid unless
    ``has_ignore`` and its label is ``ignore_label``, foreground when its label is 1. Margins
    (float32) and positions of the foreground (resp. background) pixels with m0 > 0 go to the
    lists of :func:`_list_views`. One pass without branches on the pixel (fg and the sign of
    the margin are unpredictable): each pixel is written to both lists and only the list it
    belongs to moves on.
    """
    count = logits.shape[0]
    margins_pos, positions_pos, margins_neg, positions_neg, _ = _unsorted_views(workspace, count)
    n_fg = 0
    n_pos = 0
    n_neg = 0
    for i in range(count):
        label = labels[i]
        valid = not (has_ignore and label == ignore_label)
        is_fg = valid and label == 1
        score = np.float64(logits[i])
        margin = 1.0 - score if is_fg else 1.0 + score
        margin32 = np.float32(margin)
        margins_pos[n_pos] = margin32
        positions_pos[n_pos] = i
        margins_neg[n_neg] = margin32
        positions_neg[n_neg] = i
        kept = valid and margin > 0.0
        n_fg += np.int64(is_fg)
        n_pos += np.int64(kept and is_fg)
        n_neg += np.int64(kept and not is_fg)
    return n_fg, n_pos, n_neg


@njit(cache=True)
def _unsorted_views(workspace, count):
    """The unsorted lists of :func:`_label_lists` for a row of ``count`` pixels: (margins_pos,
    positions_pos, margins_neg, positions_neg, next free slot)."""
    margins_pos, free = _take_narrow(workspace, 0, count, np.float32(0))
    positions_pos, free = _take_narrow(workspace, free, count, np.uint32(0))
    margins_neg, free = _take_narrow(workspace, free, count, np.float32(0))
    positions_neg, free = _take_narrow(workspace, free, count, np.uint32(0))
    return margins_pos, positions_pos, margins_neg, positions_neg, free


@njit(cache=True)
def _sorted_views(workspace, count, n_pos, n_neg):
    """(z_pos, idx_pos, z_neg, idx_neg, sort_pos, sort_neg, free): the sorted lists after the
    unsorted ones, then the two sorts' scratch (free again once they are done: ``free`` is
    the first slot after the lists)."""
    _, _, _, _, free = _unsorted_views(workspace, count)
    z_pos, free = _take_wide(workspace, free, n_pos, np.float64(0))
    idx_pos, free = _take_wide(workspace, free, n_pos, np.int64(0))
    z_neg, free = _take_wide(workspace, free, n_neg, np.float64(0))
    idx_neg, free = _take_wide(workspace, free, n_neg, np.int64(0))
    sort_pos = workspace[free:free + 2 * n_pos + 4]
    sort_neg = workspace[free + 2 * n_pos + 4:free + 2 * (n_pos + n_neg) + 8]
    return z_pos, idx_pos, z_neg, idx_neg, sort_pos, sort_neg, free


@njit(cache=True)
def _sort_label_list(logits, workspace, n_pos, n_neg, which, method):
    """Sort the foreground (``which`` 0) or background (1) list of :func:`_label_lists` into
    its sorted views."""
    count = logits.shape[0]
    margins_pos, positions_pos, margins_neg, positions_neg, _ = _unsorted_views(workspace, count)
    z_pos, idx_pos, z_neg, idx_neg, sort_pos, sort_neg, _ = _sorted_views(
        workspace, count, n_pos, n_neg)
    if which == 0:
        _sort_margins(margins_pos, positions_pos, n_pos, logits, 1.0, z_pos, idx_pos, sort_pos,
                      method)
    else:
        _sort_margins(margins_neg, positions_neg, n_neg, logits, -1.0, z_neg, idx_neg, sort_neg,
                      method)


@njit(cache=True)
def _split_by_label(logits, labels, ignore_label, has_ignore, workspace, method):
    """Margins of V+ split by label, each sorted in decreasing order (one thread).

    Returns (n_fg, z_pos, idx_pos, z_neg, idx_neg, free): margins m0 > 0 of the foreground
    (resp. background) pixels in decreasing order and their positions in the row; tied
    margins come out by pixel index (deterministic results). Every array lives in
    ``workspace`` (float64, at least 6 · P + 16 slots); the results take its slots up to
    ``free``.
    """
    n_fg, n_pos, n_neg = _label_lists(logits, labels, ignore_label, has_ignore, workspace)
    for which in range(2):
        _sort_label_list(logits, workspace, n_pos, n_neg, which, method)
    z_pos, idx_pos, z_neg, idx_neg, _, _, free = _sorted_views(
        workspace, logits.shape[0], n_pos, n_neg)
    return n_fg, z_pos, idx_pos, z_neg, idx_neg, free


def _split_by_label_parallel(logits, labels, ignore_label, has_ignore, workspace, method):
    """:func:`_split_by_label` with the two sorts on two threads."""
    n_fg, n_pos, n_neg = _label_lists(logits, labels, ignore_label, has_ignore, workspace)
    core.run_tasks(_sort_label_list, [(logits, workspace, n_pos, n_neg, which, method)
                                      for which in range(2)])
    z_pos, idx_pos, z_neg, idx_neg, _, _, free = _sorted_views(
        workspace, logits.shape[0], n_pos, n_neg)
    return n_fg, z_pos, idx_pos, z_neg, idx_neg, free


@njit(cache=True)
def _extension_of_sorted(z_pos, z_neg, n_fg):
    """Δ̄_J(relu(m)) for V+ given as two decreasing lists (merged on the fly), with the
    closed-form increments (:func:`lovasz_kernels._numba_core.jaccard_increment`)."""
    n_pos = z_pos.shape[0]
    n_neg = z_neg.shape[0]
    i = 0
    j = 0
    total = 0.0
    while i < n_pos or j < n_neg:
        if j == n_neg or (i < n_pos and z_pos[i] >= z_neg[j]):
            i += 1
            total += z_pos[i - 1] * jaccard_increment(n_fg, i, j, True)
        else:
            j += 1
            total += z_neg[j - 1] * jaccard_increment(n_fg, i, j, False)
    return total


@njit(cache=True)
def _block_level(prefix_pos, error_pos, prefix_neg, error_neg, p_lo, p_hi, n_lo, n_hi,
                 n_fg, lam):
    """The level c = (z(block) − G(block)) / |block| of a block (p_lo, p_hi, n_lo, n_hi)
    as one level: s = z − c then sums to G(block) = λ (φ(p_hi, n_hi) − φ(p_lo, n_lo))."""
    total = ((prefix_pos[p_hi] - prefix_pos[p_lo]) + (prefix_neg[n_hi] - prefix_neg[n_lo])
             + ((error_pos[p_hi] - error_pos[p_lo]) + (error_neg[n_hi] - error_neg[n_lo])))
    gain = lam * _jaccard_delta(p_lo, n_lo, p_hi, n_hi, n_fg)
    return (total - gain) / ((p_hi - p_lo) + (n_hi - n_lo))

@njit(cache=True)
def _most_violated(z_pos, z_neg, n_fg, lam, inverse_union, level, p_lo, p_hi, n_lo, n_hi):
    """The set of the block most violating s(A) ≤ G(A) for s = z − ``level``, as the
    numbers (a, b) of its foreground and background pixels; (0, 0) when the block is one
    level (no violation above rounding).

    G(a, b) = λ (φ(p_lo + a, n_lo + b) − φ(p_lo, n_lo)) is the set function contracted by
    everything above the block. s keeps z's order within each label, so the most
    violated set takes a prefix of each list; one sweep over b finds it: for b
    background pixels, G is linear in a with slope λ / (n_fg + n_lo + b), so the best a
    counts the s values above that slope, and it only grows with b.
    """
    size_pos = p_hi - p_lo
    size_neg = n_hi - n_lo
    best = 0.0
    best_a = 0
    best_b = 0
    a = 0
    s_pos = 0.0
    s_neg = 0.0
    phi_above = (p_lo + n_lo) * inverse_union[n_lo]
    for b in range(size_neg + 1):
        inverse = inverse_union[n_lo + b]
        if size_pos > 0:
            slope = lam * inverse
            while a < size_pos and z_pos[p_lo + a] - level > slope:
                s_pos += z_pos[p_lo + a] - level
                a += 1
        phi = (p_lo + a + n_lo + b) * inverse
        h = lam * (phi - phi_above) - s_pos - s_neg
        if h < best:
            best = h
            best_a = a
            best_b = b
        if b < size_neg:
            s_neg += z_neg[n_lo + b] - level
    # the running sums round by a few ulps of Σ|z − level| ≤ size · (largest deviation,
    # at an end of a sorted list): smaller violations are noise (and splitting on them
    # would be harmless anyway)
    deviation = 0.0
    if size_pos > 0:
        deviation = max(abs(z_pos[p_lo] - level), abs(z_pos[p_hi - 1] - level))
    if size_neg > 0:
        deviation = max(deviation, abs(z_neg[n_lo] - level), abs(z_neg[n_hi - 1] - level))
    tolerance = 1e-13 * ((size_pos + size_neg) * deviation + lam)
    proper = (best_a + best_b > 0) and (best_a + best_b < size_pos + size_neg)
    if best < -tolerance and proper:
        return best_a, best_b
    return 0, 0

@njit(cache=True, inline="always")
def _write_level(level, p_lo, p_hi, n_lo, n_hi, n_fg, z_pos, z_neg, lam, level_pos,
                 level_neg, unit_shift):
    """Write one level for the whole block, and each pixel's shift per unit of λ;
    returns the block's Δ̄ contribution at relu(level).

    A pixel's shift z − level is its deviation from the block's mean margin plus the
    block's mean Jaccard increment times λ. Both parts are formed without subtracting
    the level from z (which would leave nothing of a shift far below the margins'
    resolution): the deviations are taken from the block's first margin (exact when the
    margins lie within a factor of 2, as pooled margins do unless λ is large), and the
    increment comes from the integer counts. ``unit_shift`` holds the foreground pixels
    of V+, then the background ones.
    """
    size = (p_hi - p_lo) + (n_hi - n_lo)
    reference = z_pos[p_lo] if p_hi > p_lo else z_neg[n_lo]
    deviation_sum = 0.0
    for k in range(p_lo, p_hi):
        level_pos[k] = level
        deviation_sum += z_pos[k] - reference
    for k in range(n_lo, n_hi):
        level_neg[k] = level
        deviation_sum += z_neg[k] - reference
    mean_deviation = deviation_sum / size
    increment = _jaccard_delta(p_lo, n_lo, p_hi, n_hi, n_fg)
    mean_increment = increment / size
    offset_neg = z_pos.shape[0]
    for k in range(p_lo, p_hi):
        unit_shift[k] = ((z_pos[k] - reference) - mean_deviation) / lam + mean_increment
    for k in range(n_lo, n_hi):
        unit_shift[offset_neg + k] = (((z_neg[k] - reference) - mean_deviation) / lam
                                      + mean_increment)
    if level > 0.0:
        return level * increment
    return 0.0

@njit(cache=True)
def _merge_weights(z_neg, n_fg, lam, inverse_union, shift_pos, base_neg, slope_neg):
    """The terms of the would-be prox values of :func:`_merge_and_pool`, per background
    count j: a foreground pixel moves down by shift_pos[j] = λ / (n_fg + j), the next
    background one, after i foreground pixels, lands at base_neg[j] + i · slope_neg[j]
    (its increment is (n_fg − i) / ((n_fg + j)(n_fg + j + 1)), or 1 for the first pixel
    without foreground)."""
    n_neg = z_neg.shape[0]
    for j in range(n_neg + 1):
        shift_pos[j] = lam * inverse_union[j]
    for j in range(n_neg):
        slope = lam * inverse_union[j] * inverse_union[j + 1]
        slope_neg[j] = slope
        base_neg[j] = z_neg[j] - n_fg * slope
    if n_fg == 0 and n_neg > 0:
        slope_neg[0] = 0.0
        base_neg[0] = z_neg[0] - lam

@njit(cache=True)
def _merge_and_pool(z_pos, z_neg, shift_pos, base_neg, slope_neg, p_lo, p_hi, n_lo, n_hi,
                    level_pos, level_neg, start_pos, start_neg, group_level, group_sum):
    """One merge of the block's two lists (p_lo, p_hi, n_lo, n_hi) into pooled groups: the
    candidate prox where every pixel is its own level unless neighbours must pool.

    With i foreground and j background pixels placed, the next foreground pixel would
    get x = z − λ (φ(i + 1, j) − φ(i, j)) = z − shift_pos[j] and the next background one
    x = z − λ (φ(i, j + 1) − φ(i, j)) = base_neg[j] + i · slope_neg[j]
    (:func:`_merge_weights`); the larger is placed. A waiting candidate's value only
    rises, so when the prox has every pixel at its own level this merge finds its order.
    Where x would increase, groups pool (PAV) at the mean x of their pixels. The result
    is the prox when every pooled group is one level of its contracted set function:
    s = z − x then sums to G over the chain of groups and lies in each group's base
    polytope, hence in the block's, and ⟨s, x⟩ = λ Δ̄(x), the optimality condition.
    :func:`_certify_groups` checks that and writes the pooled levels.

    Returns the number of groups; group g starts at (start_pos[g], start_neg[g]); its x
    is group_level[g] (``group_sum`` holds the sums of pooling). The four arrays need
    room for one group more than pixels. The levels of single pixels are written here.
    """
    groups = 0
    i = p_lo
    j = n_lo
    for _ in range((p_hi - p_lo) + (n_hi - n_lo)):
        # no branch on which pixel comes next (it is unpredictable), and few operations
        # between i, j and the next i, j (the loop is latency bound)
        x_pos = z_pos[i] - shift_pos[j] if i < p_hi else -np.inf
        x_neg = base_neg[j] + i * slope_neg[j] if j < n_hi else -np.inf
        take_pos = x_pos >= x_neg
        # a pixel's level is written on every pass until it is placed: the last write is
        # its own (pooled groups are written again below)
        if i < p_hi:
            level_pos[i] = x_pos
        if j < n_hi:
            level_neg[j] = x_neg
        start_pos[groups] = i
        start_neg[groups] = j
        x = max(x_pos, x_neg)  # not a select on take_pos: LLVM may make that a branch
        group_level[groups] = x
        group_sum[groups] = x
        i += np.int64(take_pos)
        j += np.int64(not take_pos)
        groups += 1
        while groups > 1 and group_level[groups - 1] > group_level[groups - 2]:
            # pool: the level of the group is the mean of its pixels' x (sums kept as
            # sums; :func:`_certify_groups` recomputes the pooled levels exactly)
            groups -= 1
            merged_sum = group_sum[groups - 1] + group_sum[groups]
            group_sum[groups - 1] = merged_sum
            group_level[groups - 1] = merged_sum / ((i - start_pos[groups - 1])
                                                    + (j - start_neg[groups - 1]))
    start_pos[groups] = p_hi
    start_neg[groups] = n_hi
    return groups

@njit(cache=True)
def _certify_groups(z_pos, z_neg, n_fg, lam, inverse_union, prefix_pos, error_pos,
                    prefix_neg, error_neg, start_pos, start_neg, group_level, first, stop,
                    level_pos, level_neg, unit_shift):
    """Check the groups ``first`` to ``stop`` − 1 of :func:`_merge_and_pool` and write the
    pooled ones' levels and every pixel's shift per unit of λ (see :func:`_write_level`);
    returns (True, Δ̄ contribution of their relu(x)), or (False, 0) when a pooled group
    is not one level of its contracted set function (:func:`_most_violated` finds a set).
    A single pixel always is, and its shift is λ times its Jaccard increment; a pooled
    group's level is recomputed from the compensated prefix sums (:func:`_block_level`)."""
    loss = 0.0
    last_union = inverse_union.shape[0] - 1
    offset_neg = z_pos.shape[0]
    for group in range(first, stop):
        a_lo = start_pos[group]
        a_hi = start_pos[group + 1]
        b_lo = start_neg[group]
        b_hi = start_neg[group + 1]
        level = group_level[group]
        if (a_hi - a_lo) + (b_hi - b_lo) == 1:
            # the pixel's Jaccard increment, blended without a branch on its label
            # (unpredictable)
            increment_pos = inverse_union[b_lo]
            increment_neg = ((n_fg - a_lo) * inverse_union[b_lo]
                             * inverse_union[min(b_lo + 1, last_union)])
            increment_neg = increment_neg if n_fg + b_lo > 0 else 1.0  # φ(0, 1) − φ(0, 0)
            is_pos = a_hi - a_lo
            increment = increment_neg + is_pos * (increment_pos - increment_neg)
            loss += max(level, 0.0) * increment
            unit_shift[offset_neg + b_lo + is_pos * (a_lo - offset_neg - b_lo)] = increment
            continue
        level = _block_level(prefix_pos, error_pos, prefix_neg, error_neg, a_lo, a_hi,
                             b_lo, b_hi, n_fg, lam)
        split_a, split_b = _most_violated(z_pos, z_neg, n_fg, lam, inverse_union, level,
                                          a_lo, a_hi, b_lo, b_hi)
        if split_a + split_b > 0:
            return False, 0.0
        loss += _write_level(level, a_lo, a_hi, b_lo, b_hi, n_fg, z_pos, z_neg, lam,
                             level_pos, level_neg, unit_shift)
    return True, loss

@njit(cache=True)
def _compensated_prefix(z, prefix, error):
    """Prefix sums of z as (high, low) parts, written to ``prefix`` and ``error`` (count + 1
    each): prefix[k] + error[k] = Σ z[:k] with the rounding error of every addition kept
    (Neumaier's TwoSum), so that a difference of two prefixes is as accurate as summing
    the range directly."""
    count = z.shape[0]
    high = 0.0
    low = 0.0
    prefix[0] = 0.0
    error[0] = 0.0
    for k in range(count):
        value = z[k]
        total = high + value
        virtual = total - high
        low += (high - (total - virtual)) + (value - virtual)
        high = total
        prefix[k + 1] = high
        error[k + 1] = low

@njit(cache=True)
def _solve_block(z_pos, z_neg, n_fg, lam, inverse_union, prefix_pos, error_pos,
                 prefix_neg, error_neg, shift_pos, base_neg, slope_neg, block, stack,
                 start_pos, start_neg, group_level, group_sum, level_pos, level_neg,
                 unit_shift):
    """Levels of one block (p_lo, p_hi, n_lo, n_hi) by recursive splitting at the most
    violated set (Fujishige/Groenevelt decomposition), depth first: ``stack`` has at
    least its pixel count + 1 rows; the prefix block is pushed last, so blocks leave
    from the top level down. Blocks of at most MERGE_LIMIT pixels first try
    :func:`_merge_and_pool` (the group arrays: MERGE_LIMIT + 1 entries). Returns Δ̄
    of the block's clipped levels.
    """
    loss = 0.0
    stack[0, :] = block
    tail = 1
    while tail > 0:
        tail -= 1
        p_lo = stack[tail, 0]
        p_hi = stack[tail, 1]
        n_lo = stack[tail, 2]
        n_hi = stack[tail, 3]
        if (p_hi - p_lo) + (n_hi - n_lo) <= MERGE_LIMIT:
            groups = _merge_and_pool(
                z_pos, z_neg, shift_pos, base_neg, slope_neg, p_lo, p_hi, n_lo, n_hi,
                level_pos, level_neg, start_pos, start_neg, group_level, group_sum,
            )
            solved, block_loss = _certify_groups(
                z_pos, z_neg, n_fg, lam, inverse_union, prefix_pos, error_pos, prefix_neg,
                error_neg, start_pos, start_neg, group_level, 0, groups, level_pos,
                level_neg, unit_shift,
            )
            if solved:
                loss += block_loss
                continue
        level = _block_level(prefix_pos, error_pos, prefix_neg, error_neg, p_lo, p_hi,
                             n_lo, n_hi, n_fg, lam)
        split_a, split_b = _most_violated(z_pos, z_neg, n_fg, lam, inverse_union, level,
                                          p_lo, p_hi, n_lo, n_hi)
        if split_a + split_b > 0:
            # push the rest first so that the top block (higher levels) is popped first
            stack[tail, 0] = p_lo + split_a
            stack[tail, 1] = p_hi
            stack[tail, 2] = n_lo + split_b
            stack[tail, 3] = n_hi
            stack[tail + 1, 0] = p_lo
            stack[tail + 1, 1] = p_lo + split_a
            stack[tail + 1, 2] = n_lo
            stack[tail + 1, 3] = n_lo + split_b
            tail += 2
        else:
            loss += _write_level(level, p_lo, p_hi, n_lo, n_hi, n_fg, z_pos, z_neg, lam,
                                 level_pos, level_neg, unit_shift)
    return loss

@njit(cache=True)
def _decompose_arrays(z_pos, z_neg, n_fg, workspace):
    """The arrays of :func:`_decompose`, carved from ``workspace``: (inverse_union, prefix_pos,
    error_pos, prefix_neg, error_neg, shift_pos, base_neg, slope_neg, start_pos, start_neg,
    group_level, group_sum), with inverse_union filled in."""
    n_pos = z_pos.shape[0]
    n_neg = z_neg.shape[0]
    count = n_pos + n_neg
    # 1 / (n_fg + b) for every background count b: the sweep multiplies instead of dividing
    # (φ(a, b) = (a + b) / (n_fg + b); 0 for the empty set when n_fg = 0)
    inverse_union, free = _take_wide(workspace, 0, n_neg + 1, np.float64(0))
    for b in range(n_neg + 1):
        inverse_union[b] = 1.0 / (n_fg + b) if n_fg + b > 0 else 0.0
    # compensated prefix sums: a block's total z in O(1), to a few ulps of the block's sum
    prefix_pos, free = _take_wide(workspace, free, n_pos + 1, np.float64(0))
    error_pos, free = _take_wide(workspace, free, n_pos + 1, np.float64(0))
    prefix_neg, free = _take_wide(workspace, free, n_neg + 1, np.float64(0))
    error_neg, free = _take_wide(workspace, free, n_neg + 1, np.float64(0))
    shift_pos, free = _take_wide(workspace, free, n_neg + 1, np.float64(0))
    base_neg, free = _take_wide(workspace, free, n_neg + 1, np.float64(0))
    slope_neg, free = _take_wide(workspace, free, n_neg + 1, np.float64(0))
    start_pos, free = _take_wide(workspace, free, count + 1, np.int64(0))
    start_neg, free = _take_wide(workspace, free, count + 1, np.int64(0))
    group_level, free = _take_wide(workspace, free, count + 1, np.float64(0))
    group_sum, free = _take_wide(workspace, free, count + 1, np.float64(0))
    return (inverse_union, prefix_pos, error_pos, prefix_neg, error_neg, shift_pos, base_neg,
            slope_neg, start_pos, start_neg, group_level, group_sum)


@njit(cache=True)
def _decompose_step(task, z_pos, z_neg, n_fg, lam, level_pos, level_neg, merge_first, arrays):
    """The two independent first steps of :func:`_decompose`: task 0 computes the merge's
    weights and (``merge_first``) merges, returning (groups, 0); task 1 the prefix sums and
    the input's loss, returning (0, loss)."""
    (inverse_union, prefix_pos, error_pos, prefix_neg, error_neg, shift_pos, base_neg,
     slope_neg, start_pos, start_neg, group_level, group_sum) = arrays
    if task == 0:
        _merge_weights(z_neg, n_fg, lam, inverse_union, shift_pos, base_neg, slope_neg)
        if not merge_first:
            return 0, 0.0
        groups = _merge_and_pool(
            z_pos, z_neg, shift_pos, base_neg, slope_neg, 0, z_pos.shape[0], 0, z_neg.shape[0],
            level_pos, level_neg, start_pos, start_neg, group_level, group_sum,
        )
        return groups, 0.0
    _compensated_prefix(z_pos, prefix_pos, error_pos)
    _compensated_prefix(z_neg, prefix_neg, error_neg)
    return 0, _extension_of_sorted(z_pos, z_neg, n_fg)


@njit(cache=True)
def _certify_part(part, parts, groups, z_pos, z_neg, n_fg, lam, level_pos, level_neg,
                  unit_shift, arrays):
    """:func:`_certify_groups` on part ``part`` of ``parts`` of the merge's groups."""
    (inverse_union, prefix_pos, error_pos, prefix_neg, error_neg, _, _, _, start_pos,
     start_neg, group_level, _) = arrays
    return _certify_groups(
        z_pos, z_neg, n_fg, lam, inverse_union, prefix_pos, error_pos, prefix_neg, error_neg,
        start_pos, start_neg, group_level, part * groups // parts, (part + 1) * groups // parts,
        level_pos, level_neg, unit_shift,
    )


@njit(cache=True)
def _solve_whole(z_pos, z_neg, n_fg, lam, level_pos, level_neg, unit_shift, arrays):
    """:func:`_solve_block` on all of V+ (the route without a certified merge)."""
    (inverse_union, prefix_pos, error_pos, prefix_neg, error_neg, shift_pos, base_neg,
     slope_neg, start_pos, start_neg, group_level, group_sum) = arrays
    n_pos = z_pos.shape[0]
    n_neg = z_neg.shape[0]
    stack = np.empty((n_pos + n_neg + 1, 4), dtype=np.int64)
    whole = np.array([0, n_pos, 0, n_neg], dtype=np.int64)
    return _solve_block(
        z_pos, z_neg, n_fg, lam, inverse_union, prefix_pos, error_pos, prefix_neg,
        error_neg, shift_pos, base_neg, slope_neg, whole, stack, start_pos, start_neg,
        group_level, group_sum, level_pos, level_neg, unit_shift,
    )


@njit(cache=True)
def _decompose(z_pos, z_neg, n_fg, lam, level_pos, level_neg, unit_shift, merge_first,
               workspace):
    """Levels of prox_{λΔ̄}(z) (no clipping) on V+ and each pixel's shift z − level per
    unit of λ (``unit_shift``: foreground pixels, then background ones; see
    :func:`_write_level`); returns (Δ̄_J(relu(levels)), Δ̄_J(relu(z))), the second computed
    beside the first (one thread; :func:`_decompose_parallel` splits it in two).

    When ``merge_first``, all of V+ goes through :func:`_merge_and_pool` (one pass) and
    :func:`_certify_groups`. That is the prox whenever the check passes, which it did on every
    input tried, at every λ; otherwise, or without ``merge_first``, V+ is solved by
    :func:`_solve_block` (recursive splitting, ~log2 P sweeps per pixel).
    """
    arrays = _decompose_arrays(z_pos, z_neg, n_fg, workspace)
    groups, _ = _decompose_step(0, z_pos, z_neg, n_fg, lam, level_pos, level_neg,
                                merge_first, arrays)
    _, loss_in = _decompose_step(1, z_pos, z_neg, n_fg, lam, level_pos, level_neg,
                                 merge_first, arrays)
    if merge_first:
        certified, loss = _certify_part(0, 1, groups, z_pos, z_neg, n_fg, lam, level_pos,
                                        level_neg, unit_shift, arrays)
        if certified:
            return loss, loss_in
    return _solve_whole(z_pos, z_neg, n_fg, lam, level_pos, level_neg, unit_shift,
                        arrays), loss_in


def _decompose_parallel(z_pos, z_neg, n_fg, lam, level_pos, level_neg, unit_shift,
                        merge_first, workspace):
    """:func:`_decompose` on two threads: the merge on one while the other computes the
    prefix sums and the input's loss, then the certificate in two halves."""
    arrays = _decompose_arrays(z_pos, z_neg, n_fg, workspace)
    (groups, _), (_, loss_in) = core.run_tasks(_decompose_step, [
        (task, z_pos, z_neg, n_fg, lam, level_pos, level_neg, merge_first, arrays)
        for task in range(2)])
    if merge_first:
        halves = core.run_tasks(_certify_part, [
            (half, 2, groups, z_pos, z_neg, n_fg, lam, level_pos, level_neg, unit_shift,
             arrays) for half in range(2)])
        if halves[0][0] and halves[1][0]:
            return halves[0][1] + halves[1][1], loss_in
    return _solve_whole(z_pos, z_neg, n_fg, lam, level_pos, level_neg, unit_shift,
                        arrays), loss_in


@njit(cache=True)
def _write_logits(out, direction, idx_pos, z_pos, level_pos, idx_neg, z_neg, level_neg,
                  unit_shift, lam, start, stop):
    """The prox logits of V+ pixels [start, stop) (foreground pixels, then background ones)
    from their levels clipped at 0, X = y (1 − relu(level)), and the direction
    (F − X) / λ = −y (z − relu(level)) / λ: the pixel's shift per unit of λ, or z / λ where
    the level is clipped (never formed as a difference of F and X, which cancels when λ is
    small)."""
    n_pos = idx_pos.shape[0]
    for k in range(start, stop):
        if k < n_pos:
            level = level_pos[k]
            out[idx_pos[k]] = 1.0 - max(level, 0.0)
            direction[idx_pos[k]] = -(unit_shift[k] if level > 0.0 else z_pos[k] / lam)
        else:
            level = level_neg[k - n_pos]
            out[idx_neg[k - n_pos]] = max(level, 0.0) - 1.0
            direction[idx_neg[k - n_pos]] = (unit_shift[k] if level > 0.0
                                             else z_neg[k - n_pos] / lam)


@njit(cache=True)
def _level_views(workspace, free, n_pos, n_neg):
    """(level_pos, level_neg, unit_shift, free) after the sorted lists."""
    level_pos, free = _take_wide(workspace, free, n_pos, np.float64(0))
    level_neg, free = _take_wide(workspace, free, n_neg, np.float64(0))
    unit_shift, free = _take_wide(workspace, free, n_pos + n_neg, np.float64(0))
    return level_pos, level_neg, unit_shift, free


@njit(cache=True)
def _exact_row(logits, labels, ignore_label, has_ignore, lam, out, direction, workspace,
               merge_first, method):
    """The exact prox of one row on one thread (see :func:`_prox_exact_rows`); returns
    (loss_in, loss_out)."""
    out[:] = logits
    direction[:] = 0.0
    n_fg, z_pos, idx_pos, z_neg, idx_neg, free = _split_by_label(
        logits, labels, ignore_label, has_ignore, workspace, method
    )
    count = z_pos.shape[0] + z_neg.shape[0]
    if count == 0:
        return 0.0, 0.0
    level_pos, level_neg, unit_shift, free = _level_views(workspace, free, z_pos.shape[0],
                                                          z_neg.shape[0])
    loss_out, loss_in = _decompose(z_pos, z_neg, n_fg, lam, level_pos, level_neg, unit_shift,
                                   merge_first, workspace[free:])
    _write_logits(out, direction, idx_pos, z_pos, level_pos, idx_neg, z_neg, level_neg,
                  unit_shift, lam, 0, count)
    return loss_in, loss_out


@njit(cache=True)
def _exact_rows_shared(logits, labels, ignore_label, has_ignore, lam, out, direction,
                       loss_in, loss_out, workspace, merge_first, method, next_row):
    """One thread's rows: the next row from the shared counter next_row[0] until none is
    left, each on this thread's workspace."""
    while True:
        row = fetch_add(next_row, 0, 1)
        if row >= logits.shape[0]:
            return
        loss_in[row], loss_out[row] = _exact_row(
            logits[row], labels[row], ignore_label, has_ignore, lam[row], out[row],
            direction[row], workspace, merge_first, method,
        )


def _exact_row_split(logits, labels, ignore_label, has_ignore, lam, out, direction,
                     workspace, merge_first, method):
    """:func:`_exact_row` with its steps split over two threads."""
    out[:] = logits
    direction[:] = 0.0
    n_fg, z_pos, idx_pos, z_neg, idx_neg, free = _split_by_label_parallel(
        logits, labels, ignore_label, has_ignore, workspace, method
    )
    count = z_pos.shape[0] + z_neg.shape[0]
    if count == 0:
        return 0.0, 0.0
    level_pos, level_neg, unit_shift, free = _level_views(workspace, free, z_pos.shape[0],
                                                          z_neg.shape[0])
    loss_out, loss_in = _decompose_parallel(z_pos, z_neg, n_fg, lam, level_pos, level_neg,
                                            unit_shift, merge_first, workspace[free:])
    core.run_tasks(_write_logits, [
        (out, direction, idx_pos, z_pos, level_pos, idx_neg, z_neg, level_neg, unit_shift,
         lam, half * count // 2, (half + 1) * count // 2) for half in range(2)])
    return loss_in, loss_out


def _sort_method(num_pixels):
    """The radix sort measured fastest here for rows this large (LSD for small ones)."""
    return core.sort_choice().kernel if num_pixels >= SORT_CHOICE_MIN_PIXELS else SORT_LSD


def _check_workspace(workspace, num_pixels):
    if workspace.shape[0] < workspace_slots(num_pixels):
        raise ValueError(
            f"workspace smaller than workspace_slots(P): {workspace.shape[0]} slots for "
            f"P = {num_pixels}, need {workspace_slots(num_pixels)}"
        )


def _rows_on_threads(row_kernel, row_args, logits, workspace):
    """Run ``row_kernel(..., workspace, ..., next_row)`` (a kernel that takes rows from a
    shared counter) on as many threads as rows allow: the calling thread with ``workspace``,
    each pool thread with its own scratch workspace (by the thread that runs a task, not the
    task's index: any thread may take any task). ``row_args(workspace, next_row)`` gives the
    kernel's arguments."""
    rows, num_pixels = logits.shape
    workers = min(core.thread_count(), rows)
    next_row = np.zeros(1, dtype=np.int64)
    slots = workspace_slots(num_pixels)
    caller = threading.get_ident()

    def task(worker):
        own = (workspace if threading.get_ident() == caller
               else scratch("prox workspace", slots, np.float64))
        return row_kernel(*row_args(own, next_row))

    return core.run_tasks(task, [(worker,) for worker in range(workers)])


def _prox_exact_rows(logits, labels, ignore_label, has_ignore, lam, out, direction,
                     loss_in, loss_out, workspace, merge_first):
    """Exact prox of λ[s]·Δ̄_J(relu(1 − y·F)) for every row s.

    Parameters: logits (S, P) float32 or float64, labels (S, P) (1 is foreground; a
    label equal to ``ignore_label`` is ignored when ``has_ignore``), lam (S,) float64,
    workspace float64 with ``workspace_slots(P)`` slots (every temporary array of the
    calling thread lives there). Writes out (S, P) float64 (a copy of logits except on V+),
    direction (S, P) float64 = (F − out) / λ[s] (0 outside V+; computed from the shifts, see
    :func:`_write_logits`), loss_in[s] = Δ̄ at the input and loss_out[s] = Δ̄ at the prox
    (both without the factor λ). Rows run on several threads when there are several; one
    large row has its steps split over two.
    ``merge_first``: see :func:`_decompose` (False only to test the splitting alone).
    """
    rows, num_pixels = logits.shape
    _check_workspace(workspace, num_pixels)
    method = _sort_method(num_pixels)
    threads = core.thread_count()
    if rows > 1 and threads > 1 and rows * num_pixels >= SPLIT_MIN_PIXELS:
        _rows_on_threads(_exact_rows_shared, lambda own, next_row: (
            logits, labels, ignore_label, has_ignore, lam, out, direction, loss_in, loss_out,
            own, merge_first, method, next_row), logits, workspace)
        return
    row_kernel = (_exact_row_split if threads > 1 and num_pixels >= SPLIT_MIN_PIXELS
                  else _exact_row)
    for row in range(rows):
        loss_in[row], loss_out[row] = row_kernel(
            logits[row], labels[row], ignore_label, has_ignore, lam[row], out[row],
            direction[row], workspace, merge_first, method,
        )


# ---------------------------------------------------------------------------------------
# greedy minimization path (paper, Appendix C)

@njit(cache=True)
def _heap_set(times, first, second, versions, k, time, i, j, version):
    """Write the event (time, i, j, version) in slot k of the heap's four arrays."""
    times[k] = time
    first[k] = i
    second[k] = j
    versions[k] = version

@njit(cache=True)
def _heap_push(times, first, second, versions, size, time, i, j, version):
    """Push an event (time, group i meets its lower neighbour j) on a binary min-heap."""
    k = size
    while k > 0:
        parent = (k - 1) // 2
        if times[parent] <= time:
            break
        _heap_set(times, first, second, versions, k,
                  times[parent], first[parent], second[parent], versions[parent])
        k = parent
    _heap_set(times, first, second, versions, k, time, i, j, version)
    return size + 1

@njit(cache=True)
def _heap_pop(times, first, second, versions, size):
    """Remove the root of the heap (read it before calling); returns the new size."""
    size -= 1
    time = times[size]
    i = first[size]
    j = second[size]
    version = versions[size]
    k = 0
    while True:
        child = 2 * k + 1
        if child >= size:
            break
        if child + 1 < size and times[child + 1] < times[child]:
            child += 1
        if times[child] >= time:
            break
        _heap_set(times, first, second, versions, k,
                  times[child], first[child], second[child], versions[child])
        k = child
    _heap_set(times, first, second, versions, k, time, i, j, version)
    return size

@njit(cache=True)
def _greedy_path(z, is_fg, n_fg, lam, max_steps, margins, unit_shift):
    """Follow the paper's minimization path for margins z (decreasing); returns
    (Δ̄_J(relu(margins)), finished), and writes each pixel's shift z − margin per unit of
    λ to ``unit_shift``.

    Groups of consecutive pixels move down at speed ḡ (the mean Jaccard increment of the
    group, in the order of z); a group that meets its lower neighbour merges with it, a
    group that meets 0 freezes there. The walk stops at t = λ, or after ``max_steps``
    events (merges and freezes; −1 for no limit) with ``finished`` False.
    Group ids are the position of their first pixel; id K is the floor at 0.
    """
    count = z.shape[0]
    floor = count
    value = np.empty(count + 1)  # value at time t_ref
    t_ref = np.zeros(count + 1)
    g_sum = np.zeros(count + 1)
    size = np.ones(count + 1, dtype=np.int64)
    end = np.empty(count + 1, dtype=np.int64)
    below = np.empty(count + 1, dtype=np.int64)
    above = np.empty(count + 1, dtype=np.int64)
    version = np.zeros(count + 1, dtype=np.int64)
    state = np.zeros(count + 1, dtype=np.int64)  # 0 moving, 1 frozen at 0, 2 merged away
    fg_seen = 0
    for k in range(count):
        value[k] = z[k]
        fg_seen += np.int64(is_fg[k])
        g_sum[k] = jaccard_increment(n_fg, fg_seen, k + 1 - fg_seen, is_fg[k])
        end[k] = k + 1
        below[k] = k + 1
        above[k] = k - 1
    value[floor] = 0.0
    above[floor] = count - 1

    capacity = 3 * count + 4
    times = np.empty(capacity)
    first = np.empty(capacity, dtype=np.int64)
    second = np.empty(capacity, dtype=np.int64)
    versions = np.empty(capacity, dtype=np.int64)  # version[i] * (K + 2) + version[j]
    heap_size = 0
    stride = count + 2

    now = 0.0
    for k in range(count):
        j = below[k]
        speed_j = 0.0 if j == floor else g_sum[j]
        closing = g_sum[k] - speed_j
        if closing > 0.0:
            gap = max(value[k] - value[j], 0.0)
            heap_size = _heap_push(times, first, second, versions, heap_size,
                                   gap / closing, k, j, 0)

    events = 0
    finished = True
    while heap_size > 0:
        time = times[0]
        i = first[0]
        j = second[0]
        stamp = versions[0]
        if time > lam:
            break
        heap_size = _heap_pop(times, first, second, versions, heap_size)
        if state[i] != 0 or below[i] != j or stamp != version[i] * stride + version[j]:
            continue  # stale: one of the two groups changed since the event was planned
        if j != floor and state[j] != 0:
            continue
        if events == max_steps:
            finished = False
            break
        events += 1
        now = time
        speed_i = g_sum[i] / size[i]
        value_i = value[i] - speed_i * (now - t_ref[i])
        if j == floor:
            state[i] = 1  # frozen at 0
            upper = above[i]
            above[floor] = upper
            if upper >= 0:
                below[upper] = floor
                neighbours_upper = upper
            else:
                neighbours_upper = -1
            new_group = -1
        else:
            speed_j = g_sum[j] / size[j]
            value_j = value[j] - speed_j * (now - t_ref[j])
            merged = size[i] + size[j]
            value[i] = (size[i] * value_i + size[j] * value_j) / merged
            t_ref[i] = now
            g_sum[i] += g_sum[j]
            size[i] = merged
            end[i] = end[j]
            state[j] = 2
            lower = below[j]
            below[i] = lower
            above[lower] = i
            version[i] += 1
            neighbours_upper = above[i]
            new_group = i
        # new events: (group above, changed group) and (changed group, its lower one)
        for pair in range(2):
            if pair == 0:
                upper = neighbours_upper
                if upper < 0:
                    continue
                lower = below[upper]
            else:
                upper = new_group
                if upper < 0:
                    continue
                lower = below[upper]
            speed_u = g_sum[upper] / size[upper]
            speed_l = 0.0 if lower == floor else g_sum[lower] / size[lower]
            closing = speed_u - speed_l
            if closing > 0.0:
                value_u = value[upper] - speed_u * (now - t_ref[upper])
                value_l = 0.0
                if lower != floor:
                    value_l = value[lower] - speed_l * (now - t_ref[lower])
                gap = max(value_u - value_l, 0.0)
                heap_size = _heap_push(
                    times, first, second, versions, heap_size, now + gap / closing,
                    upper, lower, version[upper] * stride + version[lower],
                )
    stop = lam if finished else now

    # write the margins group by group (top to bottom) and the loss of the result
    loss = 0.0
    a_done = 0
    b_done = 0
    k = 0
    elapsed = stop / lam  # the path's time in units of λ (1 when it finished)
    while k < count:
        group_end = end[k]
        if state[k] == 0:
            level = value[k] - g_sum[k] / size[k] * (stop - t_ref[k])
            level = max(level, 0.0)
        else:
            level = 0.0
        a_group = 0
        for position in range(k, group_end):
            margins[position] = level
            if is_fg[position]:
                a_group += 1
        # merges keep a moving group's total margin at Σz − t·Σg, so a pixel's shift is
        # t times the group's mean increment plus its deviation from the group's mean z:
        # formed without subtracting the margin from z (see _write_level), deviations
        # taken from the group's first margin
        if level > 0.0:
            shift = elapsed * (g_sum[k] / size[k])
            if group_end - k == 1:
                unit_shift[k] = shift
            else:
                deviation_sum = 0.0
                for position in range(k, group_end):
                    deviation_sum += z[position] - z[k]
                mean_deviation = deviation_sum / size[k]
                for position in range(k, group_end):
                    unit_shift[position] = ((z[position] - z[k]) - mean_deviation) / lam + shift
        else:
            for position in range(k, group_end):
                unit_shift[position] = z[position] / lam
        b_group = group_end - k - a_group
        if level > 0.0:
            loss += level * _jaccard_delta(a_done, b_done, a_done + a_group,
                                           b_done + b_group, n_fg)
        a_done += a_group
        b_done += b_group
        k = group_end
    return loss, finished

@njit(cache=True)
def _greedy_after_split(n_fg, z_pos, idx_pos, z_neg, idx_neg, lam, max_steps, out, direction):
    """The greedy path on one row's sorted lists; writes its V+ pixels of ``out`` and
    ``direction``; returns (loss_in, loss_out, finished)."""
    loss_in = _extension_of_sorted(z_pos, z_neg, n_fg)
    n_pos = z_pos.shape[0]
    n_neg = z_neg.shape[0]
    count = n_pos + n_neg
    if count == 0:
        return loss_in, 0.0, True
    # merge the two sorted lists into one decreasing order (foreground first on ties)
    z = np.empty(count)
    is_fg = np.empty(count, dtype=np.bool_)
    index = np.empty(count, dtype=np.int64)
    i = 0
    j = 0
    for k in range(count):
        if j == n_neg or (i < n_pos and z_pos[i] >= z_neg[j]):
            z[k] = z_pos[i]
            is_fg[k] = True
            index[k] = idx_pos[i]
            i += 1
        else:
            z[k] = z_neg[j]
            is_fg[k] = False
            index[k] = idx_neg[j]
            j += 1
    margins = np.empty(count)
    unit_shift = np.empty(count)
    loss_out, finished = _greedy_path(z, is_fg, n_fg, lam, max_steps, margins, unit_shift)
    for k in range(count):
        if is_fg[k]:
            out[index[k]] = 1.0 - margins[k]
            direction[index[k]] = -unit_shift[k]
        else:
            out[index[k]] = margins[k] - 1.0
            direction[index[k]] = unit_shift[k]
    return loss_in, loss_out, finished


@njit(cache=True)
def _greedy_row(logits, labels, ignore_label, has_ignore, lam, max_steps, out, direction,
                workspace, method):
    """The greedy path for one row on one thread; returns (loss_in, loss_out, finished)."""
    out[:] = logits
    direction[:] = 0.0
    n_fg, z_pos, idx_pos, z_neg, idx_neg, _ = _split_by_label(
        logits, labels, ignore_label, has_ignore, workspace, method
    )
    return _greedy_after_split(n_fg, z_pos, idx_pos, z_neg, idx_neg, lam, max_steps, out,
                               direction)


@njit(cache=True)
def _greedy_rows_shared(logits, labels, ignore_label, has_ignore, lam, max_steps, out,
                        direction, loss_in, loss_out, finished, workspace, method, next_row):
    """One thread's rows of the greedy path (see :func:`_exact_rows_shared`)."""
    while True:
        row = fetch_add(next_row, 0, 1)
        if row >= logits.shape[0]:
            return
        loss_in[row], loss_out[row], finished[row] = _greedy_row(
            logits[row], labels[row], ignore_label, has_ignore, lam[row], max_steps, out[row],
            direction[row], workspace, method,
        )


def _greedy_row_split(logits, labels, ignore_label, has_ignore, lam, max_steps, out,
                      direction, workspace, method):
    """:func:`_greedy_row` with the two label lists sorted on two threads."""
    out[:] = logits
    direction[:] = 0.0
    n_fg, z_pos, idx_pos, z_neg, idx_neg, _ = _split_by_label_parallel(
        logits, labels, ignore_label, has_ignore, workspace, method
    )
    return _greedy_after_split(n_fg, z_pos, idx_pos, z_neg, idx_neg, lam, max_steps, out,
                               direction)


def _prox_greedy_rows(logits, labels, ignore_label, has_ignore, lam, max_steps, out,
                      direction, loss_in, loss_out, workspace):
    """The greedy path for every row (same arguments as :func:`_prox_exact_rows`, plus
    ``max_steps``, −1 for no limit). Returns True when every row reached t = λ."""
    rows, num_pixels = logits.shape
    _check_workspace(workspace, num_pixels)
    method = _sort_method(num_pixels)
    threads = core.thread_count()
    finished = np.ones(rows, dtype=np.bool_)
    if rows > 1 and threads > 1 and rows * num_pixels >= SPLIT_MIN_PIXELS:
        _rows_on_threads(_greedy_rows_shared, lambda own, next_row: (
            logits, labels, ignore_label, has_ignore, lam, max_steps, out, direction, loss_in,
            loss_out, finished, own, method, next_row), logits, workspace)
        return bool(finished.all())
    row_kernel = (_greedy_row_split if threads > 1 and num_pixels >= SPLIT_MIN_PIXELS
                  else _greedy_row)
    for row in range(rows):
        loss_in[row], loss_out[row], finished[row] = row_kernel(
            logits[row], labels[row], ignore_label, has_ignore, lam[row], max_steps, out[row],
            direction[row], workspace, method,
        )
    return bool(finished.all())
