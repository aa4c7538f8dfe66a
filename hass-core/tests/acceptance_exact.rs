//! Exactness of tree acceptance (spec §4.6).
//!
//! Sampling: an [`AcceptCoin`] that enumerates every outcome of every random
//! event (replaying `sample_accept_with` once per outcome sequence) gives the
//! exact distribution of what one round emits; extended by plain target
//! sampling to m tokens, it must equal the target's joint distribution of the
//! first m tokens. Greedy: compared with a brute-force search.

use std::collections::HashMap;

use hass_core::acceptance::{greedy_accept, sample_accept, sample_accept_with, AcceptCoin};
use hass_core::sampling::sample_from;
use hass_core::tree::{DraftTree, TreeBuilder, TreeParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------
// Toy target: the next-token distribution is a fixed pseudo-random function of
// the whole token prefix (root included).

fn hash_prefix(seed: u64, prefix: &[u32]) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &t in prefix {
        h = (h ^ t as u64).wrapping_mul(0x100_0000_01B3);
        h ^= h >> 29;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 32;
    }
    h
}

struct Target {
    seed: u64,
    vocab: usize,
    /// Allow zero-probability tokens and one-hot distributions.
    sparse: bool,
}

impl Target {
    /// The processed probabilities the caller would pass (f32).
    fn probs(&self, prefix: &[u32]) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(hash_prefix(self.seed, prefix));
        let v = self.vocab;
        let mut w = vec![0f64; v];
        if self.sparse && rng.random_range(0..6) == 0 {
            w[rng.random_range(0..v)] = 1.0;
        } else {
            for x in w.iter_mut() {
                *x = if self.sparse && rng.random::<f64>() < 0.3 {
                    0.0
                } else {
                    0.05 + rng.random::<f64>()
                };
            }
            if w.iter().all(|&x| x == 0.0) {
                w[rng.random_range(0..v)] = 1.0;
            }
        }
        let s: f64 = w.iter().sum();
        w.iter().map(|&x| (x / s) as f32).collect()
    }

    /// The distribution the f32 probabilities stand for: normalised in f64.
    fn dist(&self, prefix: &[u32]) -> Vec<f64> {
        let p = self.probs(prefix);
        let s: f64 = p.iter().map(|&x| x as f64).sum();
        p.iter().map(|&x| x as f64 / s).collect()
    }

    /// Exact joint probability of every m-token continuation of `root`.
    fn joint(&self, root: u32, m: usize) -> HashMap<Vec<u32>, f64> {
        let mut out = HashMap::new();
        self.extend(&mut vec![root], 1.0, m, &mut out);
        out
    }

    /// Adds `prob` × P(continuations of `prefix` up to m emitted tokens).
    fn extend(&self, prefix: &mut Vec<u32>, prob: f64, m: usize, out: &mut HashMap<Vec<u32>, f64>) {
        if prefix.len() - 1 == m {
            *out.entry(prefix[1..].to_vec()).or_insert(0.0) += prob;
            return;
        }
        if prob == 0.0 {
            return;
        }
        let d = self.dist(prefix);
        for (x, &p) in d.iter().enumerate() {
            if p > 0.0 {
                prefix.push(x as u32);
                self.extend(prefix, prob * p, m, out);
                prefix.pop();
            }
        }
    }

    /// Node i's processed probabilities: the target after tokens root..i.
    fn node_probs<'a>(&'a self, tree: &'a DraftTree) -> impl FnMut(usize, &mut Vec<f32>) + 'a {
        move |i, out| {
            let prefix: Vec<u32> = tree.path_to(i).iter().map(|&n| tree.tokens()[n]).collect();
            out.extend(self.probs(&prefix));
        }
    }
}

// ---------------------------------------------------------------------------
// Exhaustive coin: depth-first replay over every sequence of outcomes.

