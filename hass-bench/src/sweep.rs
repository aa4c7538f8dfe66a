//! `--sweep`: the tree shape that decodes fastest on this machine, found by decoding a
//! small subset (first turns, T = 0) with every valid (total_tokens, depth, top_k) of a
//! grid and comparing with vanilla on the same questions.

use hass_core::tree::TreeParams;
use hass_core::{HassError, Result};
use hass_models::HassBackend;
use hass_models::{DraftHead, LoadedModel};
use serde::Serialize;

use crate::eval::{run_question, sampling, Method, QuestionResult};
use crate::prompts::Question;
use crate::report::{summaries, OVERALL};

/// One tree shape's result.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub tree: TreeParams,
    pub tau: f64,
    pub tokens_per_s: f64,
    pub speedup: f64,
}

/// All shapes, fastest first.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub questions: usize,
    pub max_new_tokens: usize,
    pub vanilla_tokens_per_s: f64,
    pub points: Vec<SweepPoint>,
}

impl SweepReport {
    pub fn best(&self) -> TreeParams {
        self.points[0].tree
    }

    pub fn to_markdown(&self) -> String {
        let mut md = format!(
            "Tree sweep: {} questions (first turns, T = 0, ≤ {} new tokens); vanilla {:.1} tokens/s\n\n\
             | total_tokens | depth | top_k | τ | tokens/s | speedup |\n|---|---|---|---|---|---|\n",
            self.questions, self.max_new_tokens, self.vanilla_tokens_per_s
        );
        for p in &self.points {
            md += &format!(
                "| {} | {} | {} | {:.2} | {:.1} | {:.2}× |\n",
                p.tree.total_tokens, p.tree.depth, p.tree.top_k, p.tau, p.tokens_per_s, p.speedup
            );
        }
        md
    }
}

/// Every valid combination of the three lists.
pub fn grid(totals: &[usize], depths: &[usize], top_ks: &[usize]) -> Vec<TreeParams> {
    let mut out = Vec::new();
    for &d in depths {
        for &k in top_ks {
            for &t in totals {
                if let Ok(p) = TreeParams::new(t, d, k) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Decodes `questions` (first turns) with vanilla and with `head` under every tree of
/// `grid`; `tick` is called after each decoded question.
pub fn sweep<B: HassBackend>(
    target: &LoadedModel<B>,
    head: &DraftHead<B>,
    questions: &[(String, Question)],
    grid: &[TreeParams],
    max_new_tokens: usize,
    mut tick: impl FnMut(),
) -> Result<SweepReport> {
    if grid.is_empty() || questions.is_empty() {
        return Err(HassError::InvalidArgument(
            "tree sweep needs at least one valid tree shape and one question".into(),
        ));
    }
    let firsts: Vec<(String, Question)> = questions
        .iter()
        .map(|(set, q)| {
            let mut q = q.clone();
            q.turns.truncate(1);
            (set.clone(), q)
        })
        .collect();
    let named: Vec<(String, TreeParams)> = grid
        .iter()
        .map(|t| (format!("{},{},{}", t.total_tokens, t.depth, t.top_k), *t))
        .collect();
    let methods =
        std::iter::once(Method::vanilla()).chain(named.iter().map(|(name, tree)| Method {
            name: name.clone(),
            head: Some((head, *tree)),
        }));
    let mut results: Vec<QuestionResult> = Vec::new();
    for method in methods {
        for (i, (set, q)) in firsts.iter().enumerate() {
            results.push(run_question(
                target,
                &method,
                set,
                q,
                sampling(0.0, 0, i)?,
                max_new_tokens,
            )?);
            tick();
        }
    }
    let all = summaries(&results);
    let overall: Vec<_> = all.iter().filter(|s| s.set == OVERALL).collect();
    let vanilla_tokens_per_s = overall
        .iter()
        .find(|s| s.tau.is_none())
        .map_or(0.0, |s| s.tokens_per_s);
    let mut points: Vec<SweepPoint> = overall
        .iter()
        .filter_map(|s| {
            let tree = named.iter().find(|(n, _)| *n == s.method)?.1;
            Some(SweepPoint {
                tree,
                tau: s.tau?,
                tokens_per_s: s.tokens_per_s,
                speedup: s.speedup,
            })
        })
        .collect();
    points.sort_by(|a, b| b.speedup.total_cmp(&a.speedup));
    Ok(SweepReport {
        questions: firsts.len(),
        max_new_tokens,
        vanilla_tokens_per_s,
        points,
    })
}
