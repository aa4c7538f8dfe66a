//! Properties of EAGLE-2 tree growth and node selection (spec §4.3–§4.4), checked
//! against an independent model of the reference algorithm.

use hass_core::tree::{DraftTree, TreeBuilder, TreeParams};
use proptest::collection::vec;
use proptest::prelude::*;

/// Token of global candidate g: unique, so a finished tree maps back to candidates.
fn tok(g: usize) -> u32 {
    1000 + g as u32
}
const ROOT: u32 = 7;

/// Independent model of `topK_genrate` with the tie rule "higher score, then
/// lower index" (NaN ranks as −∞).
struct Model {
    k: usize,
    scores: Vec<f32>,
    parent: Vec<Option<usize>>,
    /// Frontier (global indices, row order) before each step.
    frontiers: Vec<Vec<usize>>,
}

fn key(s: f32) -> f32 {
    if s.is_nan() {
        f32::NEG_INFINITY
    } else {
        s
    }
}

/// Indices of `scores` ordered best first; stable sort keeps lower index first on ties.
fn ranked(scores: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| key(scores[b]).partial_cmp(&key(scores[a])).unwrap());
    idx
}

impl Model {
    fn new(k: usize, lp1: &[f32]) -> Self {
        Self {
            k,
            scores: lp1.to_vec(),
            parent: vec![None; k],
            frontiers: vec![(0..k).collect()],
        }
    }

    fn expand(&mut self, lp: &[f32]) {
        let k = self.k;
        let i = self.frontiers.len() - 1;
        let front = self.frontiers[i].clone();
        let base = self.scores.len();
        assert_eq!(base, k + i * k * k, "global numbering");
        for (a, &p) in front.iter().enumerate() {
            for b in 0..k {
                self.scores.push(self.scores[p] + lp[a * k + b]);
                self.parent.push(Some(p));
            }
        }
        let sel: Vec<usize> = ranked(&self.scores[base..])
            .into_iter()
            .take(k)
            .map(|s| base + s)
            .collect();
        self.frontiers.push(sel);
    }

    fn is_ancestor_or_self(&self, a: usize, mut n: usize) -> bool {
        loop {
            if n == a {
                return true;
            }
            match self.parent[n] {
                Some(p) => n = p,
                None => return false,
            }
        }
    }

    /// The spec's parent formula `parents_cat[g // k] − 1` from the frontiers.
    fn spec_parent(&self, g: usize) -> Option<usize> {
        let k = self.k;
        if g < k {
            return None;
        }
        let step = (g - k) / (k * k);
        let a = ((g - k) % (k * k)) / k;
        Some(self.frontiers[step][a])
    }
}

/// Grows a tree with the builder and the model side by side, checking the growth
/// state at every step. Returns the finished tree and the model.
fn grow(params: TreeParams, lp1: &[f32], lps: &[Vec<f32>]) -> (DraftTree, Model) {
    let k = params.top_k;
    let toks1: Vec<u32> = (0..k).map(tok).collect();
    let mut b = TreeBuilder::new(params, ROOT, &toks1, lp1).unwrap();
    let mut m = Model::new(k, lp1);
    for (i, lp) in lps.iter().enumerate() {
        assert!(!b.is_done());
        assert_eq!(b.step(), i);
        assert_eq!(b.position_offset(), i);
        let front = &m.frontiers[i];
        assert_eq!(
            b.frontier_indices(),
            front.as_slice(),
            "frontier at step {i}"
        );
        let want_toks: Vec<u32> = front.iter().map(|&g| tok(g)).collect();
        assert_eq!(b.frontier_tokens(), want_toks.as_slice());
        // Parent rows pick the previous step's output row of each node's parent.
        for (r, &g) in front.iter().enumerate() {
            let pr = b.frontier_parent_rows()[r];
            if i == 0 {
                assert_eq!(pr, 0);
            } else {
                assert_eq!(Some(m.frontiers[i - 1][pr]), m.parent[g]);
            }
        }
        // Frontier mask = ancestor-or-self closure over every expanded block.
        let cols = b.frontier_mask_cols();
        assert_eq!(cols, k * (i + 1));
        assert_eq!(b.frontier_mask().len(), k * cols);
        for (r, &g) in front.iter().enumerate() {
            for j in 0..=i {
                for c in 0..k {
                    let want = m.is_ancestor_or_self(m.frontiers[j][c], g);
                    assert_eq!(
                        b.frontier_mask()[r * cols + j * k + c],
                        want,
                        "step {i} row {r} col block {j} entry {c}"
                    );
                }
            }
        }
        let child_toks: Vec<u32> = (0..k * k).map(|x| tok(b.num_candidates() + x)).collect();
        b.expand(&child_toks, lp).unwrap();
        m.expand(lp);
    }
    assert!(b.is_done());
    assert_eq!(b.num_candidates(), params.num_candidates());
    for g in 0..m.scores.len() {
        assert_eq!(m.spec_parent(g), m.parent[g]);
    }
    (b.finish(), m)
}

