//! The one hot loop: a linear layer, `y = x Wᵀ + b`, for a few to a few
//! hundred token rows against weights stored one output per row.
//!
//! Each output is a dot product of a token row with a weight row, so no
//! operand is packed per call. A block of 4 weight rows (at most 12 KB)
//! stays in L1 while every token row passes by, so each weight is read from
//! memory once per call.
//!
//! The weights are bfloat16 (an `f32` with the low 16 mantissa bits
//! rounded off). Where the CPU multiplies bfloat16 pairs itself
//! (AVX512-BF16: AMD Zen 4 and later, Intel Sapphire Rapids and later) the
//! token rows are rounded to bfloat16 too and one instruction does 32
//! multiply-adds into `f32` sums. Against the int8 weights widened to `f32`
//! for AVX2 FMA that this replaced, a layer of 12 tokens × 384 × 1536 takes
//! 0.07 ms instead of 0.20 with its weights in cache, and a 20-token
//! forward pass 2.0-2.5 ms instead of 5.6-6.1 (BENCHMARKS.md). It is also
//! more accurate: the embeddings keep a cosine of 0.99999 to the `f32`
//! reference, against 0.9995 with int8 weights (tests/embedder.rs in
//! elaaoms-shared); int8 token rows (AVX512-VNNI, twice the multiply-adds
//! per instruction) fell to 0.9962, 0.9992 with a scale per 32 values.
//! Elsewhere, AVX2 with FMA or a portable loop widen the weights to `f32`
//! and keep the token rows in `f32` (AVX2: 5.4 ms for that 20-token pass,
//! what the int8 weights took).

/// Input values per step of the fast path: one AVX-512 register of bfloat16.
pub const STEP: usize = 32;
/// Weight rows that go through the kernel together.
pub const ROWS: usize = 4;

/// Weight rows in bfloat16, laid out in the order the kernel reads them:
/// for each block of [`ROWS`] rows, for each [`STEP`] of inputs, the rows'
/// `STEP` values one after the other. A linear layer then reads its weights
/// front to back, one stream the hardware prefetcher follows, instead of
/// four rows a few hundred bytes long at a time.
pub struct Bf16Rows {
    values: Vec<u16>,
    outputs: usize,
    k: usize,
}

impl Bf16Rows {
    /// Rounds `f32` weight rows of `k` inputs each (one row per output) to
    /// the nearest bfloat16. `k` must be a multiple of [`STEP`] and the
    /// number of rows of [`ROWS`].
    pub fn from_f32(weights: &[f32], k: usize) -> Self {
        assert!(
            k.is_multiple_of(STEP) && weights.len().is_multiple_of(k * ROWS) && !weights.is_empty(),
            "weight shape: {} values in rows of {k}",
            weights.len()
        );
        let outputs = weights.len() / k;
        let mut values = Vec::with_capacity(weights.len());
        for block in weights.chunks_exact(ROWS * k) {
            for step in (0..k).step_by(STEP) {
                for row in block.chunks_exact(k) {
                    values.extend(row[step..step + STEP].iter().map(|&w| to_bf16(w)));
                }
            }
        }
        Self { values, outputs, k }
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `weight[o][i]`.
    fn get(&self, o: usize, i: usize) -> f32 {
        let (block, row) = (o / ROWS, o % ROWS);
        let (step, lane) = (i / STEP, i % STEP);
        from_bf16(self.values[((block * (self.k / STEP) + step) * ROWS + row) * STEP + lane])
    }
}

/// Round to nearest, ties to even (the weights and activations here are
/// finite; a NaN would stay a NaN only by luck, and none occurs).
fn to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

fn from_bf16(value: u16) -> f32 {
    f32::from_bits(u32::from(value) << 16)
}

/// `output[t][o] = bias[o] + Σ_k input[t][k] · weight[o][k]`, with
/// `input` `tokens × k`, `weight` `outputs × k`, `output` `tokens × outputs`.
pub fn linear(input: &[f32], weight: &Bf16Rows, bias: &[f32], output: &mut [f32]) {
    let k = checked_k(input, weight, bias, output);
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::usable() {
            // SAFETY: `usable` checked the CPU features; `checked_k` the lengths.
            unsafe { avx512::linear(input, weight, bias, output, k) };
            return;
        }
        if avx2::usable() {
            // SAFETY: as above.
            unsafe { avx2::linear(input, weight, bias, output, k) };
            return;
        }
    }
    portable(input, weight, bias, output, k);
}

