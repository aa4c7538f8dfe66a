//! EAGLE-2 draft token trees without tensors (spec §4.3–§4.4).
//!
//! [`TreeBuilder`] does the bookkeeping of the dynamic tree growth
//! (`topK_genrate`): cumulative scores, the frontier of `top_k` nodes to expand
//! at each of the `depth` steps, the global candidate numbering and the draft's
//! tree attention mask. The caller runs the draft model on the frontier and
//! feeds back each frontier node's top-k children. [`TreeBuilder::finish`]
//! selects the `total_tokens` best candidates (closed under ancestors) and
//! returns a [`DraftTree`], which provides the target's verify buffers: tokens,
//! tree mask, positions and root→leaf paths.
//!
//! # Example
//! ```
//! use hass_core::tree::{TreeBuilder, TreeParams};
//! let params = TreeParams::new(3, 2, 2).unwrap();
//! // Root token 7; the draft's top-2 after the root are 10 (log p −0.1) and 11 (−0.4).
//! let mut b = TreeBuilder::new(params, 7, &[10, 11], &[-0.1, -0.4]).unwrap();
//! while !b.is_done() {
//!     // Run the draft on b.frontier_tokens() at positions n + b.position_offset()
//!     // with b.frontier_mask(); here: fixed top-2 children of each frontier row.
//!     b.expand(&[20, 21, 22, 23], &[-0.2, -1.0, -0.3, -2.0]).unwrap();
//! }
//! let tree = b.finish();
//! assert_eq!(tree.len(), 4); // root + total_tokens
//! assert_eq!(tree.tokens(), &[7, 10, 11, 20]);
//! assert_eq!(tree.depths(), &[0, 1, 1, 2]);
//! ```

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::error::{HassError, Result};

/// Shape of the draft tree.
///
/// `total_tokens` counts the draft nodes kept for verification **excluding the
/// root**, so the target verifies `total_tokens + 1` tokens per round. The
/// reference scripts' `total_token = 60` is `total_tokens = 59` here (see
/// [`TreeParams::from_total_token`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeParams {
    /// Draft nodes selected for verification, excluding the root.
    pub total_tokens: usize,
    /// Number of draft forwards (expansion steps) during growth; candidates reach
    /// tree depth `depth + 1`. `0` drafts from the level-1 candidates alone (the
    /// draft's prediction made when the previous round committed): no draft forward
    /// at all, which pays off where draft forwards are expensive (CPU).
    pub depth: usize,
    /// Children per expanded node and width of the frontier.
    pub top_k: usize,
}

impl Default for TreeParams {
    /// The EAGLE/HASS evaluation defaults: `total_token = 60` (59 draft nodes plus
    /// the root), depth 5, top-k 10.
    fn default() -> Self {
        Self {
            total_tokens: 59,
            depth: 5,
            top_k: 10,
        }
    }
}

impl TreeParams {
    /// Checked constructor; see [`TreeParams::validate`].
    pub fn new(total_tokens: usize, depth: usize, top_k: usize) -> Result<Self> {
        let p = Self {
            total_tokens,
            depth,
            top_k,
        };
        p.validate()?;
        Ok(p)
    }

    /// From the reference implementation's `total_token`, which counts the root:
    /// `total_tokens = total_token − 1`.
    pub fn from_total_token(total_token: usize, depth: usize, top_k: usize) -> Result<Self> {
        if total_token < 2 {
            return Err(HassError::InvalidArgument(format!(
                "total_token (draft nodes plus the root) must be >= 2, got {total_token}"
            )));
        }
        Self::new(total_token - 1, depth, top_k)
    }

