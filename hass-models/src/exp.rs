//! `e^x` for `x ≤ 0` as one fixed sequence of f32 operations, scalar and eight lanes
//! at a time with the same bits: softmax weights and SiLU's sigmoid are computed
//! either way (vector bodies, scalar tails) and must not depend on which.

/// Bounds and coefficients of [`exp`]: Cody–Waite reduction by `ln 2` in two parts,
/// then Cephes' `expf` polynomial (relative error ~1e-7 on `[-ln 2 / 2, ln 2 / 2]`).
mod exp_coef {
    /// Below this `x · log2(e)` would leave the normal range; softmax weights this
    /// small (< 1e-37) add nothing next to the maximum's 1.
    pub const MIN: f32 = -87.336_54;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// 1.5 · 2²³: adding and subtracting it rounds to an integer, ties to even.
    pub const ROUND: f32 = 12_582_912.0;
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
}

/// `e^x` for `x ≤ 0` as a fixed sequence of f32 operations, so that [`exp8`] gives the
/// same bits (libm's `expf` differs between platforms and has no vector form here).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    use exp_coef::*;
    let x = x.max(MIN);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut y = P[0];
    for c in &P[1..] {
        y = y.mul_add(r, *c);
    }
    let y = y.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// [`exp`] of eight values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use exp_coef::*;
    use std::arch::x86_64::*;
    // SAFETY: only called from functions compiled with AVX2 and FMA.
    unsafe {
        let x = _mm256_max_ps(x, _mm256_set1_ps(MIN));
        let round = _mm256_set1_ps(ROUND);
        let n = _mm256_sub_ps(
            _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), round),
            round,
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut y = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp` against f64 over softmax's range: within 3e-7 relative (~2.5 ulp), 1 at
    /// 0, clamped below `MIN`, and the vector form gives the same bits.
    #[test]
    fn exp_is_accurate_and_vectorises_bitwise() {
        let xs: Vec<f32> = (0..20_000).map(|i| -(i as f32) * 0.0044).collect();
        assert_eq!(exp(0.0), 1.0);
        for &x in &xs {
            let (want, got) = ((x as f64).exp(), exp(x) as f64);
            if x >= exp_coef::MIN {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert!(got <= 1.2e-38, "exp({x}) = {got}: clamped to exp(MIN)");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn eight(x: &[f32]) -> [f32; 8] {
                use std::arch::x86_64::*;
                let mut out = [0f32; 8];
                // SAFETY: x holds 8 floats; the caller checked AVX2 and FMA.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr()))) };
                out
            }
            for ch in xs.chunks_exact(8) {
                // SAFETY: checked above.
                let v = unsafe { eight(ch) };
                for (x, y) in ch.iter().zip(v) {
                    assert_eq!(exp(*x).to_bits(), y.to_bits(), "exp8({x})");
                }
            }
        }
    }
}
