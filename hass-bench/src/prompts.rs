//! The six benchmark prompt sets (`bench-prompts/`, EAGLE's `question.jsonl` files):
//! one JSON object per line with `question_id`, `category` and the user `turns`.

use std::path::{Path, PathBuf};

use hass_core::{HassError, Result};
use serde::{Deserialize, Serialize};

/// The sets in the order the literature reports them.
pub const SETS: [&str; 6] = ["mt_bench", "humaneval", "gsm8k", "alpaca", "sum", "qa"];

/// One benchmark question; MT-bench has two turns, the others one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Question {
    pub question_id: u64,
    #[serde(default)]
    pub category: String,
    pub turns: Vec<String>,
}

/// The repository's copy of the prompt sets, found at run time
/// ([`hass_models::assets::find_data`]).
pub fn default_dir() -> Result<PathBuf> {
    hass_models::assets::find_data("bench-prompts", "or give the directory with --prompts DIR")
}

/// The first `limit` questions (all when `None`) of `dir/{set}.jsonl`.
pub fn load_set(dir: &Path, set: &str, limit: Option<usize>) -> Result<Vec<Question>> {
    let path = dir.join(format!("{set}.jsonl"));
    let text = std::fs::read_to_string(&path).map_err(|source| HassError::Io {
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line).map_err(|e| {
            HassError::InvalidArgument(format!("{} line {}: {e}", path.display(), i + 1))
        })?;
        if q.turns.is_empty() {
            return Err(HassError::InvalidArgument(format!(
                "{} line {}: question {} has no turns",
                path.display(),
                i + 1,
                q.question_id
            )));
        }
        out.push(q);
    }
    if out.is_empty() {
        return Err(HassError::InvalidArgument(format!(
            "{}: no questions",
            path.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_sets_load_with_their_turn_counts() {
        for set in SETS {
            let qs = load_set(&default_dir().unwrap(), set, None).unwrap();
            assert!(qs.len() >= 79, "{set}: {}", qs.len());
            let turns = if set == "mt_bench" { 2 } else { 1 };
            assert!(qs.iter().all(|q| q.turns.len() == turns), "{set}");
        }
        assert_eq!(
            load_set(&default_dir().unwrap(), "qa", Some(3))
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_set(dir.path(), "missing", None),
            Err(HassError::Io { .. })
        ));
        std::fs::write(dir.path().join("bad.jsonl"), "{\"question_id\": 1}\n").unwrap();
        assert!(load_set(dir.path(), "bad", None).is_err());
        std::fs::write(dir.path().join("empty.jsonl"), "\n").unwrap();
        assert!(load_set(dir.path(), "empty", None).is_err());
    }
}
