//! Training-data pipeline: corpus readers, loss-mask rendering, datagen shards,
//! resume, reading back and its errors. All on small fixtures (fast); the SmolLM2
//! template check runs when the GGUF is cached.

use std::path::{Path, PathBuf};

use hass_core::{ChatMessage, ChatTemplate, HassError, Tokenizer};
use hass_models::{default_device, load_model, DefaultBackend, LoadedModel, WeightDtype};
use hass_train::data::{
    generate_shards, read_corpus, read_jsonl, read_sharegpt, render_corpus, render_sample,
    sample_features, shard_file_name, split_indices, Batch, Conversation, DatagenOptions,
    FeatureDtype, RenderOptions, Sample, ShardDataset, ShiftedSample, TrainSample, MANIFEST,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn conv_fixture(name: &str) -> PathBuf {
    fixtures().join("conversations").join(name)
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn load(name: &str) -> LoadedModel<DefaultBackend> {
    load_model::<DefaultBackend>(model_dir(name), &default_device(), WeightDtype::F32)
        .unwrap_or_else(|e| panic!("loading fixture model {name}: {e}"))
}

fn tokenizer_and_template(name: &str) -> (Tokenizer, ChatTemplate) {
    let dir = model_dir(name);
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let tpl = ChatTemplate::from_tokenizer_config(dir.join("tokenizer_config.json"))
        .unwrap()
        .unwrap_or_else(|| ChatTemplate::guess_builtin_for(&tok));
    (tok, tpl)
}

fn conv(id: &str, msgs: &[(&str, &str)]) -> Conversation {
    Conversation::new(
        id,
        msgs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect(),
    )
    .unwrap()
}

/// Conversations exercising the mask: multi-turn, system, punctuation, newlines.
fn test_conversations() -> Vec<Conversation> {
    vec![
        conv(
            "two_turns",
            &[
                ("user", "What is the capital of France?"),
                ("assistant", "The capital of France is Paris."),
                ("user", "And of Italy?"),
                ("assistant", "Rome, of course!"),
            ],
        ),
        conv(
            "system",
            &[
                ("system", "You are terse."),
                ("user", "Count to three."),
                ("assistant", "1, 2, 3."),
            ],
        ),
        conv(
            "newlines",
            &[
                ("user", "Write two lines."),
                ("assistant", "First line.\nSecond line."),
                ("user", "Thanks"),
            ],
        ),
    ]
}

fn temp_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

// ---------------------------------------------------------------- corpus readers

#[test]
fn sharegpt_streaming_reader_keeps_complete_records_and_stops_at_the_cut() {
    let (convs, report) = read_sharegpt(conv_fixture("sharegpt_truncated.json")).unwrap();
    let ids: Vec<&str> = convs.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "good_0",
            "leading_gpt_1",
            "tricky_strings_5",
            "leading_system_8"
        ]
    );
    assert_eq!(report.read, 9, "{report:?}");
    assert_eq!(report.skipped, 5, "{report:?}");
    assert_eq!(report.kept(), 4);
    assert_eq!(report.malformed, 2, "{report:?}"); // a string list, a bare number
    assert_eq!(report.no_assistant, 2, "{report:?}"); // only a human turn; empty list
    assert_eq!(report.non_alternating, 1, "{report:?}");
    assert!(report.truncated_tail);

    // Leading non-human messages are dropped (gpt, and system as the reference does).
    assert_eq!(convs[1].messages[0], ChatMessage::user("Say hello."));
    assert_eq!(convs[1].messages.len(), 2);
    assert_eq!(convs[3].messages[0], ChatMessage::user("Count to three."));
    // Escapes and brackets inside strings survive; `chatgpt` is an assistant.
    assert_eq!(
        convs[2].messages[0].content,
        "Brackets ] } [ { and commas , and \"quotes\" and a backslash \\ in text"
    );
    assert_eq!(
        convs[2].messages[1],
        ChatMessage::assistant("Noted: ]}, \\\" and café — fine.")
    );
    assert_eq!(convs[0].messages.len(), 4);
    assert_eq!(convs[0].assistant_turns(), 2);
}