    /// `top_k ≥ 1`, `total_tokens ≥ 1`, and `total_tokens` at most the
    /// number of candidates growth produces, `top_k + depth·top_k²`.
    pub fn validate(&self) -> Result<()> {
        if self.top_k == 0 {
            return Err(HassError::InvalidArgument(
                "tree top_k must be >= 1, got 0".into(),
            ));
        }
        if self.total_tokens == 0 {
            return Err(HassError::InvalidArgument(
                "tree total_tokens (draft nodes excluding the root) must be >= 1, got 0".into(),
            ));
        }
        let cands = self.num_candidates();
        if self.total_tokens > cands {
            return Err(HassError::InvalidArgument(format!(
                "tree total_tokens = {} exceeds the {} candidates that top_k = {} and depth = {} \
                 produce (top_k + depth·top_k²)",
                self.total_tokens, cands, self.top_k, self.depth
            )));
        }
        Ok(())
    }

    /// Candidates produced by a full growth: `top_k + depth·top_k²` (saturating).
    pub fn num_candidates(&self) -> usize {
        self.top_k.saturating_add(
            self.depth
                .saturating_mul(self.top_k.saturating_mul(self.top_k)),
        )
    }

    /// Nodes of a finished tree, root included: `total_tokens + 1`.
    pub fn num_nodes(&self) -> usize {
        self.total_tokens + 1
    }
}

/// Score used for ranking: NaN ranks like −∞.
fn rank_score(s: f32) -> f32 {
    if s.is_nan() {
        f32::NEG_INFINITY
    } else {
        s
    }
}

/// The ranking order of candidates: higher cumulative score first, then lower
/// global index. `Less` means `a` ranks before `b`. `-0.0` and `0.0` tie.
fn cmp_rank(a: (f32, usize), b: (f32, usize)) -> Ordering {
    let (sa, sb) = (rank_score(a.0), rank_score(b.0));
    sb.partial_cmp(&sa)
        .unwrap_or(Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Heap entry whose maximum is the first-ranked candidate.
#[derive(Clone, Copy)]
struct Ranked {
    score: f32,
    index: usize,
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_rank((other.score, other.index), (self.score, self.index))
    }
}

/// Tensor-free bookkeeping of EAGLE-2's dynamic draft-tree growth (spec §4.3).
///
/// Candidates get the global numbering of the reference: level 1 is `0..k`, level
/// `j ≥ 2` is `k + (j−2)·k² .. k + (j−1)·k²`, laid out row-major as (frontier row
/// `a` of the expanding step, child rank `b`).
///
/// Protocol, with `k = top_k`:
/// 1. [`TreeBuilder::new`] with the root token and the draft's top-k after the
///    root (tokens and log-probs; this is the last row of the draft's pass over
///    the committed context). The first frontier is these k level-1 nodes, in the
///    given order.
/// 2. While ![`is_done`](TreeBuilder::is_done) (`depth` times): run the draft on
///    the frontier — [`frontier_tokens`](TreeBuilder::frontier_tokens), hidden
///    states picked by [`frontier_parent_rows`](TreeBuilder::frontier_parent_rows),
///    every row at position `n + position_offset()`, attention over the tree
///    columns by [`frontier_mask`](TreeBuilder::frontier_mask) — then pass each
///    row's top-k children to [`expand`](TreeBuilder::expand).
/// 3. [`finish`](TreeBuilder::finish).
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    params: TreeParams,
    root: u32,
    /// Per candidate (global index): token, cumulative log-prob, parent candidate
    /// (`None` = the root).
    tokens: Vec<u32>,
    scores: Vec<f32>,
    parent: Vec<Option<usize>>,
    /// Global indices of the nodes to expand next, in row order.
    frontier: Vec<usize>,
    frontier_tokens: Vec<u32>,
    parent_rows: Vec<usize>,
    /// k × k·(step+1), row-major.
    mask: Vec<bool>,
    step: usize,
}

