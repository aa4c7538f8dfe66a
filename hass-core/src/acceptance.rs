//! Acceptance of a verified draft tree (spec §4.6), without tensors.
//!
//! The target has run once over every node of a [`DraftTree`]; its output at
//! node i is the next-token distribution after the tokens root..i. Greedy
//! decoding accepts the longest path that matches the target's argmax; sampling
//! uses the multi-candidate rule for a deterministic draft (q ≡ 1), whose
//! output — accepted tokens, then the bonus token — has exactly the target's
//! distribution.

use rand::Rng;

use crate::error::{HassError, Result};
use crate::tree::DraftTree;

/// Outcome of one verification round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Node indices from the root (node 0) to the last accepted node. Its
    /// length is A + 1, A = accepted draft tokens; these are the KV slots to
    /// commit (the reference's `retrieve_indices[best, :A+1]`).
    pub path: Vec<usize>,
    /// Token drawn from the target after the last accepted node: the next root.
    pub bonus: u32,
}

impl Accepted {
    /// A: the number of accepted draft tokens, root excluded.
    pub fn num_accepted(&self) -> usize {
        self.path.len() - 1
    }

    /// The last accepted node (the root when nothing was accepted).
    pub fn last_node(&self) -> usize {
        *self.path.last().expect("path holds at least the root")
    }

    /// Tokens of the accepted draft nodes, root excluded.
    pub fn accepted_tokens(&self, tree: &DraftTree) -> Vec<u32> {
        self.path[1..].iter().map(|&i| tree.tokens()[i]).collect()
    }

    /// The new tokens this round generates after the root: the accepted draft
    /// tokens, then the bonus.
    pub fn emitted_tokens(&self, tree: &DraftTree) -> Vec<u32> {
        let mut out = self.accepted_tokens(tree);
        out.push(self.bonus);
        out
    }
}

/// Greedy acceptance: the longest root-down path whose every node's token equals
/// the target argmax at its parent (`target_argmax[i]` = argmax of the target's
/// logits at node i, one per node). Among equally long paths, the one reached
/// first when the leaves are scanned in increasing index (the reference's
/// retrieve order) wins. The bonus is the argmax at the last accepted node.
pub fn greedy_accept(tree: &DraftTree, target_argmax: &[u32]) -> Result<Accepted> {
    if target_argmax.len() != tree.len() {
        return Err(HassError::InvalidArgument(format!(
            "greedy acceptance needs one target argmax per tree node: {} nodes, {} argmax \
             values",
            tree.len(),
            target_argmax.len()
        )));
    }
    let tokens = tree.tokens();
    let mut best: Vec<usize> = vec![0];
    for leaf in tree.leaves() {
        let path = tree.path_to(leaf);
        if path.len() <= best.len() {
            continue;
        }
        let mut a = 0;
        while a + 1 < path.len() && tokens[path[a + 1]] == target_argmax[path[a]] {
            a += 1;
        }
        if a + 1 > best.len() {
            best = path[..=a].to_vec();
        }
    }
    let bonus = target_argmax[*best.last().unwrap()];
    Ok(Accepted { path: best, bonus })
}

/// The random events of [`sample_accept_with`]. [`RngCoin`] draws them; a test
/// can instead enumerate every outcome with its probability.
pub trait AcceptCoin {
    /// `true` with probability `p` (`0 ≤ p ≤ 1`; p = 1 must give `true` and
    /// p = 0 `false`).
    fn accept(&mut self, p: f64) -> bool;
    /// Index `i` with probability `weights[i] / Σ weights`. Weights are ≥ 0 with
    /// a positive sum; zero weights must never be drawn.
    fn draw(&mut self, weights: &[f64]) -> usize;
}

/// [`AcceptCoin`] backed by an RNG: one `f64` uniform `u ∈ [0, 1)` per event.
/// `accept(p)` is `u < p`; `draw` is the inverse CDF of `u·Σw`, as
/// [`crate::sampling::sample_from`].
#[derive(Debug)]
pub struct RngCoin<'a, R: ?Sized>(pub &'a mut R);

impl<R: Rng + ?Sized> AcceptCoin for RngCoin<'_, R> {
    fn accept(&mut self, p: f64) -> bool {
        let u: f64 = self.0.random();
        u < p
    }

    fn draw(&mut self, weights: &[f64]) -> usize {
        let u: f64 = self.0.random();
        let total: f64 = weights.iter().filter(|&&w| w > 0.0).sum();
        let target = u * total;
        let mut cum = 0.0f64;
        let mut last = 0usize;
        for (i, &w) in weights.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            cum += w;
            last = i;
            if cum > target {
                return i;
            }
        }
        // Rounding left `target` at or past the final sum.
        last
    }
}