#[test]
fn sharegpt_reader_without_truncation_and_error_cases() {
    let dir = tempfile::tempdir().unwrap();
    let p = temp_file(
        dir.path(),
        "ok.json",
        r#"[{"id":"a","conversations":[{"from":"human","value":"x"},{"from":"gpt","value":"y"}]}]"#,
    );
    let (convs, report) = read_sharegpt(&p).unwrap();
    assert_eq!(convs.len(), 1);
    assert!(!report.truncated_tail);
    assert_eq!(report.read, 1);

    // Empty corpus: an error, not an empty Vec.
    let empty = temp_file(dir.path(), "empty.json", "[]");
    let err = read_sharegpt(&empty).unwrap_err();
    assert!(err.to_string().contains("no usable conversation"), "{err}");
    // Only unusable records: also an error, with the counts.
    let bad = temp_file(
        dir.path(),
        "bad.json",
        r#"[{"id":"a","conversations":[{"from":"human","value":"x"}]}, 3]"#,
    );
    let err = read_sharegpt(&bad).unwrap_err().to_string();
    assert!(
        err.contains("2 records read") && err.contains("1 malformed"),
        "{err}"
    );
    // Not an array.
    let obj = temp_file(dir.path(), "obj.json", r#"{"id": 1}"#);
    assert!(matches!(
        read_sharegpt(&obj).unwrap_err(),
        HassError::MalformedFile { .. }
    ));
    let none = temp_file(dir.path(), "none.json", "");
    assert!(read_sharegpt(&none).is_err());
    assert!(matches!(
        read_sharegpt(dir.path().join("missing.json")).unwrap_err(),
        HassError::Io { .. }
    ));
}

#[test]
fn jsonl_reader_sharegpt_style() {
    let (convs, report) = read_jsonl(conv_fixture("sharegpt_style.jsonl")).unwrap();
    let ids: Vec<&str> = convs.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["s0", "line3", "s4"]);
    assert_eq!(report.read, 5, "{report:?}");
    assert_eq!(report.malformed, 1, "{report:?}");
    assert_eq!(report.no_assistant, 1, "{report:?}");
    assert_eq!(report.skipped, 2);
    assert!(report.truncated_tail);
    assert_eq!(convs[1].messages.len(), 4);
    assert_eq!(convs[2].messages[0], ChatMessage::user("Kept?"));
    // read_corpus dispatches on the extension.
    assert_eq!(
        read_corpus(conv_fixture("sharegpt_style.jsonl")).unwrap().0,
        convs
    );
}