/// Structural invariants of any draft tree.
fn check_structure(t: &DraftTree) {
    let n = t.len();
    assert!(n >= 1);
    assert_eq!(t.parents()[0], None);
    assert_eq!(t.depths()[0], 0);
    for i in 1..n {
        let p = t.parents()[i].expect("non-root node has a parent");
        assert!(p < i, "parent precedes child");
        assert_eq!(t.depths()[i], t.depths()[p] + 1, "depth = parent depth + 1");
        assert!(t.children(p).contains(&i));
    }
    assert_eq!(
        t.parent_pos(),
        (1..n).map(|i| t.parents()[i].unwrap()).collect::<Vec<_>>()
    );
    // Mask = ancestor closure, computed by walking parents.
    let mask = t.mask();
    assert_eq!(mask.len(), n * n);
    for i in 0..n {
        let mut anc = vec![false; n];
        let mut cur = Some(i);
        while let Some(c) = cur {
            anc[c] = true;
            cur = t.parents()[c];
        }
        assert_eq!(&mask[i * n..(i + 1) * n], anc.as_slice(), "mask row {i}");
        // Row sum − 1 = depth (the reference's tree_position_ids).
        assert_eq!(anc.iter().filter(|&&x| x).count() - 1, t.depths()[i]);
    }
    // Paths: one per leaf, increasing leaf index, root → leaf by parent links.
    let leaves: Vec<usize> = (0..n).filter(|&i| t.children(i).is_empty()).collect();
    assert_eq!(t.leaves(), leaves);
    let paths = t.paths();
    assert_eq!(paths.len(), leaves.len());
    let mut covered = vec![false; n];
    for (p, &leaf) in paths.iter().zip(&leaves) {
        assert_eq!(p[0], 0);
        assert_eq!(*p.last().unwrap(), leaf);
        assert_eq!(p.len(), t.depths()[leaf] + 1);
        for w in p.windows(2) {
            assert_eq!(t.parents()[w[1]], Some(w[0]));
        }
        for &x in p {
            covered[x] = true;
        }
    }
    assert!(
        covered.iter().all(|&c| c),
        "every node lies on a root→leaf path"
    );
    let ri = t.retrieve_indices();
    for (row, p) in ri.iter().zip(&paths) {
        assert_eq!(row.len(), t.max_depth() + 1);
        for (j, &v) in row.iter().enumerate() {
            assert_eq!(v, p.get(j).map_or(-1, |&x| x as i64));
        }
    }
}

/// Candidate index of every non-root node, and checks that tree parents are the
/// candidates' parents (so every selected node's ancestors are selected).
fn check_against_model(t: &DraftTree, m: &Model) -> Vec<usize> {
    assert_eq!(t.tokens()[0], ROOT);
    let gs: Vec<usize> = t.tokens()[1..]
        .iter()
        .map(|&x| (x - 1000) as usize)
        .collect();
    assert!(
        gs.windows(2).all(|w| w[0] < w[1]),
        "nodes sorted by global index"
    );
    for (i, &g) in gs.iter().enumerate() {
        let node = i + 1;
        match m.parent[g] {
            None => assert_eq!(t.parents()[node], Some(0)),
            Some(pg) => {
                let p = t.parents()[node].unwrap();
                assert!(p >= 1);
                assert_eq!(gs[p - 1], pg, "tree parent is the candidate's parent");
            }
        }
    }
    gs
}

