//! HASS harmonized context alignment (spec §3.5): which feature stream supplies the
//! key/value of column `c` for query row `r` in forward `n` (`n` streams).
//!
//! Stream 0 holds the target features `F`; stream `j ≥ 1` holds the (shifted,
//! detached) predictions of forward `j`. Row `r` reads column `c ≤ r` from stream
//! `s(r, c) = max(0, c − r + n − 1)`; columns `c > r` are masked. So stream 0 serves
//! `c ≤ r − n + 1` and stream `j ≥ 1` serves exactly the diagonal `c = r − n + 1 + j`.
//! With `n = 1` this is the plain causal mask.

/// `map[r][c]`: the stream that supplies key/value `c` to query row `r`
/// (`None` above the diagonal, i.e. masked). `n ≥ 1`.
pub fn source_map(l: usize, n: usize) -> Vec<Vec<Option<usize>>> {
    assert!(n >= 1, "source_map needs at least one stream");
    (0..l)
        .map(|r| {
            (0..l)
                .map(|c| (c <= r).then(|| (c + n - 1).saturating_sub(r)))
                .collect()
        })
        .collect()
}

/// The `n` disjoint 0/1 masks of §3.5, each `l × l` row-major: `masks[j][r * l + c]`
/// is true when stream `j` supplies column `c` to row `r`. Their union is the causal
/// lower triangle.
pub fn stream_masks(l: usize, n: usize) -> Vec<Vec<bool>> {
    let map = source_map(l, n);
    (0..n)
        .map(|j| {
            map.iter()
                .flat_map(|row| row.iter().map(move |s| *s == Some(j)))
                .collect()
        })
        .collect()
}

/// For a draft stream `j ≥ 1` (of `n`), the row-minus-column offset of the one
/// column it serves: row `r` reads position `r − (n − 1 − j)` from it (when `≥ 0`).
/// The batched forward relies on this diagonal structure.
pub fn diagonal_offset(n: usize, j: usize) -> usize {
    assert!(j >= 1 && j < n, "stream {j} of {n} is not a draft stream");
    n - 1 - j
}