#[test]
fn jsonl_reader_openai_style_keeps_system() {
    let (convs, report) = read_jsonl(conv_fixture("openai_style.jsonl")).unwrap();
    let ids: Vec<&str> = convs.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["o0", "o1"]);
    assert_eq!(report.read, 5);
    assert_eq!(report.malformed, 2, "{report:?}"); // `tool` role, numeric content
    assert_eq!(report.non_alternating, 1, "{report:?}");
    assert!(!report.truncated_tail);
    assert_eq!(
        convs[0].messages,
        vec![
            ChatMessage::system("You are a pirate."),
            ChatMessage::user("Greet me."),
            ChatMessage::assistant("Ahoy, matey!"),
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let empty = temp_file(dir.path(), "empty.jsonl", "\n\n");
    assert!(read_jsonl(&empty).is_err());
}

// ---------------------------------------------------------------- rendering + mask

/// The decoded masked spans of `sample`.
fn masked_texts(tok: &Tokenizer, s: &Sample) -> Vec<String> {
    s.masked_spans()
        .into_iter()
        .map(|r| tok.decode(&s.input_ids[r], false).unwrap())
        .collect()
}

fn assistant_texts(c: &Conversation) -> Vec<&str> {
    c.messages
        .iter()
        .filter(|m| m.role == "assistant")
        .map(|m| m.content.as_str())
        .collect()
}

fn check_mask_exact(model: &str, eot: &str) {
    let (tok, tpl) = tokenizer_and_template(model);
    for c in test_conversations() {
        let s = render_sample(&c, &tok, &tpl, &RenderOptions::default()).unwrap();
        assert_eq!(s.input_ids.len(), s.loss_mask.len());
        // The tokens are exactly the tokenised full rendering.
        let full = tok
            .encode(&tpl.render(&c.messages, false).unwrap(), false)
            .unwrap();
        assert_eq!(s.input_ids, full, "{model} {}", c.id);
        assert_eq!(s.loss_mask[0], 0, "BOS/first header is never trained on");
        let want: Vec<String> = assistant_texts(&c)
            .into_iter()
            .map(|t| format!("{t}{eot}"))
            .collect();
        assert_eq!(masked_texts(&tok, &s), want, "{model} {}", c.id);
    }
}

#[test]
fn loss_mask_is_exact_on_chatml_qwen2_fixture() {
    check_mask_exact("qwen2", "<|im_end|>");
}

#[test]
fn loss_mask_is_exact_on_llama3_fixture() {
    check_mask_exact("llama3", "<|eot_id|>");
}

#[test]
fn loss_mask_on_llama2_builtin_template() {
    // The llama2 fixture has no template (and its vocabulary has ChatML tokens, so
    // ChatML would be guessed): use the built-in LLaMA-2-chat one explicitly.
    let (tok, _) = tokenizer_and_template("llama2");
    let tpl = ChatTemplate::llama2_chat();
    for c in test_conversations() {
        let s = render_sample(&c, &tok, &tpl, &RenderOptions::default()).unwrap();
        let got = masked_texts(&tok, &s);
        let want: Vec<String> = assistant_texts(&c)
            .into_iter()
            .map(|t| format!("{t} </s>"))
            .collect();
        let got: Vec<String> = got.iter().map(|g| g.trim_start().to_string()).collect();
        assert_eq!(got, want, "llama2 {}", c.id);
    }
}

#[test]
fn loss_mask_options_system_prompt_space_and_truncation() {
    let (tok, tpl) = tokenizer_and_template("llama3");
    let c = &test_conversations()[0];
    let plain = render_sample(c, &tok, &tpl, &RenderOptions::default()).unwrap();
    let opts = RenderOptions {
        system_prompt: Some("Be nice.".into()),
        assistant_leading_space: true, // trimmed away by the Llama-3 template
        ..Default::default()
    };
    let s = render_sample(c, &tok, &tpl, &opts).unwrap();
    assert!(s.len() > plain.len());
    assert!(tok
        .decode(&s.input_ids, false)
        .unwrap()
        .contains("Be nice."));
    assert_eq!(masked_texts(&tok, &s), masked_texts(&tok, &plain));
    // Truncation keeps the prefix of ids and mask.
    let short = render_sample(
        c,
        &tok,
        &tpl,
        &RenderOptions {
            max_len: 20,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(short.len(), 20);
    assert_eq!(short.input_ids, plain.input_ids[..20]);
    assert_eq!(short.loss_mask, plain.loss_mask[..20]);
}

#[test]
fn loss_mask_falls_back_to_offsets_when_tokens_merge_at_the_seam() {
    // The generation prompt ends in a space that the reply's first word absorbs in the
    // full tokenisation, so the prefix tokens are not a prefix of the full tokens.
    let (tok, _) = tokenizer_and_template("qwen2");
    let tpl = ChatTemplate::new(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}assistant: {% endif %}",
        None,
        None,
    )
    .unwrap();
    let c = conv(
        "seam",
        &[("user", "hello there"), ("assistant", "the target model")],
    );
    let before = tok.encode("user: hello there\nassistant: ", false).unwrap();
    let full = tok
        .encode("user: hello there\nassistant: the target model\n", false)
        .unwrap();
    assert!(
        !full.starts_with(&before),
        "fixture precondition: the seam must merge tokens"
    );
    let s = render_sample(&c, &tok, &tpl, &RenderOptions::default()).unwrap();
    let got = masked_texts(&tok, &s);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].trim(), "the target model");
}