fn lp_tied() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => Just(0.0f32),
        1 => Just(-0.0f32),
        3 => Just(-1.0f32),
        2 => Just(-0.5f32),
        1 => Just(f32::NEG_INFINITY),
        3 => -4.0f32..0.0,
    ]
}

fn lp_wild() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => -3.0f32..3.0,
        2 => Just(0.0f32),
        2 => Just(1.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
    ]
}

type Case = (TreeParams, Vec<f32>, Vec<Vec<f32>>);

fn case(lp: fn() -> BoxedStrategy<f32>) -> impl Strategy<Value = Case> {
    (1usize..=4, 1usize..=4).prop_flat_map(move |(k, d)| {
        let cands = k + d * k * k;
        (1usize..=cands, vec(lp(), k), vec(vec(lp(), k * k), d))
            .prop_map(move |(t, lp1, lps)| (TreeParams::new(t, d, k).unwrap(), lp1, lps))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Log-probs ≤ 0 with many exact ties: the selection equals the reference's
    /// top-`total_tokens` by (score desc, index asc), is ancestor-closed, and the
    /// tree has exactly total_tokens + 1 nodes.
    #[test]
    fn monotone_scores_match_reference((params, lp1, lps) in case(|| lp_tied().boxed())) {
        let (tree, m) = grow(params, &lp1, &lps);
        check_structure(&tree);
        prop_assert_eq!(tree.len(), params.total_tokens + 1);
        let gs = check_against_model(&tree, &m);
        let mut want: Vec<usize> = ranked(&m.scores).into_iter().take(params.total_tokens).collect();
        want.sort_unstable();
        prop_assert_eq!(gs, want);
    }

    /// Arbitrary scores (positive log-probs, NaN, ±inf): still ancestor-closed and
    /// well formed, with total_tokens + 1 nodes.
    #[test]
    fn arbitrary_scores_stay_closed((params, lp1, lps) in case(|| lp_wild().boxed())) {
        let (tree, m) = grow(params, &lp1, &lps);
        check_structure(&tree);
        prop_assert_eq!(tree.len(), params.total_tokens + 1);
        check_against_model(&tree, &m);
    }

    /// Hand-built trees with duplicate tokens satisfy the same invariants.
    #[test]
    fn from_parents_structure(raw in vec((0usize..1000, 0u32..3), 0..12)) {
        let mut tokens = vec![0u32];
        let mut parents = vec![None];
        for (i, (r, t)) in raw.into_iter().enumerate() {
            parents.push(Some(r % (i + 1)));
            tokens.push(t);
        }
        let tree = DraftTree::from_parents(tokens, parents).unwrap();
        check_structure(&tree);
    }
}

/// Early finish keeps what exists and stays closed.
#[test]
fn early_finish() {
    let params = TreeParams::new(10, 3, 2).unwrap();
    let mut b = TreeBuilder::new(params, ROOT, &[tok(0), tok(1)], &[-0.1, -0.2]).unwrap();
    b.expand(&[tok(2), tok(3), tok(4), tok(5)], &[-0.1, -0.2, -0.3, -0.4])
        .unwrap();
    let t = b.finish();
    assert_eq!(t.len(), 7);
    check_structure(&t);
}

/// The spec's mini example (§4.4): k = 2, D = 2, total_tokens = 4, top-4 = {0, 1, 2, 6}.
#[test]
fn spec_mini_example() {
    let params = TreeParams::new(4, 2, 2).unwrap();
    // Level 1: g0 = −0.1, g1 = −0.2.
    let mut b = TreeBuilder::new(params, ROOT, &[tok(0), tok(1)], &[-0.1, -0.2]).unwrap();
    assert_eq!(b.frontier_indices(), &[0, 1]);
    assert_eq!(b.frontier_mask(), &[true, false, false, true]);
    assert_eq!(b.position_offset(), 0);
    // Step 0: children of g0 are g2 (−0.3), g3 (−3.1); of g1: g4 (−0.7), g5 (−4.2).
    b.expand(&[tok(2), tok(3), tok(4), tok(5)], &[-0.2, -3.0, -0.5, -4.0])
        .unwrap();
    // g2 and g4 are expanded, in that order.
    assert_eq!(b.frontier_indices(), &[2, 4]);
    assert_eq!(b.frontier_parent_rows(), &[0, 1]);
    assert_eq!(b.frontier_tokens(), &[tok(2), tok(4)]);
    assert_eq!(b.position_offset(), 1);
    assert_eq!(b.frontier_mask_cols(), 4);
    #[rustfmt::skip]
    assert_eq!(b.frontier_mask(), &[
        true, false, true, false,
        false, true, false, true,
    ]);
    // Step 1: children of g2 are g6 (−0.4), g7 (−5.3); of g4: g8 (−1.7), g9 (−6.7).
    b.expand(&[tok(6), tok(7), tok(8), tok(9)], &[-0.1, -5.0, -1.0, -6.0])
        .unwrap();
    assert!(b.is_done());
    let t = b.finish();
    assert_eq!(t.tokens(), &[ROOT, tok(0), tok(1), tok(2), tok(6)]);
    assert_eq!(t.parent_pos(), vec![0, 0, 1, 3]);
    let rows: Vec<Vec<usize>> = (0..5)
        .map(|i| (0..5).filter(|&j| t.mask()[i * 5 + j]).collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec![0],
            vec![0, 1],
            vec![0, 2],
            vec![0, 1, 3],
            vec![0, 1, 3, 4]
        ]
    );
    assert_eq!(t.depths(), &[0, 1, 1, 2, 3]);
    assert_eq!(t.leaves(), vec![2, 4]);
    assert_eq!(
        t.retrieve_indices(),
        vec![vec![0, 2, -1, -1], vec![0, 1, 3, 4]]
    );
    assert_eq!(t.paths(), vec![vec![0, 2], vec![0, 1, 3, 4]]);
    assert_eq!(t.children(0), &[1, 2]);
    assert_eq!(t.children(1), &[3]);
    check_structure(&t);
}

/// log p = 0 ties: the reference's topk may pick a child without its parent; the
/// rule here never does.
#[test]
fn zero_log_prob_ties_keep_parents() {
    // k = 2, D = 1. All scores 0: ranking is by index, so {0, 1, 2} is chosen
    // for total_tokens = 3 and the child g2 comes with its parent g0.
    let params = TreeParams::new(3, 1, 2).unwrap();
    let mut b = TreeBuilder::new(params, ROOT, &[tok(0), tok(1)], &[0.0, -0.0]).unwrap();
    b.expand(&[tok(2), tok(3), tok(4), tok(5)], &[0.0; 4])
        .unwrap();
    let t = b.finish();
    assert_eq!(t.tokens(), &[ROOT, tok(0), tok(1), tok(2)]);
    assert_eq!(t.parent_pos(), vec![0, 0, 1]);
    // A child scoring above its parent (positive log p) still needs the parent:
    // total_tokens = 1 picks the best level-1 node, not the better child.
    let params = TreeParams::new(1, 1, 2).unwrap();
    let mut b = TreeBuilder::new(params, ROOT, &[tok(0), tok(1)], &[-1.0, -2.0]).unwrap();
    b.expand(&[tok(2), tok(3), tok(4), tok(5)], &[0.0, 0.0, 5.0, 0.0])
        .unwrap();
    let t = b.finish();
    assert_eq!(t.tokens(), &[ROOT, tok(0)]);
}
