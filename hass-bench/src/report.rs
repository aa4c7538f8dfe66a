//! Aggregates of the speculative-decoding benchmark (spec §6.2, §6.3) and their
//! Markdown form.

use std::collections::BTreeSet;
use std::fmt::Write;

use serde::Serialize;

use crate::eval::{QuestionResult, VANILLA};

/// The set name of the row that pools every question.
pub const OVERALL: &str = "overall";

/// One method on one set (or [`OVERALL`]) at one temperature.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub temperature: f32,
    pub set: String,
    pub method: String,
    pub questions: usize,
    pub new_tokens: usize,
    /// Mean over questions of the per-question τ (None for vanilla).
    pub tau: Option<f64>,
    /// Mean over questions of Σ new tokens / Σ wall time.
    pub tokens_per_s: f64,
    /// `tokens_per_s` over vanilla's on the same questions (spec §6.3).
    pub speedup: f64,
    /// Mean over questions of the decode phase's tokens per second (prefill
    /// excluded): what the tree tuner predicts.
    pub decode_tokens_per_s: f64,
    /// At T = 0: every speculative output equal to vanilla's.
    pub identical_to_vanilla: Option<bool>,
    /// Mean milliseconds per verification round.
    pub draft_ms_per_round: Option<f64>,
    pub verify_ms_per_round: Option<f64>,
    pub other_ms_per_round: Option<f64>,
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (n, s) = xs.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    s / n.max(1) as f64
}

fn summarise(
    temperature: f32,
    set: &str,
    method: &str,
    rs: &[&QuestionResult],
    vanilla_speed: f64,
) -> Summary {
    let rounds: usize = rs.iter().map(|r| r.rounds()).sum();
    let per_round = |f: fn(&crate::eval::TurnResult) -> f64| {
        (rounds > 0)
            .then(|| 1e3 * rs.iter().flat_map(|r| &r.turns).map(f).sum::<f64>() / rounds as f64)
    };
    let speed = mean(rs.iter().map(|r| r.tokens_per_s()));
    let taus: Vec<f64> = rs.iter().filter_map(|r| r.tau()).collect();
    let checks: Vec<bool> = rs.iter().filter_map(|r| r.identical_to_vanilla).collect();
    Summary {
        temperature,
        set: set.to_string(),
        method: method.to_string(),
        questions: rs.len(),
        new_tokens: rs.iter().map(|r| r.new_tokens()).sum(),
        tau: (!taus.is_empty()).then(|| mean(taus.iter().copied())),
        tokens_per_s: speed,
        speedup: speed / vanilla_speed.max(1e-12),
        decode_tokens_per_s: mean(rs.iter().map(|r| r.decode_tokens_per_s())),
        identical_to_vanilla: (!checks.is_empty()).then(|| checks.iter().all(|&c| c)),
        draft_ms_per_round: per_round(|t| t.draft_s),
        verify_ms_per_round: per_round(|t| t.verify_s),
        other_ms_per_round: per_round(|t| t.other_s),
    }
}

/// Distinct items in first-seen order.
fn first_seen<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = Vec::new();
    for k in items {
        if !seen.contains(&k) {
            seen.push(k);
        }
    }
    seen
}

/// Per temperature, set (in first-seen order, then [`OVERALL`]) and method: the
/// summaries. Speedups divide by vanilla's mean speed over the same questions.
pub fn summaries(results: &[QuestionResult]) -> Vec<Summary> {
    let temps: BTreeSet<u32> = results.iter().map(|r| r.temperature.to_bits()).collect();
    let sets = first_seen(results.iter().map(|r| r.set.as_str()));
    let methods = first_seen(results.iter().map(|r| r.method.as_str()));
    let mut out = Vec::new();
    for t in temps.into_iter().map(f32::from_bits) {
        let groups = sets.iter().map(|s| Some(*s)).chain([None]);
        for set in groups {
            let pick = |m: &str| -> Vec<&QuestionResult> {
                results
                    .iter()
                    .filter(|r| {
                        r.temperature == t && r.method == m && set.is_none_or(|s| r.set == s)
                    })
                    .collect()
            };
            let vanilla = pick(VANILLA);
            let vanilla_speed = mean(vanilla.iter().map(|r| r.tokens_per_s()));
            for m in &methods {
                let rs = pick(m);
                if !rs.is_empty() {
                    out.push(summarise(t, set.unwrap_or(OVERALL), m, &rs, vanilla_speed));
                }
            }
        }
    }
    out
}

fn cell(s: &Summary) -> String {
    match s.tau {
        None => format!("{:.1} tok/s", s.tokens_per_s),
        Some(tau) => format!("{:.2}× · τ {:.2}", s.speedup, tau),
    }
}