#[derive(Default)]
struct Enumerator {
    /// Chosen outcome at each decision of the current run.
    script: Vec<usize>,
    /// Number of outcomes at each decision.
    counts: Vec<usize>,
    pos: usize,
    prob: f64,
}

impl Enumerator {
    fn start(&mut self) {
        self.pos = 0;
        self.prob = 1.0;
    }

    fn choose(&mut self, n: usize) -> usize {
        assert!(n > 0);
        if self.pos < self.script.len() {
            assert_eq!(self.counts[self.pos], n, "replay diverged");
        } else {
            self.script.push(0);
            self.counts.push(n);
        }
        let c = self.script[self.pos];
        self.pos += 1;
        c
    }

    /// Moves to the next outcome sequence; false when all were visited.
    fn advance(&mut self) -> bool {
        assert_eq!(
            self.pos,
            self.script.len(),
            "run used fewer decisions than scripted"
        );
        while let (Some(c), Some(n)) = (self.script.pop(), self.counts.pop()) {
            if c + 1 < n {
                self.script.push(c + 1);
                self.counts.push(n);
                return true;
            }
        }
        false
    }
}

impl AcceptCoin for Enumerator {
    fn accept(&mut self, p: f64) -> bool {
        assert!((0.0..=1.0).contains(&p), "p = {p}");
        let mut opts = Vec::with_capacity(2);
        if p > 0.0 {
            opts.push((true, p));
        }
        if p < 1.0 {
            opts.push((false, 1.0 - p));
        }
        let (out, q) = opts[self.choose(opts.len())];
        self.prob *= q;
        out
    }

    fn draw(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().filter(|&&w| w > 0.0).sum();
        let opts: Vec<(usize, f64)> = weights
            .iter()
            .enumerate()
            .filter(|(_, &w)| w > 0.0)
            .map(|(i, &w)| (i, w / total))
            .collect();
        let (i, q) = opts[self.choose(opts.len())];
        self.prob *= q;
        i
    }
}

/// Exact distribution of the first m emitted tokens under `sample_accept_with`,
/// continuing with plain target sampling when a round emits fewer than m.
fn exact_emitted(tree: &DraftTree, target: &Target, m: usize) -> (HashMap<Vec<u32>, f64>, usize) {
    let mut e = Enumerator::default();
    let mut out = HashMap::new();
    let mut runs = 0;
    loop {
        e.start();
        let a = sample_accept_with(tree, target.node_probs(tree), &mut e).unwrap();
        runs += 1;
        // Structural sanity of every outcome.
        assert_eq!(a.path[0], 0);
        for w in a.path.windows(2) {
            assert_eq!(tree.parents()[w[1]], Some(w[0]));
        }
        let emitted = a.emitted_tokens(tree);
        if e.prob > 0.0 {
            if emitted.len() >= m {
                *out.entry(emitted[..m].to_vec()).or_insert(0.0) += e.prob;
            } else {
                let mut prefix = vec![tree.tokens()[0]];
                prefix.extend(&emitted);
                target.extend(&mut prefix, e.prob, m, &mut out);
            }
        }
        if !e.advance() {
            break;
        }
    }
    (out, runs)
}

