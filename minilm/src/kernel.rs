//! The one hot loop: a linear layer, `y = x Wᵀ + b`, for a few to a few
//! hundred token rows against weights stored one output per row.
//!
//! Each output is a dot product of a token row with a weight row, both
//! contiguous, so no operand is packed. Blocks of 3 token rows × 4 weight
//! rows keep 12 sums in AVX registers; a block of weight rows (4 × 0.4-1.5
//! KB) stays in L1 while every token row passes by, so each weight is read
//! from memory once per call. Without AVX2 and FMA a portable loop does the
//! same.
//!
//! The weights are int8 with one `f32` scale per weight row (symmetric:
//! the row's largest magnitude maps to ±127), widened to `f32` as they are
//! loaded; sums are `f32`, scaled once per output at the end. For a short
//! text the forward pass is bound by reading the weights from memory
//! (~5 GB/s here), so half the bytes of `f16` weights is about half the
//! time: 12 tokens × 384 × 1536 take 0.20 ms, against 0.43 ms with `f16`.
//! The price is accuracy: the embeddings keep a cosine of 0.9995 to the
//! `f32` reference (tests/embedder.rs in elaaoms-shared). A scale per 32
//! weights of a row (llama.cpp's Q8_0) reaches 0.9998, but multiplying
//! each weight by its scale makes the call 25% slower; choosing each
//! row's scale for the least squared error did not help.

/// Weight rows quantised to int8: `weight[o][i] ≈ scales[o] · values[o·k + i]`.
pub struct Int8Rows {
    values: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Rows {
    /// Quantises `f32` weight rows of `k` inputs each (one row per output),
    /// rounding to the nearest step of the row's scale.
    pub fn quantize(weights: &[f32], k: usize) -> Self {
        assert!(k > 0 && weights.len().is_multiple_of(k), "weight shape");
        let mut values = Vec::with_capacity(weights.len());
        let scales = weights
            .chunks_exact(k)
            .map(|row| {
                let largest = row.iter().fold(0.0f32, |m, w| m.max(w.abs()));
                let scale = largest / 127.0;
                // An all-zero row keeps scale 0 and values 0 (no 0 / 0).
                let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                values.extend(row.iter().map(|w| (w * inverse).round() as i8));
                scale
            })
            .collect();
        Self { values, scales }
    }

    pub fn outputs(&self) -> usize {
        self.scales.len()
    }
}

/// `output[t][o] = bias[o] + Σ_k input[t][k] · weight[o][k]`, with
/// `input` `tokens × k`, `weight` `outputs × k`, `output` `tokens × outputs`.
pub fn linear(input: &[f32], weight: &Int8Rows, bias: &[f32], output: &mut [f32]) {
    let outputs = bias.len();
    assert!(outputs > 0 && weight.outputs() == outputs, "weight shape");
    let k = weight.values.len() / outputs;
    assert!(k > 0 && input.len().is_multiple_of(k), "input shape");
    let tokens = input.len() / k;
    assert_eq!(output.len(), tokens * outputs, "output shape");

    #[cfg(target_arch = "x86_64")]
    if k.is_multiple_of(8)
        && outputs.is_multiple_of(4)
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), and the
        // shapes were checked: k is a multiple of 8, outputs of 4.
        unsafe { avx2::linear(input, weight, bias, output, k) };
        return;
    }
    portable(input, weight, bias, output, k);
}