impl TreeBuilder {
    /// Starts growth from `root` and the draft's level-1 top-k: `tokens[r]` with
    /// log-prob `log_probs[r]`, both of length `top_k`.
    pub fn new(params: TreeParams, root: u32, tokens: &[u32], log_probs: &[f32]) -> Result<Self> {
        params.validate()?;
        let k = params.top_k;
        if tokens.len() != k || log_probs.len() != k {
            return Err(HassError::InvalidArgument(format!(
                "tree level 1 needs top_k = {k} tokens and log-probs, got {} tokens and {} \
                 log-probs",
                tokens.len(),
                log_probs.len()
            )));
        }
        let cap = params.num_candidates();
        let mut b = Self {
            params,
            root,
            tokens: Vec::with_capacity(cap),
            scores: Vec::with_capacity(cap),
            parent: Vec::with_capacity(cap),
            frontier: (0..k).collect(),
            frontier_tokens: tokens.to_vec(),
            parent_rows: vec![0; k],
            mask: Vec::with_capacity(k * k * (params.depth + 1)),
            step: 0,
        };
        b.tokens.extend_from_slice(tokens);
        b.scores.extend_from_slice(log_probs);
        b.parent.resize(k, None);
        // I_k.
        b.mask.resize(k * k, false);
        for r in 0..k {
            b.mask[r * k + r] = true;
        }
        Ok(b)
    }

    pub fn params(&self) -> &TreeParams {
        &self.params
    }

    pub fn root(&self) -> u32 {
        self.root
    }

    /// Expansion steps done so far (0..=depth).
    pub fn step(&self) -> usize {
        self.step
    }

    /// All `depth` expansion steps are done; only [`finish`](Self::finish) remains.
    pub fn is_done(&self) -> bool {
        self.step >= self.params.depth
    }

    /// Candidates recorded so far: `top_k + step·top_k²`.
    pub fn num_candidates(&self) -> usize {
        self.tokens.len()
    }

    /// Tokens of the k frontier rows: the draft's `input_ids` for this step.
    pub fn frontier_tokens(&self) -> &[u32] {
        &self.frontier_tokens
    }

    /// Global candidate indices of the frontier rows (for diagnostics and tests).
    pub fn frontier_indices(&self) -> &[usize] {
        &self.frontier
    }

    /// Cumulative log-probs of the frontier rows.
    pub fn frontier_scores(&self) -> Vec<f32> {
        self.frontier.iter().map(|&g| self.scores[g]).collect()
    }

    /// For each frontier row, the row of the previous draft output whose hidden
    /// state it takes (`cur_hidden = out[parent_row]`). At step 0 all are 0: every
    /// level-1 node takes the root's hidden state (the last row of the context
    /// pass), repeated k times.
    pub fn frontier_parent_rows(&self) -> &[usize] {
        &self.parent_rows
    }

    /// Position of the frontier relative to the draft's `len_posi` (= n, the
    /// number of committed-context pairs): all k rows use position `n + step`.
    /// A node at tree depth d (root 0) is drafted at `n + d − 1`; the target
    /// verifies it at `n + d`.
    pub fn position_offset(&self) -> usize {
        self.step
    }

    /// Columns of [`frontier_mask`](Self::frontier_mask): `k·(step + 1)`, the tree
    /// entries in the draft KV once this step's rows are appended.
    pub fn frontier_mask_cols(&self) -> usize {
        self.params.top_k * (self.step + 1)
    }

    /// The draft's tree attention mask for this step, row-major
    /// `k × frontier_mask_cols()`. Column `j·k + c` is the KV entry written by
    /// row `c` of step `j` (j = step is the frontier itself); an entry is true iff
    /// that node is an ancestor of the row's node or the node itself. Context
    /// columns (the committed prefix) are always visible and not included.
    pub fn frontier_mask(&self) -> &[bool] {
        &self.mask
    }

