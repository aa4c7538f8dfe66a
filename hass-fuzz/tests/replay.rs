//! Replays the seed corpus (`fuzz/corpus/<target>/`) and every input that once
//! crashed or hung a target (`fuzz/regressions/<target>/`) through the harnesses, on
//! stable Rust: the cheap CI check that the parsers still answer these inputs without
//! panicking or hanging (the coverage-guided runs need nightly and `cargo fuzz`).

use std::path::Path;

fn replay(target: &str, harness: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("readable corpus directory").path();
            let data = std::fs::read(&path).expect("readable corpus file");
            eprintln!("{target}: {}", path.display());
            harness(&data);
            count += 1;
        }
    }
    assert!(count > 0, "no seed inputs for {target}");
}

#[test]
fn gguf() {
    replay("gguf", hass_fuzz::gguf);
}

#[test]
fn safetensors_dir() {
    replay("safetensors_dir", hass_fuzz::safetensors_dir);
}

#[test]
fn tokenizer() {
    replay("tokenizer", hass_fuzz::tokenizer);
}

#[test]
fn chat_template() {
    replay("chat_template", hass_fuzz::chat_template);
}

#[test]
fn draft_head() {
    replay("draft_head", hass_fuzz::draft_head);
}