/// Markdown: per temperature, a table of speedup and τ (methods × sets), then the
/// time per round of each head, then the losslessness check.
pub fn to_markdown(summaries: &[Summary]) -> String {
    let mut md = String::new();
    let temps: BTreeSet<u32> = summaries.iter().map(|s| s.temperature.to_bits()).collect();
    let sets = first_seen(summaries.iter().map(|s| s.set.as_str()));
    let methods = first_seen(summaries.iter().map(|s| s.method.as_str()));
    for t in temps.into_iter().map(f32::from_bits) {
        let at = |set: &str, m: &str| {
            summaries
                .iter()
                .find(|s| s.temperature == t && s.set == set && s.method == m)
        };
        let _ = writeln!(
            md,
            "**T = {t}** — speedup over vanilla and τ (vanilla: tokens/s)\n"
        );
        let _ = writeln!(md, "| method | {} |", sets.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(sets.len()));
        for m in &methods {
            let cells: Vec<String> = sets
                .iter()
                .map(|s| at(s, m).map(cell).unwrap_or_default())
                .collect();
            let _ = writeln!(md, "| {m} | {} |", cells.join(" | "));
        }
        let _ = writeln!(
            md,
            "\n| method (all questions) | tokens/s | decode tokens/s | new tokens | draft ms/round | verify ms/round | other ms/round | identical to vanilla |\n|---|---|---|---|---|---|---|---|"
        );
        for m in &methods {
            if let Some(s) = at(OVERALL, m) {
                let ms = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or("—".into());
                let same = match s.identical_to_vanilla {
                    Some(true) => "yes".to_string(),
                    Some(false) => "**NO**".to_string(),
                    None => "—".to_string(),
                };
                let _ = writeln!(
                    md,
                    "| {m} | {:.1} | {:.1} | {} | {} | {} | {} | {same} |",
                    s.tokens_per_s,
                    s.decode_tokens_per_s,
                    s.new_tokens,
                    ms(s.draft_ms_per_round),
                    ms(s.verify_ms_per_round),
                    ms(s.other_ms_per_round)
                );
            }
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::TurnResult;

    fn turn(new_tokens: usize, wall_s: f64, rounds: usize, accepted: usize) -> TurnResult {
        TurnResult {
            prompt_tokens: 10,
            new_tokens,
            wall_s,
            // The prefill takes a tenth of the turn.
            decode_s: 0.9 * wall_s,
            rounds,
            accepted,
            draft_s: 0.1 * rounds as f64,
            verify_s: 0.2 * rounds as f64,
            other_s: 0.0,
            answer: String::new(),
            tokens: Vec::new(),
        }
    }

    fn q(
        set: &str,
        id: u64,
        method: &str,
        turns: Vec<TurnResult>,
        same: Option<bool>,
    ) -> QuestionResult {
        QuestionResult {
            set: set.into(),
            question_id: id,
            temperature: 0.0,
            method: method.into(),
            turns,
            identical_to_vanilla: same,
        }
    }

    #[test]
    fn speedup_is_a_ratio_of_mean_per_question_speeds_and_tau_a_mean_of_per_question_taus() {
        let results = vec![
            q(
                "a",
                1,
                VANILLA,
                vec![turn(10, 1.0, 0, 0), turn(30, 1.0, 0, 0)],
                None,
            ),
            q(
                "a",
                1,
                "hass",
                vec![turn(10, 0.5, 4, 6), turn(30, 1.5, 6, 14)],
                Some(true),
            ),
            q("b", 2, VANILLA, vec![turn(40, 4.0, 0, 0)], None),
            q("b", 2, "hass", vec![turn(40, 1.0, 10, 30)], Some(false)),
        ];
        let s = summaries(&results);
        let get = |set: &str, m: &str| s.iter().find(|x| x.set == set && x.method == m).unwrap();
        // Set a: vanilla 40/2 = 20 tok/s, hass 40/2 = 20 tok/s; τ = 1 + 20/10.
        assert_eq!(get("a", "hass").speedup, 1.0);
        assert_eq!(get("a", "hass").tau, Some(3.0));
        assert_eq!(get("a", "hass").identical_to_vanilla, Some(true));
        // Overall: vanilla mean(20, 10) = 15, hass mean(20, 40) = 30; τ mean(3, 4).
        let o = get(OVERALL, "hass");
        assert_eq!(o.speedup, 2.0);
        assert_eq!(o.tau, Some(3.5));
        assert_eq!(o.identical_to_vanilla, Some(false));
        assert!((o.draft_ms_per_round.unwrap() - 100.0).abs() < 1e-9);
        assert_eq!(get(OVERALL, VANILLA).tau, None);
        // Decode speed: (new tokens − 1 per turn) / decode time, per question, then
        // the mean: set a's hass (9 + 29) / 1.8 s, set b's 39 / 0.9 s.
        let want = ((9.0 + 29.0) / 1.8 + 39.0 / 0.9) / 2.0;
        assert!((o.decode_tokens_per_s - want).abs() < 1e-9);
        let md = to_markdown(&s);
        assert!(
            md.contains("| hass | 1.00× · τ 3.00 |") && md.contains("**NO**"),
            "{md}"
        );
        assert!(crate::chart::svg(&s).contains("hass, T = 0"));
    }
}