    /// Records the draft's top-k children of every frontier row: row-major
    /// `k × k`, `child_tokens[a·k + b]` is the b-th child of frontier row `a` with
    /// log-prob `child_log_probs[a·k + b]`. Cumulative score = log-prob + parent's
    /// cumulative score (f32). The next frontier is the k best of the k² children
    /// by cumulative score, ties broken by lower index.
    pub fn expand(&mut self, child_tokens: &[u32], child_log_probs: &[f32]) -> Result<()> {
        let k = self.params.top_k;
        if self.is_done() {
            return Err(HassError::InvalidArgument(format!(
                "tree growth already ran its depth = {} steps",
                self.params.depth
            )));
        }
        if child_tokens.len() != k * k || child_log_probs.len() != k * k {
            return Err(HassError::InvalidArgument(format!(
                "tree expansion needs top_k² = {} child tokens and log-probs (k rows of k), got \
                 {} tokens and {} log-probs",
                k * k,
                child_tokens.len(),
                child_log_probs.len()
            )));
        }
        let base = self.tokens.len();
        for a in 0..k {
            let p = self.frontier[a];
            let ps = self.scores[p];
            for b in 0..k {
                let i = a * k + b;
                self.tokens.push(child_tokens[i]);
                self.scores.push(child_log_probs[i] + ps);
                self.parent.push(Some(p));
            }
        }
        let mut order: Vec<usize> = (0..k * k).collect();
        order.sort_by(|&x, &y| cmp_rank((self.scores[base + x], x), (self.scores[base + y], y)));
        order.truncate(k);

        let old_cols = self.frontier_mask_cols();
        let new_cols = old_cols + k;
        let mut mask = vec![false; k * new_cols];
        for (r, &s) in order.iter().enumerate() {
            let pr = s / k;
            mask[r * new_cols..r * new_cols + old_cols]
                .copy_from_slice(&self.mask[pr * old_cols..(pr + 1) * old_cols]);
            mask[r * new_cols + old_cols + r] = true;
        }
        self.mask = mask;
        self.parent_rows = order.iter().map(|&s| s / k).collect();
        self.frontier = order.iter().map(|&s| base + s).collect();
        self.frontier_tokens = self.frontier.iter().map(|&g| self.tokens[g]).collect();
        self.step += 1;
        Ok(())
    }

    /// Selects the verified nodes (spec §4.4) and builds the tree.
    ///
    /// **Selection rule (ancestor-closed best-first).** Start with the root's
    /// children (level 1) as the available set. Repeatedly move the available
    /// candidate that ranks first — higher cumulative log-prob, NaN as −∞, ties
    /// broken by lower global index — into the selection and make its children
    /// available, until `total_tokens` are selected. Every selected node's parent
    /// is therefore selected. When each child's cumulative score is ≤ its
    /// parent's (log-probs ≤ 0, the normal case, including log p = 0 ties) this is
    /// exactly the reference's `topk(scores, total_tokens)` with ties broken by
    /// lower global index, since a parent then always ranks before its children.
    /// With growth finished early, or `total_tokens` larger than the candidates,
    /// fewer nodes are kept; after a full growth there are exactly
    /// `total_tokens + 1` nodes.
    ///
    /// Nodes are ordered by global candidate index (the root is node 0), as in
    /// the reference, so parents precede children.
    pub fn finish(self) -> DraftTree {
        let n = self.tokens.len();
        let k = self.params.top_k;
        // Children of each candidate (level-1 nodes are the root's children).
        let mut first_child = vec![usize::MAX; n];
        for g in (k..n).rev() {
            if let Some(p) = self.parent[g] {
                first_child[p] = g;
            }
        }
        // Children of a candidate are contiguous: k per expanded node.
        let children_of = |g: usize| -> std::ops::Range<usize> {
            let f = first_child[g];
            if f == usize::MAX {
                0..0
            } else {
                f..f + k
            }
        };
        let want = self.params.total_tokens.min(n);
        let mut heap: BinaryHeap<Ranked> = (0..k.min(n))
            .map(|g| Ranked {
                score: self.scores[g],
                index: g,
            })
            .collect();
        let mut selected = Vec::with_capacity(want);
        while selected.len() < want {
            let Some(best) = heap.pop() else { break };
            selected.push(best.index);
            for c in children_of(best.index) {
                heap.push(Ranked {
                    score: self.scores[c],
                    index: c,
                });
            }
        }
        selected.sort_unstable();
        let mut node_of = vec![usize::MAX; n];
        for (i, &g) in selected.iter().enumerate() {
            node_of[g] = i + 1;
        }
        let mut tokens = Vec::with_capacity(selected.len() + 1);
        let mut parents = Vec::with_capacity(selected.len() + 1);
        tokens.push(self.root);
        parents.push(None);
        for &g in &selected {
            tokens.push(self.tokens[g]);
            parents.push(Some(match self.parent[g] {
                None => 0,
                Some(p) => {
                    debug_assert!(node_of[p] != usize::MAX, "selection not ancestor-closed");
                    node_of[p]
                }
            }));
        }
        DraftTree::from_parents(tokens, parents).expect("builder trees are well formed")
    }
}