/// The same sums as the AVX2 path: of `input × value`, scaled at the end.
fn portable(input: &[f32], weight: &Int8Rows, bias: &[f32], output: &mut [f32], k: usize) {
    let outputs = bias.len();
    let mut widened = vec![0.0f32; k];
    let rows = weight.values.chunks_exact(k).zip(&weight.scales);
    for (o, ((w, scale), b)) in rows.zip(bias).enumerate() {
        widened
            .iter_mut()
            .zip(w)
            .for_each(|(x, &value)| *x = f32::from(value));
        for (row, out) in input.chunks_exact(k).zip(output.chunks_exact_mut(outputs)) {
            let sum: f32 = row.iter().zip(&widened).map(|(x, y)| x * y).sum();
            out[o] = b + scale * sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Int8Rows;

    /// Callers guarantee AVX2 and FMA, `k % 8 == 0` and `outputs % 4 == 0`,
    /// and consistent slice lengths (checked by `super::linear`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn linear(
        input: &[f32],
        weight: &Int8Rows,
        bias: &[f32],
        output: &mut [f32],
        k: usize,
    ) {
        let outputs = bias.len();
        let tokens = input.len() / k;
        let x = input.as_ptr();
        let out = output.as_mut_ptr();
        for first_out in (0..outputs).step_by(4) {
            let w = weight.values.as_ptr().add(first_out * k);
            let scale = weight.scales.as_ptr().add(first_out);
            let b = bias.as_ptr().add(first_out);
            let mut row = 0;
            while row + 3 <= tokens {
                three_rows(
                    x.add(row * k),
                    w,
                    (scale, b),
                    out.add(row * outputs + first_out),
                    k,
                    outputs,
                );
                row += 3;
            }
            while row < tokens {
                one_row(
                    x.add(row * k),
                    w,
                    (scale, b),
                    out.add(row * outputs + first_out),
                    k,
                );
                row += 1;
            }
        }
    }

    /// Eight weights, widened from int8 (the 8-byte load folds into the
    /// sign extension).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_weights(w: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(w.cast::<__m128i>())))
    }

    /// Outputs 0..4 (weight rows `w`, `w + k`, ...) of token rows `x`,
    /// `x + k`, `x + 2k`: twelve sums in registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn three_rows(
        x: *const f32,
        w: *const i8,
        scale_bias: (*const f32, *const f32),
        out: *mut f32,
        k: usize,
        outputs: usize,
    ) {
        let (mut s00, mut s01, mut s02, mut s03) = zeros();
        let (mut s10, mut s11, mut s12, mut s13) = zeros();
        let (mut s20, mut s21, mut s22, mut s23) = zeros();
        let mut step = 0;
        while step < k {
            let x0 = _mm256_loadu_ps(x.add(step));
            let x1 = _mm256_loadu_ps(x.add(k + step));
            let x2 = _mm256_loadu_ps(x.add(2 * k + step));
            let w0 = load_weights(w.add(step));
            s00 = _mm256_fmadd_ps(x0, w0, s00);
            s10 = _mm256_fmadd_ps(x1, w0, s10);
            s20 = _mm256_fmadd_ps(x2, w0, s20);
            let w1 = load_weights(w.add(k + step));
            s01 = _mm256_fmadd_ps(x0, w1, s01);
            s11 = _mm256_fmadd_ps(x1, w1, s11);
            s21 = _mm256_fmadd_ps(x2, w1, s21);
            let w2 = load_weights(w.add(2 * k + step));
            s02 = _mm256_fmadd_ps(x0, w2, s02);
            s12 = _mm256_fmadd_ps(x1, w2, s12);
            s22 = _mm256_fmadd_ps(x2, w2, s22);
            let w3 = load_weights(w.add(3 * k + step));
            s03 = _mm256_fmadd_ps(x0, w3, s03);
            s13 = _mm256_fmadd_ps(x1, w3, s13);
            s23 = _mm256_fmadd_ps(x2, w3, s23);
            step += 8;
        }
        store(out, scale_bias, s00, s01, s02, s03);
        store(out.add(outputs), scale_bias, s10, s11, s12, s13);
        store(out.add(2 * outputs), scale_bias, s20, s21, s22, s23);
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn one_row(
        x: *const f32,
        w: *const i8,
        scale_bias: (*const f32, *const f32),
        out: *mut f32,
        k: usize,
    ) {
        let (mut s0, mut s1, mut s2, mut s3) = zeros();
        let mut step = 0;
        while step < k {
            let x0 = _mm256_loadu_ps(x.add(step));
            s0 = _mm256_fmadd_ps(x0, load_weights(w.add(step)), s0);
            s1 = _mm256_fmadd_ps(x0, load_weights(w.add(k + step)), s1);
            s2 = _mm256_fmadd_ps(x0, load_weights(w.add(2 * k + step)), s2);
            s3 = _mm256_fmadd_ps(x0, load_weights(w.add(3 * k + step)), s3);
            step += 8;
        }
        store(out, scale_bias, s0, s1, s2, s3);
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn zeros() -> (__m256, __m256, __m256, __m256) {
        let zero = _mm256_setzero_ps();
        (zero, zero, zero, zero)
    }

    /// `out[i] = bias[i] + scale[i] · (sum of the lanes of s_i)` for i in 0..4.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store(
        out: *mut f32,
        (scale, bias): (*const f32, *const f32),
        s0: __m256,
        s1: __m256,
        s2: __m256,
        s3: __m256,
    ) {
        // Two rounds of pairwise horizontal adds leave, per 128-bit half,
        // the four partial sums in order; adding the halves finishes them.
        let s01 = _mm256_hadd_ps(s0, s1);
        let s23 = _mm256_hadd_ps(s2, s3);
        let s0123 = _mm256_hadd_ps(s01, s23);
        let sums = _mm_add_ps(
            _mm256_castps256_ps128(s0123),
            _mm256_extractf128_ps(s0123, 1),
        );
        _mm_storeu_ps(
            out,
            _mm_fmadd_ps(sums, _mm_loadu_ps(scale), _mm_loadu_ps(bias)),
        );
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

    /// In f64, with the weights as the kernel sees them (dequantised).
    fn reference(input: &[f32], weight: &Int8Rows, bias: &[f32], k: usize) -> Vec<f32> {
        let mut output = Vec::new();
        for row in input.chunks_exact(k) {
            let weight_rows = weight.values.chunks_exact(k).zip(&weight.scales);
            for ((w, &scale), &b) in weight_rows.zip(bias) {
                let sum: f64 = row
                    .iter()
                    .zip(w)
                    .map(|(x, &y)| f64::from(*x) * f64::from(scale) * f64::from(y))
                    .sum();
                output.push((sum + f64::from(b)) as f32);
            }
        }
        output
    }

    #[test]
    fn every_row_count_and_both_paths_match_a_reference() {
        for (tokens, k, outputs) in [
            (1, 384, 384),
            (2, 384, 1152),
            (3, 8, 4),
            (7, 1536, 384),
            (12, 384, 1536),
            (5, 12, 6),
        ] {
            let input = values(tokens * k, 1);
            // Rows of different magnitudes, so a scale applied to the wrong
            // output shows.
            let raw: Vec<f32> = values(outputs * k, 2)
                .chunks_exact(k)
                .enumerate()
                .flat_map(|(o, row)| row.iter().map(move |w| w * (1 + o % 5) as f32))
                .collect();
            let weight = Int8Rows::quantize(&raw, k);
            let bias = values(outputs, 3);
            let expected = reference(&input, &weight, &bias, k);
            let mut fast = vec![0.0; tokens * outputs];
            linear(&input, &weight, &bias, &mut fast);
            let mut slow = vec![0.0; tokens * outputs];
            portable(&input, &weight, &bias, &mut slow, k);
            for (i, ((f, s), e)) in fast.iter().zip(&slow).zip(&expected).enumerate() {
                assert!(
                    (f - e).abs() < 1e-3,
                    "{tokens}x{k}x{outputs}[{i}]: {f} vs {e}"
                );
                assert!(
                    (s - e).abs() < 1e-3,
                    "{tokens}x{k}x{outputs}[{i}]: {s} vs {e}"
                );
            }
        }
    }

    #[test]
    fn quantising_rounds_each_row_to_its_own_step() {
        let k = 64;
        let mut raw = values(3 * k, 4);
        raw[k..2 * k].fill(0.0);
        raw[2 * k + 5] = -10.0;
        let weight = Int8Rows::quantize(&raw, k);
        assert_eq!(weight.scales[1], 0.0);
        assert_eq!(weight.scales[2], 10.0 / 127.0);
        assert_eq!(weight.values[2 * k + 5], -127);
        for (o, row) in raw.chunks_exact(k).enumerate() {
            let scale = weight.scales[o];
            for (i, w) in row.iter().enumerate() {
                let back = scale * f32::from(weight.values[o * k + i]);
                assert!((back - w).abs() <= scale / 2.0 * 1.0001, "[{o}][{i}]");
            }
        }
    }
}