/// Checks the slice lengths against each other; returns the inputs per
/// token row, `k`.
fn checked_k(input: &[f32], weight: &Bf16Rows, bias: &[f32], output: &[f32]) -> usize {
    let (k, outputs) = (weight.k, weight.outputs);
    assert_eq!(bias.len(), outputs, "bias shape");
    assert!(input.len().is_multiple_of(k), "input shape");
    assert_eq!(output.len(), input.len() / k * outputs, "output shape");
    k
}

/// The same sums as the AVX2 path, one output at a time.
fn portable(input: &[f32], weight: &Bf16Rows, bias: &[f32], output: &mut [f32], k: usize) {
    let outputs = bias.len();
    let mut widened = vec![0.0f32; k];
    for (o, b) in bias.iter().enumerate() {
        widened
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = weight.get(o, i));
        for (row, out) in input.chunks_exact(k).zip(output.chunks_exact_mut(outputs)) {
            let sum: f32 = row.iter().zip(&widened).map(|(x, y)| x * y).sum();
            out[o] = b + sum;
        }
    }
}

/// How many blocks of weight rows ahead each step prefetches. A tile asks
/// for a block's weights in a burst and then computes on them (from L1, for
/// the next tiles), so the hardware prefetcher, which follows demand, falls
/// behind: without this, a forward pass whose weights (21 MB) come from L3
/// or memory took 1.5-2× longer. One, two or four blocks ahead measure the
/// same within the noise.
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 2;