/// A verified draft tree: node 0 is the root (the pending token), parents precede
/// children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftTree {
    tokens: Vec<u32>,
    parents: Vec<Option<usize>>,
    depths: Vec<usize>,
    children: Vec<Vec<usize>>,
}

impl DraftTree {
    /// Builds a tree from node tokens and parent indices. Checks: at least one
    /// node, equal lengths, node 0 (the root) has no parent, every other node `i`
    /// has a parent `< i`.
    pub fn from_parents(tokens: Vec<u32>, parents: Vec<Option<usize>>) -> Result<Self> {
        if tokens.is_empty() {
            return Err(HassError::InvalidArgument(
                "draft tree needs at least the root node".into(),
            ));
        }
        if tokens.len() != parents.len() {
            return Err(HassError::InvalidArgument(format!(
                "draft tree has {} tokens but {} parents",
                tokens.len(),
                parents.len()
            )));
        }
        if let Some(p) = parents[0] {
            return Err(HassError::InvalidArgument(format!(
                "draft tree root (node 0) must have no parent, got parent {p}"
            )));
        }
        let mut depths = vec![0usize; tokens.len()];
        let mut children = vec![Vec::new(); tokens.len()];
        for (i, p) in parents.iter().enumerate().skip(1) {
            match *p {
                None => {
                    return Err(HassError::InvalidArgument(format!(
                        "draft tree node {i} has no parent; only the root (node 0) may"
                    )))
                }
                Some(p) if p >= i => {
                    return Err(HassError::InvalidArgument(format!(
                        "draft tree node {i} has parent {p}; parents must precede their children"
                    )))
                }
                Some(p) => {
                    depths[i] = depths[p] + 1;
                    children[p].push(i);
                }
            }
        }
        Ok(Self {
            tokens,
            parents,
            depths,
            children,
        })
    }

    /// Number of nodes T, root included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Node tokens; `tokens()[0]` is the root (the reference's `draft_tokens`).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Parent node of each node; `None` only for the root.
    pub fn parents(&self) -> &[Option<usize>] {
        &self.parents
    }

    /// The reference's `parent_pos`: parent node of nodes `1..T` (root = 0).
    pub fn parent_pos(&self) -> Vec<usize> {
        self.parents[1..].iter().map(|p| p.unwrap_or(0)).collect()
    }

    /// Depth of each node (root 0) = the reference's `tree_position_ids`; the
    /// target verifies node i at position `n + depths()[i]`.
    pub fn depths(&self) -> &[usize] {
        &self.depths
    }

    pub fn max_depth(&self) -> usize {
        self.depths.iter().copied().max().unwrap_or(0)
    }

    /// Children of `node` in increasing node index.
    pub fn children(&self, node: usize) -> &[usize] {
        &self.children[node]
    }

    pub fn is_leaf(&self, node: usize) -> bool {
        self.children[node].is_empty()
    }