fn assert_same(got: &HashMap<Vec<u32>, f64>, want: &HashMap<Vec<u32>, f64>, ctx: &str) {
    let total: f64 = got.values().sum();
    assert!((total - 1.0).abs() < 1e-12, "{ctx}: total {total}");
    for (s, &p) in want {
        let g = got.get(s).copied().unwrap_or(0.0);
        assert!((g - p).abs() < 1e-9, "{ctx}: P({s:?}) = {g}, target {p}");
    }
    for (s, &g) in got {
        if !want.contains_key(s) {
            assert!(
                g.abs() < 1e-12,
                "{ctx}: P({s:?}) = {g} outside the target's support"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Trees.

/// Random tree of depth ≤ `max_depth`, tokens < v, with frequent duplicate siblings.
fn random_tree(rng: &mut StdRng, v: usize, max_nodes: usize, max_depth: usize) -> DraftTree {
    let n = rng.random_range(1..=max_nodes);
    let mut tokens = vec![rng.random_range(0..v as u32)];
    let mut parents = vec![None];
    let mut depth = vec![0usize];
    let mut children: Vec<Vec<usize>> = vec![vec![]];
    for i in 1..n {
        let eligible: Vec<usize> = (0..i).filter(|&j| depth[j] < max_depth).collect();
        let p = eligible[rng.random_range(0..eligible.len())];
        let tok = if !children[p].is_empty() && rng.random_bool(0.3) {
            let c = children[p][rng.random_range(0..children[p].len())];
            tokens[c]
        } else {
            rng.random_range(0..v as u32)
        };
        tokens.push(tok);
        parents.push(Some(p));
        depth.push(depth[p] + 1);
        children.push(vec![]);
        children[p].push(i);
    }
    DraftTree::from_parents(tokens, parents).unwrap()
}

/// Tree from the builder: every row's children are the top-k of a random draft
/// distribution (distinct tokens per row), as EAGLE produces.
fn builder_tree(rng: &mut StdRng, v: usize, k: usize, depth: usize, total: usize) -> DraftTree {
    let topk = |rng: &mut StdRng| -> (Vec<u32>, Vec<f32>) {
        let mut lp: Vec<(u32, f32)> = (0..v as u32)
            .map(|t| (t, -(rng.random::<f32>() * 3.0).floor() * 0.5))
            .collect();
        lp.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        lp.truncate(k);
        lp.into_iter().unzip()
    };
    let params = TreeParams::new(total, depth, k).unwrap();
    let (t1, l1) = topk(rng);
    let mut b = TreeBuilder::new(params, rng.random_range(0..v as u32), &t1, &l1).unwrap();
    while !b.is_done() {
        let (mut ts, mut ls) = (vec![], vec![]);
        for _ in 0..k {
            let (t, l) = topk(rng);
            ts.extend(t);
            ls.extend(l);
        }
        b.expand(&ts, &ls).unwrap();
    }
    b.finish()
}

// ---------------------------------------------------------------------------
// Sampling: exact.

#[test]
fn sampling_exact_on_random_trees() {
    let mut rng = StdRng::seed_from_u64(20240611);
    let mut total_runs = 0;
    for case in 0..400 {
        let v = rng.random_range(3..=5);
        let tree = random_tree(&mut rng, v, 9, 3);
        let target = Target {
            seed: rng.random(),
            vocab: v,
            sparse: case % 2 == 0,
        };
        let m = if case % 3 == 0 { 2 } else { 3 };
        let (got, runs) = exact_emitted(&tree, &target, m);
        total_runs += runs;
        let want = target.joint(tree.tokens()[0], m);
        assert_same(&got, &want, &format!("case {case}, tree {tree:?}"));
    }
    assert!(
        total_runs > 2000,
        "enumeration explored only {total_runs} runs"
    );
}

#[test]
fn sampling_exact_on_builder_trees() {
    let mut rng = StdRng::seed_from_u64(77);
    for case in 0..150 {
        let v = rng.random_range(3..=5);
        let k = rng.random_range(1..=v.min(3));
        let depth = rng.random_range(1..=2);
        let total = rng.random_range(1..=(k + depth * k * k).min(8));
        let tree = builder_tree(&mut rng, v, k, depth, total);
        let target = Target {
            seed: rng.random(),
            vocab: v,
            sparse: case % 2 == 1,
        };
        let (got, _) = exact_emitted(&tree, &target, 3);
        let want = target.joint(tree.tokens()[0], 3);
        assert_same(&got, &want, &format!("builder case {case}, tree {tree:?}"));
    }
}

/// Hand-made corner cases: root only, a chain, duplicate siblings everywhere.
#[test]
fn sampling_exact_corner_trees() {
    let trees = [
        DraftTree::from_parents(vec![0], vec![None]).unwrap(),
        DraftTree::from_parents(vec![0, 1, 2, 0], vec![None, Some(0), Some(1), Some(2)]).unwrap(),
        DraftTree::from_parents(
            vec![0, 1, 1, 1, 2, 2],
            vec![None, Some(0), Some(0), Some(0), Some(1), Some(2)],
        )
        .unwrap(),
        // Every vocabulary token among the root's children: rejections leave the
        // last untried token with all the residual mass, so it is always accepted.
        DraftTree::from_parents(
            vec![0, 0, 1, 2, 0, 1, 2],
            vec![None, Some(0), Some(0), Some(0), Some(2), Some(2), Some(2)],
        )
        .unwrap(),
    ];
    for (i, tree) in trees.iter().enumerate() {
        for seed in 0..20 {
            let target = Target {
                seed,
                vocab: 3,
                sparse: seed % 2 == 0,
            };
            let (got, _) = exact_emitted(tree, &target, 3);
            let want = target.joint(tree.tokens()[0], 3);
            assert_same(&got, &want, &format!("corner tree {i}, seed {seed}"));
        }
    }
}

// ---------------------------------------------------------------------------
// Sampling: Monte Carlo with a real RNG.

/// 0.999 quantiles of χ²(df), df = 1..=30.
const CHI2_999: [f64; 30] = [
    10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588, 31.264, 32.909,
    34.528, 36.123, 37.697, 39.252, 40.790, 42.312, 43.820, 45.315, 46.797, 48.268, 49.728, 51.179,
    52.620, 54.052, 55.476, 56.892, 58.301, 59.703,
];

fn monte_carlo(tree: &DraftTree, target: &Target, m: usize, n: usize, seed: u64) {
    let want = target.joint(tree.tokens()[0], m);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts: HashMap<Vec<u32>, u64> = HashMap::new();
    for _ in 0..n {
        let a = sample_accept(tree, target.node_probs(tree), &mut rng).unwrap();
        let mut prefix = vec![tree.tokens()[0]];
        prefix.extend(a.emitted_tokens(tree));
        while prefix.len() - 1 < m {
            let p = target.probs(&prefix);
            prefix.push(sample_from(&p, &mut rng));
        }
        *counts.entry(prefix[1..=m].to_vec()).or_insert(0) += 1;
    }
    for s in counts.keys() {
        assert!(
            want.get(s).copied().unwrap_or(0.0) > 0.0,
            "impossible sequence {s:?}"
        );
    }
    let cells: Vec<(&Vec<u32>, f64)> = want
        .iter()
        .filter(|(_, &p)| p > 0.0)
        .map(|(s, &p)| (s, p))
        .collect();
    let x2: f64 = cells
        .iter()
        .map(|(s, p)| {
            let e = p * n as f64;
            let c = counts.get(*s).copied().unwrap_or(0) as f64;
            (c - e).powi(2) / e
        })
        .sum();
    let df = cells.len() - 1;
    assert!((1..=30).contains(&df), "df = {df}");
    let limit = CHI2_999[df - 1];
    assert!(
        x2 < limit,
        "χ² = {x2} ≥ {limit} (df {df}); counts {counts:?}"
    );
}

#[test]
fn sampling_monte_carlo_chi_square() {
    // A 3-level tree over V = 3 with a duplicate sibling; 27 cells, df = 26.
    let tree = DraftTree::from_parents(
        vec![0, 1, 2, 1, 0, 2, 1, 0],
        vec![
            None,
            Some(0),
            Some(0),
            Some(0),
            Some(1),
            Some(1),
            Some(4),
            Some(2),
        ],
    )
    .unwrap();
    let target = Target {
        seed: 5,
        vocab: 3,
        sparse: false,
    };
    monte_carlo(&tree, &target, 3, 200_000, 11);

    // Builder tree over V = 4, first two tokens (16 cells, df = 15).
    let mut rng = StdRng::seed_from_u64(3);
    let tree = builder_tree(&mut rng, 4, 2, 2, 6);
    let target = Target {
        seed: 9,
        vocab: 4,
        sparse: false,
    };
    monte_carlo(&tree, &target, 2, 200_000, 12);
}

// ---------------------------------------------------------------------------
// Greedy.

/// Brute force: the deepest node whose whole path matches the argmax chain;
/// among equally deep ones, the one whose subtree holds the smallest leaf index.
fn brute_greedy(tree: &DraftTree, am: &[u32]) -> (Vec<usize>, u32) {
    let n = tree.len();
    let matched: Vec<bool> = (0..n)
        .map(|i| {
            tree.path_to(i)
                .windows(2)
                .all(|w| tree.tokens()[w[1]] == am[w[0]])
        })
        .collect();
    let a = (0..n)
        .filter(|&i| matched[i])
        .map(|i| tree.depths()[i])
        .max()
        .unwrap();
    let leaves = tree.leaves();
    let first_leaf = |c: usize| {
        leaves
            .iter()
            .copied()
            .find(|&l| tree.path_to(l).contains(&c))
            .unwrap()
    };
    let best = (0..n)
        .filter(|&i| matched[i] && tree.depths()[i] == a)
        .min_by_key(|&i| first_leaf(i))
        .unwrap();
    (tree.path_to(best), am[best])
}

#[test]
fn greedy_matches_brute_force() {
    let mut rng = StdRng::seed_from_u64(4242);
    for case in 0..3000 {
        let v = rng.random_range(2..=5);
        let tree = if case % 4 == 0 {
            let k = rng.random_range(1..=v.min(3));
            let total = rng.random_range(1..=k + 3 * k * k);
            builder_tree(&mut rng, v, k, 3, total)
        } else {
            random_tree(&mut rng, v, 14, 4)
        };
        // Argmax tables biased towards a child's token so that long matches occur.
        let am: Vec<u32> = (0..tree.len())
            .map(|i| {
                let ch = tree.children(i);
                if !ch.is_empty() && rng.random_bool(0.7) {
                    tree.tokens()[ch[rng.random_range(0..ch.len())]]
                } else {
                    rng.random_range(0..v as u32)
                }
            })
            .collect();
        let got = greedy_accept(&tree, &am).unwrap();
        let (path, bonus) = brute_greedy(&tree, &am);
        assert_eq!(
            (got.path.clone(), got.bonus),
            (path, bonus),
            "case {case}: {tree:?} {am:?}"
        );
        assert_eq!(got.num_accepted(), got.path.len() - 1);
        assert_eq!(got.last_node(), *got.path.last().unwrap());
    }
}

/// Greedy ties with duplicate siblings: the first path in leaf order wins.
#[test]
fn greedy_tie_follows_retrieve_order() {
    // root → node1 (tok 1) → node3 (tok 2); root → node2 (tok 1) → node4 (tok 2).
    // Leaves 3 and 4 both fully match; leaf 3 comes first.
    let tree = DraftTree::from_parents(
        vec![0, 1, 1, 2, 2],
        vec![None, Some(0), Some(0), Some(1), Some(2)],
    )
    .unwrap();
    let a = greedy_accept(&tree, &[1, 2, 2, 7, 8]).unwrap();
    assert_eq!((a.path, a.bonus), (vec![0, 1, 3], 7));
    // Reordered so the second branch's leaf has the lower index.
    let tree = DraftTree::from_parents(
        vec![0, 1, 1, 2, 2],
        vec![None, Some(0), Some(0), Some(2), Some(1)],
    )
    .unwrap();
    let a = greedy_accept(&tree, &[1, 2, 2, 7, 8]).unwrap();
    assert_eq!((a.path, a.bonus), (vec![0, 2, 3], 7));
}