/// Asks for the weights of the same step `AHEAD` blocks after `w`: 4 rows
/// × 32 bfloat16, 4 cache lines. Past the last block the address is beyond
/// the weights, which a prefetch may use (it never faults), hence
/// `wrapping_add`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(w: *const u16, k: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    const CACHE_LINE: usize = 64;
    let ahead = w.wrapping_add(AHEAD * ROWS * k).cast::<i8>();
    for line in 0..ROWS * STEP * std::mem::size_of::<u16>() / CACHE_LINE {
        // SAFETY: SSE is part of x86_64; a prefetch reads nothing.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * CACHE_LINE)) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{to_bf16, Bf16Rows, ROWS, STEP};

    /// Token rows per tile: 4 tokens × 4 weight rows are 16 sums. Six
    /// (24 sums, 29 registers with the weights and a token) would fit
    /// AVX-512's 32 registers, but the compiler then keeps a third of the
    /// sums on the stack, and a forward pass took 3.2-4.5 ms instead of
    /// 2.0-2.4 (20 tokens).
    const TILE: usize = 4;

    pub(super) fn usable() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }

    /// Callers guarantee [`usable`] and consistent slice lengths.
    #[target_feature(enable = "avx512f,avx512bf16,avx2,fma")]
    pub(super) unsafe fn linear(
        input: &[f32],
        weight: &Bf16Rows,
        bias: &[f32],
        output: &mut [f32],
        k: usize,
    ) {
        let outputs = bias.len();
        let tokens = input.len() / k;
        // Rounded once here, not once per block of weight rows.
        let rounded: Vec<u16> = input.iter().map(|&x| to_bf16(x)).collect();
        let x = rounded.as_ptr();
        let out = output.as_mut_ptr();
        for first_out in (0..outputs).step_by(ROWS) {
            let w = weight.values.as_ptr().add(first_out * k);
            let b = bias.as_ptr().add(first_out);
            let mut row = 0;
            while row < tokens {
                let (x, out) = (x.add(row * k), out.add(row * outputs + first_out));
                let tile = (tokens - row).min(TILE);
                match tile {
                    4 => tile_of::<4>(x, w, b, out, k, outputs),
                    3 => tile_of::<3>(x, w, b, out, k, outputs),
                    2 => tile_of::<2>(x, w, b, out, k, outputs),
                    _ => tile_of::<1>(x, w, b, out, k, outputs),
                }
                row += tile;
            }
        }
    }

    /// Outputs 0..4 (the block of weight rows at `w`) of the `T` token rows
    /// from `x`: `4 T` sums of 16 lanes in registers, each instruction 32
    /// products.
    #[target_feature(enable = "avx512f,avx512bf16,avx2,fma")]
    #[inline]
    unsafe fn tile_of<const T: usize>(
        x: *const u16,
        w: *const u16,
        bias: *const f32,
        out: *mut f32,
        k: usize,
        outputs: usize,
    ) {
        let mut sums = [[_mm512_setzero_ps(); ROWS]; T];
        let mut w = w;
        for step in (0..k).step_by(STEP) {
            super::prefetch_ahead(w, k);
            let weights: [__m512bh; ROWS] = std::array::from_fn(|r| load(w.add(r * STEP)));
            w = w.add(ROWS * STEP);
            for (t, sums) in sums.iter_mut().enumerate() {
                let token = load(x.add(t * k + step));
                for (sum, &weight) in sums.iter_mut().zip(&weights) {
                    *sum = _mm512_dpbf16_ps(*sum, token, weight);
                }
            }
        }
        for (t, [s0, s1, s2, s3]) in sums.into_iter().enumerate() {
            super::avx2::store(
                out.add(t * outputs),
                bias,
                [s0, s1, s2, s3].map(|sum| halves_added(sum)),
            );
        }
    }

    /// 32 bfloat16 values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn load(values: *const u16) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(values.cast()))
    }

    /// The 16 lanes folded to 8 with the same total.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn halves_added(sum: __m512) -> __m256 {
        let low = _mm512_castps512_ps256(sum);
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1));
        _mm256_add_ps(low, high)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Bf16Rows, ROWS, STEP};

    /// Lanes of an AVX2 register of `f32`.
    const LANES: usize = 8;

    pub(super) fn usable() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Callers guarantee [`usable`] and consistent slice lengths.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn linear(
        input: &[f32],
        weight: &Bf16Rows,
        bias: &[f32],
        output: &mut [f32],
        k: usize,
    ) {
        let outputs = bias.len();
        let tokens = input.len() / k;
        let x = input.as_ptr();
        let out = output.as_mut_ptr();
        for first_out in (0..outputs).step_by(ROWS) {
            let w = weight.values.as_ptr().add(first_out * k);
            let b = bias.as_ptr().add(first_out);
            let mut row = 0;
            while row + 3 <= tokens {
                let out = out.add(row * outputs + first_out);
                tile_of::<3>(x.add(row * k), w, b, out, k, outputs);
                row += 3;
            }
            while row < tokens {
                let out = out.add(row * outputs + first_out);
                tile_of::<1>(x.add(row * k), w, b, out, k, outputs);
                row += 1;
            }
        }
    }

    /// Outputs 0..4 (the block of weight rows at `w`) of the `T` token rows
    /// from `x`: `4 T` sums of 8 lanes in registers (T = 3 leaves room for
    /// the weights among AVX2's 16).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_of<const T: usize>(
        x: *const f32,
        w: *const u16,
        bias: *const f32,
        out: *mut f32,
        k: usize,
        outputs: usize,
    ) {
        let mut sums = [[_mm256_setzero_ps(); ROWS]; T];
        let mut w = w;
        for step in (0..k).step_by(STEP) {
            super::prefetch_ahead(w, k);
            for lane in (0..STEP).step_by(LANES) {
                let weights: [__m256; ROWS] =
                    std::array::from_fn(|r| load_weights(w.add(r * STEP + lane)));
                for (t, sums) in sums.iter_mut().enumerate() {
                    let token = _mm256_loadu_ps(x.add(t * k + step + lane));
                    for (sum, &weight) in sums.iter_mut().zip(&weights) {
                        *sum = _mm256_fmadd_ps(token, weight, *sum);
                    }
                }
            }
            w = w.add(ROWS * STEP);
        }
        for (t, sums) in sums.into_iter().enumerate() {
            store(out.add(t * outputs), bias, sums);
        }
    }

    /// Eight weights, widened from bfloat16 (its bits are an `f32`'s top
    /// half).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_weights(w: *const u16) -> __m256 {
        let widened = _mm256_cvtepu16_epi32(_mm_loadu_si128(w.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16))
    }

    /// `out[i] = bias[i] + (sum of the lanes of sums[i])` for i in 0..4.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn store(out: *mut f32, bias: *const f32, sums: [__m256; ROWS]) {
        let [s0, s1, s2, s3] = sums;
        // Two rounds of pairwise horizontal adds leave, per 128-bit half,
        // the four partial sums in order; adding the halves finishes them.
        let s01 = _mm256_hadd_ps(s0, s1);
        let s23 = _mm256_hadd_ps(s2, s3);
        let s0123 = _mm256_hadd_ps(s01, s23);
        let sums = _mm_add_ps(
            _mm256_castps256_ps128(s0123),
            _mm256_extractf128_ps(s0123, 1),
        );
        _mm_storeu_ps(out, _mm_add_ps(sums, _mm_loadu_ps(bias)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(count: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// In f64, with the weights as the kernel sees them, and the inputs
    /// rounded to bfloat16 when the path under test rounds them.
    fn reference(
        input: &[f32],
        weight: &Bf16Rows,
        bias: &[f32],
        k: usize,
        round_inputs: bool,
    ) -> Vec<f32> {
        let input_value = |x: f32| {
            if round_inputs {
                from_bf16(to_bf16(x))
            } else {
                x
            }
        };
        let mut output = Vec::new();
        for row in input.chunks_exact(k) {
            for (o, &b) in bias.iter().enumerate() {
                let sum: f64 = row
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| f64::from(input_value(x)) * f64::from(weight.get(o, i)))
                    .sum();
                output.push((sum + f64::from(b)) as f32);
            }
        }
        output
    }

    type Path = fn(&[f32], &Bf16Rows, &[f32], &mut [f32], usize);

    /// Every path this CPU can run, with whether it rounds the inputs, in
    /// the order `linear` prefers them.
    fn paths() -> Vec<(&'static str, Path, bool)> {
        let mut paths: Vec<(&'static str, Path, bool)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::usable() {
                // SAFETY: checked by `usable`; the shapes come from the test.
                let path: Path = |i, w, b, o, k| unsafe { avx512::linear(i, w, b, o, k) };
                paths.push(("avx512bf16", path, true));
            }
            if avx2::usable() {
                // SAFETY: as above.
                let path: Path = |i, w, b, o, k| unsafe { avx2::linear(i, w, b, o, k) };
                paths.push(("avx2", path, false));
            }
        }
        paths.push(("portable", portable, false));
        paths
    }

    #[test]
    fn every_row_count_and_every_path_match_a_reference() {
        let mut paths_seen = std::collections::BTreeSet::new();
        for (tokens, k, outputs) in [
            (1, 384, 384),
            (2, 384, 1152),
            (3, 32, 4),
            (7, 1536, 384),
            (12, 384, 1536),
            (13, 64, 8),
        ] {
            let input = values(tokens * k, 1);
            // Rows of different magnitudes, so a mixed-up output shows.
            let raw: Vec<f32> = values(outputs * k, 2)
                .chunks_exact(k)
                .enumerate()
                .flat_map(|(o, row)| row.iter().map(move |w| w * (1 + o % 5) as f32))
                .collect();
            let weight = Bf16Rows::from_f32(&raw, k);
            let bias = values(outputs, 3);
            let mut outputs_by_path = Vec::new();
            for (name, path, rounds_inputs) in paths() {
                paths_seen.insert(name);
                let expected = reference(&input, &weight, &bias, k, rounds_inputs);
                let mut got = vec![0.0; tokens * outputs];
                path(&input, &weight, &bias, &mut got, k);
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (g - e).abs() < 1e-3,
                        "{name} {tokens}x{k}x{outputs}[{i}]: {g} vs {e}"
                    );
                }
                outputs_by_path.push(got);
            }
            // The dispatcher takes the first path this CPU can run.
            let mut dispatched = vec![0.0; tokens * outputs];
            linear(&input, &weight, &bias, &mut dispatched);
            assert_eq!(dispatched, outputs_by_path[0], "{tokens}x{k}x{outputs}");
        }
        eprintln!("paths tested: {paths_seen:?}");
    }

    #[test]
    fn bfloat16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), to_bf16(1.0));
        // Just above halfway rounds up.
        assert_eq!(
            from_bf16(to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0)),
            1.0 + 1.0 / 128.0
        );
        for x in values(1000, 5) {
            let back = from_bf16(to_bf16(x * 100.0));
            assert!((back - x * 100.0).abs() <= (x * 100.0).abs() / 256.0, "{x}");
        }
    }

    #[test]
    fn weights_are_read_back_in_the_order_they_were_given() {
        let (k, outputs) = (64, 8);
        let raw = values(outputs * k, 6);
        let weight = Bf16Rows::from_f32(&raw, k);
        assert_eq!(weight.outputs(), outputs);
        for o in 0..outputs {
            for i in 0..k {
                assert_eq!(
                    weight.get(o, i),
                    from_bf16(to_bf16(raw[o * k + i])),
                    "[{o}][{i}]"
                );
            }
        }
    }
}