    /// Nodes without children, in increasing index (the root alone is a leaf).
    pub fn leaves(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.is_leaf(i)).collect()
    }

    /// Node indices from the root to `node`, both included.
    pub fn path_to(&self, node: usize) -> Vec<usize> {
        let mut path = Vec::with_capacity(self.depths[node] + 1);
        let mut cur = Some(node);
        while let Some(c) = cur {
            path.push(c);
            cur = self.parents[c];
        }
        path.reverse();
        path
    }

    /// Row-major T×T tree mask: `mask[i·T + j]` iff node j is an ancestor of node i
    /// or i itself.
    pub fn mask(&self) -> Vec<bool> {
        let t = self.len();
        let mut m = vec![false; t * t];
        for i in 0..t {
            if let Some(p) = self.parents[i] {
                let (done, row) = m.split_at_mut(i * t);
                row[..t].copy_from_slice(&done[p * t..(p + 1) * t]);
            }
            m[i * t + i] = true;
        }
        m
    }

    /// Root→leaf node paths, one per leaf in increasing leaf index (the
    /// reference's `retrieve_indices` without padding, before any sorting).
    pub fn paths(&self) -> Vec<Vec<usize>> {
        self.leaves().into_iter().map(|l| self.path_to(l)).collect()
    }

    /// [`paths`](Self::paths) padded with −1 to `max_depth() + 1` columns, as the
    /// reference's `retrieve_indices` (greedy order, no lexicographic sort).
    pub fn retrieve_indices(&self) -> Vec<Vec<i64>> {
        let w = self.max_depth() + 1;
        self.paths()
            .into_iter()
            .map(|p| {
                let mut row: Vec<i64> = p.into_iter().map(|i| i as i64).collect();
                row.resize(w, -1);
                row
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validation() {
        assert_eq!(TreeParams::default(), TreeParams::new(59, 5, 10).unwrap());
        assert_eq!(
            TreeParams::from_total_token(60, 5, 10).unwrap(),
            TreeParams::default()
        );
        assert_eq!(TreeParams::default().num_candidates(), 510);
        assert_eq!(TreeParams::default().num_nodes(), 60);
        for (t, d, k, word) in [
            (5, 2, 0, "top_k"),
            (3, 0, 2, "total_tokens"),
            (0, 2, 2, "total_tokens"),
            (11, 2, 2, "total_tokens"),
        ] {
            let e = TreeParams::new(t, d, k).unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
        assert!(TreeParams::new(10, 2, 2).is_ok());
        assert!(TreeParams::new(2, 0, 2).is_ok());
        assert!(TreeParams::from_total_token(1, 2, 2).is_err());
    }

    /// Depth 0: no expansion; the best `total_tokens` level-1 candidates.
    #[test]
    fn depth_zero_keeps_level_one() {
        let p = TreeParams::new(2, 0, 3).unwrap();
        let b = TreeBuilder::new(p, 9, &[4, 5, 6], &[-1.0, -0.5, -3.0]).unwrap();
        assert!(b.is_done());
        let t = b.finish();
        assert_eq!(t.tokens(), &[9, 4, 5]);
        assert_eq!(t.depths(), &[0, 1, 1]);
    }

    #[test]
    fn builder_argument_errors() {
        let p = TreeParams::new(3, 1, 2).unwrap();
        assert!(TreeBuilder::new(p, 0, &[1], &[0.0]).is_err());
        let mut b = TreeBuilder::new(p, 0, &[1, 2], &[0.0, -1.0]).unwrap();
        assert!(b.expand(&[1, 2, 3], &[0.0; 3]).is_err());
        b.expand(&[1, 2, 3, 4], &[0.0; 4]).unwrap();
        assert!(b.is_done());
        assert!(b.expand(&[1, 2, 3, 4], &[0.0; 4]).is_err());
        assert_eq!(b.finish().len(), 4);
    }

    #[test]
    fn from_parents_errors() {
        assert!(DraftTree::from_parents(vec![], vec![]).is_err());
        assert!(DraftTree::from_parents(vec![1, 2], vec![None]).is_err());
        assert!(DraftTree::from_parents(vec![1], vec![Some(0)]).is_err());
        assert!(DraftTree::from_parents(vec![1, 2], vec![None, None]).is_err());
        assert!(DraftTree::from_parents(vec![1, 2, 3], vec![None, Some(2), Some(0)]).is_err());
        let t = DraftTree::from_parents(vec![5], vec![None]).unwrap();
        assert_eq!(t.paths(), vec![vec![0]]);
        assert_eq!(t.mask(), vec![true]);
    }
}