/// Σ g with eight independent accumulators (vectorisable; vocabularies reach
/// 150k entries and the sum is redone after every rejection).
fn mass(g: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = g.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// Sampling acceptance with an RNG; see [`sample_accept_with`].
pub fn sample_accept<R, F>(tree: &DraftTree, target_probs: F, rng: &mut R) -> Result<Accepted>
where
    R: Rng + ?Sized,
    F: FnMut(usize, &mut Vec<f32>),
{
    sample_accept_with(tree, target_probs, &mut RngCoin(rng))
}

/// Multi-candidate speculative sampling on the tree for a deterministic draft
/// (spec §4.6 with q ≡ 1, the fixed variant that uses the processed
/// distribution in every branch).
///
/// `target_probs(i, out)` must write into `out` (cleared beforehand) the
/// target's *processed* next-token probabilities at node i (temperature, top-p,
/// top-k applied, e.g. [`crate::sampling::LogitsProcessor::probs_into`]); it is
/// called only for the nodes the walk visits. Entries that are negative, NaN or
/// infinite count as 0; the rest need not sum to 1 — they are used as weights.
///
/// Starting at the root, with `g` the weights of the current node:
/// 1. For each child of the node in increasing node index (the reference's
///    lexicographically sorted retrieve rows), skipping a child whose token was
///    already tried at this node: accept it iff `coin.accept(g[x] / Σg)` (one
///    uniform `u < g[x]/Σg`); on rejection set `g[x] = 0` (Σg is recomputed,
///    i.e. the residual is renormalised).
/// 2. If a child was accepted, move to it and repeat with its weights.
/// 3. Otherwise the bonus is `coin.draw(g)`: from the residual after the
///    rejections, or from the node's own distribution at a leaf.
///
/// Each token x is thus emitted next with probability g(x): accepted directly
/// with g(x)/Σg, or, after rejecting tokens R, drawn from the residual with the
/// complementary probability — so the accepted tokens followed by the bonus are
/// distributed exactly as sampling them one by one from the target.
///
/// Errors: a visited node whose weights have no positive mass, a child token
/// outside the distribution's vocabulary, or a coin that rejects a certain
/// acceptance.
pub fn sample_accept_with<C, F>(
    tree: &DraftTree,
    mut target_probs: F,
    coin: &mut C,
) -> Result<Accepted>
where
    C: AcceptCoin + ?Sized,
    F: FnMut(usize, &mut Vec<f32>),
{
    let tokens = tree.tokens();
    let mut path = vec![0usize];
    let mut node = 0usize;
    let mut buf: Vec<f32> = Vec::new();
    let mut g: Vec<f64> = Vec::new();
    let mut tried: Vec<u32> = Vec::new();
    loop {
        buf.clear();
        target_probs(node, &mut buf);
        g.clear();
        g.extend(buf.iter().map(|&p| {
            if p > 0.0 && p.is_finite() {
                p as f64
            } else {
                0.0
            }
        }));
        let mut total = mass(&g);
        if !(total > 0.0 && total.is_finite()) {
            return Err(HassError::InvalidArgument(format!(
                "target distribution at tree node {node} has no positive mass (vocabulary {})",
                g.len()
            )));
        }
        tried.clear();
        let mut next = None;
        for &child in tree.children(node) {
            let x = tokens[child];
            if tried.contains(&x) {
                continue;
            }
            tried.push(x);
            let xi = x as usize;
            if xi >= g.len() {
                return Err(HassError::InvalidArgument(format!(
                    "draft token {x} at tree node {child} is outside the target vocabulary of {}",
                    g.len()
                )));
            }
            if coin.accept(g[xi] / total) {
                next = Some(child);
                break;
            }
            g[xi] = 0.0;
            // Recomputed rather than decremented, so that a lone remaining token
            // gets probability exactly 1.
            total = mass(&g);
            if total <= 0.0 {
                return Err(HassError::InvalidArgument(format!(
                    "acceptance coin rejected token {x} at tree node {child}, which had \
                     probability 1"
                )));
            }
        }
        match next {
            Some(child) => {
                path.push(child);
                node = child;
            }
            None => {
                let bonus = coin.draw(&g) as u32;
                return Ok(Accepted { path, bonus });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn chain() -> DraftTree {
        // root(9) → 1 → 2, and root → 3.
        DraftTree::from_parents(vec![9, 1, 2, 3], vec![None, Some(0), Some(1), Some(0)]).unwrap()
    }

    #[test]
    fn greedy_basic() {
        let t = chain();
        let a = greedy_accept(&t, &[1, 2, 5, 0]).unwrap();
        assert_eq!(a.path, vec![0, 1, 2]);
        assert_eq!(a.bonus, 5);
        assert_eq!(a.emitted_tokens(&t), vec![1, 2, 5]);
        let a = greedy_accept(&t, &[3, 2, 5, 4]).unwrap();
        assert_eq!(a.path, vec![0, 3]);
        assert_eq!(a.bonus, 4);
        let a = greedy_accept(&t, &[7, 2, 5, 4]).unwrap();
        assert_eq!((a.path, a.bonus), (vec![0], 7));
        assert!(greedy_accept(&t, &[1, 2]).is_err());
    }

    #[test]
    fn sampling_one_hot_targets() {
        let t = chain();
        let table = [
            vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            vec![0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let a = sample_accept(&t, |i, out| out.extend_from_slice(&table[i]), &mut rng).unwrap();
            assert_eq!((a.path.clone(), a.bonus), (vec![0, 1, 2], 5));
        }
        // No mass, or a token outside the vocabulary.
        assert!(sample_accept(&t, |_, out| out.extend([0.0f32; 6]), &mut rng).is_err());
        assert!(sample_accept(&t, |_, out| out.extend([0.5f32, 0.5]), &mut rng).is_err());
    }
}