#[test]
fn unalignable_template_and_missing_assistant_are_clear_errors() {
    let (tok, _) = tokenizer_and_template("qwen2");
    // Renders the last message differently: a prefix is never a prefix of the whole.
    let tpl = ChatTemplate::new(
        "{% for m in messages %}{% if loop.last %}>> {% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let c = conv("odd", &[("user", "a"), ("assistant", "b"), ("user", "c")]);
    let err = render_sample(&c, &tok, &tpl, &RenderOptions::default()).unwrap_err();
    assert!(matches!(err, HassError::Template(_)), "{err}");
    assert!(err.to_string().contains("`odd`"), "{err}");

    // No assistant turn.
    let no_asst = Conversation {
        id: "lonely".into(),
        messages: vec![ChatMessage::user("anyone?")],
    };
    let (tok, tpl) = tokenizer_and_template("llama3");
    let err = render_sample(&no_asst, &tok, &tpl, &RenderOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no assistant turn"), "{err}");
    assert!(Conversation::new("x", vec![ChatMessage::user("a")]).is_err());
    // render_corpus skips it and counts; all-bad is an error.
    let good = test_conversations().remove(0);
    let (samples, report) = render_corpus(
        &[no_asst.clone(), good],
        &tok,
        &tpl,
        &RenderOptions::default(),
    )
    .unwrap();
    assert_eq!((samples.len(), report.failed), (1, 1));
    assert!(render_corpus(&[no_asst], &tok, &tpl, &RenderOptions::default()).is_err());
    assert!(render_corpus(&[], &tok, &tpl, &RenderOptions::default()).is_err());
}

#[test]
fn loss_mask_on_smollm2_gguf_template_when_cached() {
    let path = hass_models::assets::cached_path(hass_models::assets::Asset::SmolLm2);
    if !path.is_file() {
        eprintln!("SmolLM2 is not cached; skipping (scripts/fetch_assets.sh smollm2)");
        return;
    }
    let file = hass_models::gguf::GgufFile::open(&path).unwrap();
    let tok = hass_models::gguf_tokenizer::tokenizer_from_gguf(&file).unwrap();
    let src = hass_models::gguf_tokenizer::chat_template_from_gguf(&file).expect("template");
    let tid = |k: &str| file.get_u32(k).ok().and_then(|i| tok.id_to_token(i));
    let tpl = ChatTemplate::new(
        src,
        tid("tokenizer.ggml.bos_token_id").as_deref(),
        tid("tokenizer.ggml.eos_token_id").as_deref(),
    )
    .unwrap();
    for c in test_conversations() {
        let s = render_sample(&c, &tok, &tpl, &RenderOptions::default()).unwrap();
        let want: Vec<String> = assistant_texts(&c)
            .into_iter()
            .map(|t| format!("{t}<|im_end|>"))
            .collect();
        assert_eq!(masked_texts(&tok, &s), want, "smollm2 {}", c.id);
        // The default system line of SmolLM2's template is there, unmasked.
        let text = tok.decode(&s.input_ids, false).unwrap();
        if c.messages[0].role != "system" {
            assert!(text.contains("SmolLM"), "{text}");
        }
    }
}

// ---------------------------------------------------------------- datagen

fn llama3_samples() -> Vec<Sample> {
    let (tok, tpl) = tokenizer_and_template("llama3");
    let mut convs = test_conversations();
    convs.push(conv("extra1", &[("user", "Ping"), ("assistant", "Pong")]));
    convs.push(conv(
        "extra2",
        &[
            ("user", "Say yes"),
            ("assistant", "Yes."),
            ("user", "Again"),
            ("assistant", "Yes."),
        ],
    ));
    render_corpus(&convs, &tok, &tpl, &RenderOptions::default())
        .unwrap()
        .0
}

fn opts(shard_size: usize) -> DatagenOptions {
    DatagenOptions {
        shard_size,
        dtype: FeatureDtype::F16,
        max_len: 256,
        model_name: "llama3-fixture".into(),
        workers: 1,
    }
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn datagen_end_to_end_resume_and_errors() {
    let m = load("llama3");
    let model = &m.model;
    let hidden = model.config().hidden_size;
    let samples = llama3_samples();
    assert_eq!(samples.len(), 5);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");

    let r = generate_shards(model, samples.clone(), &out, &opts(2), false).unwrap();
    assert_eq!(
        (r.samples, r.shards, r.shards_written, r.shards_skipped),
        (5, 3, 3, 0)
    );
    assert_eq!(r.samples_computed, 5);
    let total: usize = samples.iter().map(Sample::len).sum();
    assert_eq!(r.tokens_computed, total);
    assert!(r.tokens_per_sec > 0.0);
    assert!(out.join(MANIFEST).is_file());

    // Read back: ids, mask and features (within f16 rounding).
    let ds = ShardDataset::open(&out, hidden).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.shard_paths().len(), 3);
    assert_eq!(
        ds.samples()
            .iter()
            .map(|s| (s.shard, s.index))
            .collect::<Vec<_>>(),
        [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    );
    for (j, s) in samples.iter().enumerate() {
        let t = ds.get(j).unwrap();
        assert_eq!(t.input_ids, s.input_ids);
        assert_eq!(
            t.loss_mask,
            s.loss_mask.iter().map(|&b| b as f32).collect::<Vec<_>>()
        );
        let f = sample_features(model, &s.input_ids).unwrap();
        assert_eq!(t.hidden.len(), s.len() * hidden);
        assert_eq!(t.feature(0).len(), hidden);
        for (a, b) in t.hidden.iter().zip(&f) {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs() + 1e-5,
                "sample {j}: stored {a} vs computed {b}"
            );
        }
    }
    assert!(ds.get(5).is_err());

    // Several workers write byte-identical shards.
    let par = dir.path().join("parallel");
    let o2 = DatagenOptions {
        workers: 3,
        ..opts(2)
    };
    let r = generate_shards(model, samples.clone(), &par, &o2, false).unwrap();
    assert_eq!((r.shards_written, r.samples_computed), (3, 5));
    for k in 0..3 {
        let a = std::fs::read(out.join(shard_file_name(k))).unwrap();
        let b = std::fs::read(par.join(shard_file_name(k))).unwrap();
        assert!(a == b, "shard {k} differs between 1 and 3 workers");
    }

    // Split: the first ⌊n·0.95⌋ (at least one) train.
    let sp = ds.split(0.05);
    assert_eq!((sp.train.len(), sp.test.len()), (4, 1));
    assert_eq!(sp.test, [4]);
    let big = split_indices(100, 0.05);
    assert_eq!((big.train.len(), big.test.len()), (95, 5));
    assert_eq!(big.train[94], 94);

    // Resume: nothing to do.
    let r = generate_shards(model, samples.clone(), &out, &opts(2), false).unwrap();
    assert_eq!(
        (r.shards_written, r.shards_skipped, r.samples_computed),
        (0, 3, 0)
    );

    // Delete one shard: only it is recomputed; the others are untouched.
    let s0 = out.join(shard_file_name(0));
    let s1 = out.join(shard_file_name(1));
    let s2 = out.join(shard_file_name(2));
    let (t0, t2) = (mtime(&s0), mtime(&s2));
    std::fs::remove_file(&s1).unwrap();
    let r = generate_shards(model, samples.clone(), &out, &opts(2), false).unwrap();
    assert_eq!(
        (r.shards_written, r.shards_skipped, r.samples_computed),
        (1, 2, 2)
    );
    assert!(s1.is_file());
    assert_eq!((mtime(&s0), mtime(&s2)), (t0, t2));
    assert_eq!(
        ShardDataset::open(&out, hidden)
            .unwrap()
            .get(2)
            .unwrap()
            .input_ids,
        samples[2].input_ids
    );

    // Manifest mismatch: another shard size, or another corpus.
    let err = generate_shards(model, samples.clone(), &out, &opts(3), false).unwrap_err();
    assert!(matches!(err, HassError::Config { .. }), "{err}");
    assert!(err.to_string().contains("shard_size"), "{err}");
    let mut other = samples.clone();
    other[0].loss_mask[1] ^= 1;
    let err = generate_shards(model, other, &out, &opts(2), false).unwrap_err();
    assert!(err.to_string().contains("corpus_hash"), "{err}");

    // The same target in f16 weights resumes (the model probe has a tolerance) ...
    let m16 =
        load_model::<DefaultBackend>(model_dir("llama3"), &default_device(), WeightDtype::F16)
            .unwrap();
    let r = generate_shards(&m16.model, samples.clone(), &out, &opts(2), false).unwrap();
    assert_eq!(r.samples_computed, 0);
    // ... but another model of the same shape (simulated: a doctored probe) does not.
    let man_path = out.join(MANIFEST);
    let original = std::fs::read_to_string(&man_path).unwrap();
    let mut man: serde_json::Value = serde_json::from_str(&original).unwrap();
    for v in man["probe"].as_array_mut().unwrap() {
        *v = serde_json::json!(v.as_f64().unwrap() * 2.0 + 1.0);
    }
    std::fs::write(&man_path, man.to_string()).unwrap();
    let err = generate_shards(model, samples.clone(), &out, &opts(2), false).unwrap_err();
    assert!(err.to_string().contains("another target model"), "{err}");
    std::fs::write(&man_path, original).unwrap();

    // Hidden-size mismatch with the target.
    let err = ShardDataset::open(&out, hidden + 1).unwrap_err();
    match &err {
        HassError::ShapeMismatch { file, name, .. } => {
            assert!(file.contains("shard_00000"), "{err}");
            assert_eq!(name, "0.hidden_state");
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }

    // A truncated shard: a malformed-file error naming it; a rerun recomputes it.
    let len = std::fs::metadata(&s2).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&s2).unwrap();
    f.set_len(len - 7).unwrap();
    drop(f);
    let err = ShardDataset::open(&out, hidden).unwrap_err();
    match &err {
        HassError::MalformedFile { file, .. } => assert!(file.contains("shard_00002"), "{err}"),
        other => panic!("expected a malformed file, got {other}"),
    }
    let f = std::fs::OpenOptions::new().write(true).open(&s2).unwrap();
    f.set_len(5).unwrap();
    drop(f);
    assert!(matches!(
        ShardDataset::open(&out, hidden).unwrap_err(),
        HassError::MalformedFile { .. }
    ));
    let r = generate_shards(model, samples.clone(), &out, &opts(2), false).unwrap();
    assert_eq!((r.shards_written, r.samples_computed), (1, 1));
    ShardDataset::open(&out, hidden).unwrap();

    // Empty corpus and empty directory.
    let err =
        generate_shards(model, Vec::new(), dir.path().join("e"), &opts(2), false).unwrap_err();
    assert!(err.to_string().contains("no samples"), "{err}");
    std::fs::create_dir_all(dir.path().join("void")).unwrap();
    assert!(ShardDataset::open(dir.path().join("void"), hidden).is_err());
}

#[test]
fn datagen_bf16_and_missing_tensor() {
    let m = load("llama3");
    let model = &m.model;
    let hidden = model.config().hidden_size;
    let samples: Vec<Sample> = llama3_samples().into_iter().take(2).collect();
    let dir = tempfile::tempdir().unwrap();
    let o = DatagenOptions {
        dtype: FeatureDtype::Bf16,
        max_len: 16,
        ..opts(8)
    };
    let r = generate_shards(model, samples.clone(), dir.path(), &o, false).unwrap();
    assert_eq!(r.shards, 1);
    let ds = ShardDataset::open(dir.path(), hidden).unwrap();
    let t = ds.get(1).unwrap();
    assert_eq!(t.len(), 16, "truncated to max_len");
    let f = sample_features(model, &samples[1].input_ids[..16]).unwrap();
    for (a, b) in t.hidden.iter().zip(&f) {
        assert!((a - b).abs() <= 8e-3 * b.abs() + 1e-5, "{a} vs {b}");
    }

    // A hand-made shard lacking a tensor.
    let bad = tempfile::tempdir().unwrap();
    let ids: Vec<u8> = [1i32, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![3], &ids).unwrap();
    let mut md = std::collections::HashMap::new();
    md.insert("num_samples".to_string(), "1".to_string());
    let bytes = safetensors::serialize([("0.input_ids", view)], Some(md)).unwrap();
    std::fs::write(bad.path().join(shard_file_name(0)), bytes).unwrap();
    let err = ShardDataset::open(bad.path(), hidden).unwrap_err();
    assert!(
        matches!(&err, HassError::MissingTensor { name, .. } if name == "0.loss_mask"),
        "{err}"
    );
}

// ---------------------------------------------------------------- shift, noise, batch

fn toy_sample(len: usize, h: usize) -> TrainSample {
    TrainSample {
        input_ids: (10..10 + len as u32).collect(),
        loss_mask: (0..len).map(|t| (t >= 1) as u8 as f32).collect(),
        hidden: (0..len * h).map(|i| i as f32).collect(),
        hidden_size: h,
    }
}

#[test]
fn shift_noise_and_collate_follow_the_reference() {
    use rand::SeedableRng;
    let s = toy_sample(4, 2);
    let sh = ShiftedSample::new(&s, 2048);
    assert_eq!(sh.input_ids, [11, 12, 13, 0]);
    assert_eq!(sh.hidden, s.hidden);
    assert_eq!(sh.target, [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0, 0.0]);
    assert_eq!(
        sh.loss_mask,
        [0.0, 1.0, 1.0, 0.0],
        "unshifted, last forced to 0"
    );
    let short = ShiftedSample::new(&s, 3);
    assert_eq!(short.input_ids, [11, 12, 0]);
    assert_eq!(short.target, [2.0, 3.0, 4.0, 5.0, 0.0, 0.0]);

    // Noise: uniform in ±std·512/(2L) on the inputs only.
    let mut noisy = ShiftedSample::new(&toy_sample(256, 8), 2048);
    let clean = noisy.clone();
    noisy.add_uniform_noise(0.2, &mut rand::rngs::StdRng::seed_from_u64(0));
    let bound = 0.2 * 512.0 / 256.0 / 2.0;
    let d: Vec<f32> = noisy
        .hidden
        .iter()
        .zip(&clean.hidden)
        .map(|(a, b)| a - b)
        .collect();
    assert!(d.iter().all(|x| x.abs() <= bound + 1e-4));
    assert!(d.iter().any(|x| x.abs() > bound * 0.9));
    assert_eq!(noisy.target, clean.target);

    let b = Batch::collate(&[sh.clone(), short.clone()]);
    assert_eq!((b.batch, b.len, b.hidden_size), (2, 4, 2));
    assert_eq!(b.input_ids, [11, 12, 13, 0, 11, 12, 0, 0]);
    assert_eq!(b.attention_mask, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
    assert_eq!(b.loss_mask, [0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    assert_eq!(&b.target[8..], [2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(b.lens, [4, 3]);
}

// ---------------------------------------------------------------- real assets (ignored)

/// The real ShareGPT dump and a SmolLM2 datagen timing. Run with
/// `cargo test --release -p hass-train --test data -- --ignored --nocapture`
/// after `scripts/fetch_assets.sh sharegpt smollm2`.
#[test]
#[ignore = "needs the cached ShareGPT dump and SmolLM2 (minutes on CPU)"]
fn real_sharegpt_and_smollm2_datagen_speed() {
    use hass_models::assets::{cached_path, Asset};
    let sharegpt = cached_path(Asset::ShareGpt);
    let smollm2 = cached_path(Asset::SmolLm2);
    if !sharegpt.is_file() || !smollm2.is_file() {
        eprintln!("ShareGPT or SmolLM2 not cached; skipping");
        return;
    }
    let t = std::time::Instant::now();
    let (mut convs, report) = read_sharegpt(&sharegpt).unwrap();
    eprintln!(
        "ShareGPT: {} conversations kept in {:.2}s; {report:?}",
        convs.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(report.truncated_tail);
    assert_eq!(report.read, 17_671);

    let n: usize = std::env::var("HASS_DATAGEN_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let max_len: usize = std::env::var("HASS_DATAGEN_MAX_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    hass_train::data::shuffle_conversations(&mut convs, 42);
    let m = load_model::<DefaultBackend>(&smollm2, &default_device(), WeightDtype::F32).unwrap();
    let ropts = RenderOptions {
        max_len,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let (samples, rr) = render_corpus(&convs[..n], &m.tokenizer, &m.chat_template, &ropts).unwrap();
    eprintln!(
        "rendered {n} conversations in {:.2}s: {rr:?}",
        t.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir().unwrap();
    let o = DatagenOptions {
        shard_size: 4,
        dtype: FeatureDtype::F16,
        max_len,
        model_name: "SmolLM2-135M-Instruct".into(),
        workers: std::env::var("HASS_DATAGEN_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
    };
    let r = generate_shards(&m.model, samples, dir.path(), &o, true).unwrap();
    eprintln!(
        "datagen ({}, {} workers): {} samples, {} tokens in {:.2}s = {:.1} tokens/s",
        hass_models::backend::backend_name(),
        o.workers,
        r.samples_computed,
        r.tokens_computed,
        r.seconds,
        r.tokens_per_sec
    );
    let ds = ShardDataset::open(dir.path(), m.model.config().hidden_size).unwrap();
    assert_eq!(ds.len(), r.samples);
}

/// The target's own answers: user turns kept, each assistant turn the target's greedy
/// reply (the same as generating it directly), a JSONL file `read_jsonl` reads back,
/// turns that would not fit dropped, and a rerun that resumes after a cut-off line.
#[test]
fn own_answers_replace_assistant_turns_and_resume() {
    use hass_infer::{GenerationConfig, VanillaGenerator};
    use hass_train::data::answers::{answer, append_line, jsonl_line, resume_point, AnswerOptions};

    let m = load("llama3");
    let convs = test_conversations();
    let opts = AnswerOptions {
        max_new_tokens: 6,
        max_len: 4096,
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("own.jsonl");
    for c in &convs {
        let a = answer(&m.model, &m.tokenizer, &m.chat_template, c, &opts).unwrap();
        let own = a.conversation.expect("fits");
        // User (and system) turns up to the last assistant one: a trailing user turn
        // has no answer to train on.
        let users = |c: &Conversation| -> Vec<String> {
            let last = c
                .messages
                .iter()
                .rposition(|m| m.role == "assistant")
                .unwrap();
            c.messages[..last]
                .iter()
                .filter(|m| m.role != "assistant")
                .map(|m| m.content.clone())
                .collect()
        };
        assert_eq!(users(&own), users(c), "{}", c.id);
        assert_eq!(own.assistant_turns(), c.assistant_turns(), "{}", c.id);
        assert!(a.new_tokens >= own.assistant_turns(), "{}", c.id);
        append_line(&out, &jsonl_line(&own)).unwrap();
    }
    // The first answer is what vanilla greedy decoding of the first prompt gives.
    let first = &convs[0];
    let upto = first
        .messages
        .iter()
        .position(|m| m.role == "assistant")
        .unwrap();
    let prompt = m
        .tokenizer
        .encode(
            &m.chat_template
                .render(&first.messages[..upto], true)
                .unwrap(),
            false,
        )
        .unwrap();
    let config = GenerationConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let direct = VanillaGenerator::new(&m.model)
        .generate(&prompt, &config, |_| true)
        .unwrap();
    let (back, report) = read_jsonl(&out).unwrap();
    assert_eq!(back.len(), convs.len(), "{report:?}");
    let kept = match direct.stop_reason {
        hass_infer::StopReason::Stop => &direct.tokens[..direct.tokens.len() - 1],
        _ => &direct.tokens[..],
    };
    assert_eq!(
        back[0].messages[upto].content,
        m.tokenizer.decode(kept, true).unwrap()
    );

    // A context too short for the first answer: nothing to keep.
    let tight = AnswerOptions {
        max_new_tokens: 6,
        max_len: 8,
    };
    let a = answer(&m.model, &m.tokenizer, &m.chat_template, first, &tight).unwrap();
    assert!(a.conversation.is_none() && a.new_tokens == 0);

    // Resume: complete lines count, a cut-off line is removed.
    assert_eq!(resume_point(&out).unwrap(), convs.len());
    std::fs::write(
        &out,
        std::fs::read_to_string(&out).unwrap() + "{\"id\": \"half",
    )
    .unwrap();
    assert_eq!(resume_point(&out).unwrap(), convs.len());
    assert!(std::fs::read_to_string(&out).unwrap().ends_with('\n'));
    assert_eq!(resume_point(&tmp.path().join("none.jsonl")).unwrap(), 0);
}
