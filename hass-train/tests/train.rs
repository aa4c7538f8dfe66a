//! A short HASS training run on the tiny LLaMA-3-style fixture target: datagen on a
//! few synthetic conversations, then training lowers the held-out loss and raises the
//! held-out top-1 accuracy; the checkpoint decodes losslessly through `hass-infer`;
//! a run split across two invocations gives bit-identical weights.

use std::path::{Path, PathBuf};

use hass_core::chat::ChatMessage;
use hass_core::tree::TreeParams;
use hass_infer::{GenerationConfig, SpeculativeGenerator, VanillaGenerator};
use hass_models::{load_model, DraftHead, LoadedModel, WeightDtype};
use hass_train::data::{
    generate_shards, render_corpus, Conversation, DatagenOptions, RenderOptions, ShardDataset,
};
use hass_train::train::{train, RunOptions, StageConfig, TrainPlan};

type B = hass_models::DefaultBackend;
type AD = burn::backend::Autodiff<B>;

fn fixture() -> LoadedModel<B> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama3");
    load_model::<B>(dir, &Default::default(), WeightDtype::F32).unwrap()
}

/// 40 short, repetitive dialogues: enough structure for a draft to learn.
fn conversations() -> Vec<Conversation> {
    let subjects = [
        "the river",
        "a small dog",
        "the old town",
        "my brother",
        "the garden",
    ];
    let verbs = ["walks along", "looks at", "talks about", "runs to"];
    (0..40)
        .map(|i| {
            let s = subjects[i % subjects.len()];
            let v = verbs[i % verbs.len()];
            let q = format!("Tell me a story about {s}.");
            let a = format!("Every day {s} {v} the sea, and then {s} {v} the hills again.");
            Conversation::new(
                format!("c{i}"),
                vec![ChatMessage::user(q), ChatMessage::assistant(a)],
            )
            .unwrap()
        })
        .collect()
}

fn dataset(m: &LoadedModel<B>, dir: &Path) -> ShardDataset {
    let (samples, _) = render_corpus(
        &conversations(),
        &m.tokenizer,
        &m.chat_template,
        &RenderOptions::default(),
    )
    .unwrap();
    let opts = DatagenOptions {
        shard_size: 16,
        model_name: "llama3-fixture".into(),
        ..Default::default()
    };
    generate_shards(&m.model, samples, dir, &opts, false).unwrap();
    ShardDataset::open(dir, m.model.config().hidden_size).unwrap()
}

fn stage(epochs: usize) -> StageConfig {
    StageConfig {
        epochs,
        lr: 2e-3,
        batch_size: 4,
        forwards: 3,
        holdout: 0.1,
        kacc_samples: 1,
        ..StageConfig::default()
    }
}

#[test]
fn training_improves_the_head_and_the_checkpoint_decodes_losslessly() {
    train_and_decode(None);
}

/// The same with a reduced draft vocabulary of half the target's: the
/// checkpoint carries its own LM head and `d2t`, and decoding stays lossless.
#[test]
fn a_reduced_vocabulary_head_trains_and_decodes_losslessly() {
    let vocab = fixture().model.config().vocab_size;
    train_and_decode(Some(vocab / 2));
}

fn train_and_decode(draft_vocab_size: Option<usize>) {
    let m = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&m, &tmp.path().join("data"));
    let plan = TrainPlan {
        stages: vec![
            stage(6),
            StageConfig {
                topk_w: 1.0,
                lr: 5e-4,
                ..stage(1)
            },
        ],
        draft_vocab_size,
    };
    let out = tmp.path().join("run");
    let reports = train::<AD>(&m.model, &data, &plan, &out, &RunOptions::default()).unwrap();
    let e = &reports[0].epochs;
    println!(
        "held-out per epoch: {:?}",
        e.iter().map(|x| (x.loss, x.top1)).collect::<Vec<_>>()
    );
    assert!(
        e.last().unwrap().loss < e[0].loss,
        "held-out loss did not fall: {:?}",
        e
    );
    assert!(
        e.last().unwrap().top1 > e[0].top1,
        "held-out top-1 did not rise: {:?}",
        e
    );
    assert_eq!(e[0].kacc.len(), 5);
    assert_eq!(reports.len(), 2);
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.mpk",
        "state.json",
        "log.jsonl",
        "chart.svg",
    ] {
        assert!(out.join("stage2").join(f).is_file(), "{f} missing");
    }

    let head = DraftHead::load(out.join("stage2"), &m.model).unwrap();
    assert_eq!(head.draft_vocab().map(|v| v.size()), draft_vocab_size);
    assert_eq!(
        head.output_size(),
        draft_vocab_size.unwrap_or(m.model.config().vocab_size)
    );
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        stop_tokens: vec![u32::MAX],
        ..Default::default()
    };
    let rendered = m
        .chat_template
        .render(
            &[ChatMessage::user("Tell me a story about the river.")],
            true,
        )
        .unwrap();
    let prompt = m.tokenizer.encode(&rendered, false).unwrap();
    let want = VanillaGenerator::new(&m.model)
        .generate(&prompt, &cfg, |_| true)
        .unwrap();
    let mut g = SpeculativeGenerator::builder(&m.model)
        .head(&head)
        .tree(TreeParams::new(8, 3, 3).unwrap())
        .build()
        .unwrap();
    let got = g.generate(&prompt, &cfg, |_| true).unwrap();
    assert_eq!(got.tokens, want.tokens);
}

#[test]
fn a_run_split_across_invocations_is_bit_identical() {
    split_run_is_bit_identical(None);
}

#[test]
fn a_reduced_vocabulary_run_split_across_invocations_is_bit_identical() {
    split_run_is_bit_identical(Some(fixture().model.config().vocab_size / 2));
}

/// A run stopped after its first epoch, and one stopped after its first optimizer step
/// (a checkpoint inside an epoch), each resumed, end bit-identical to an uninterrupted
/// run.
fn split_run_is_bit_identical(draft_vocab_size: Option<usize>) {
    let m = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&m, &tmp.path().join("data"));
    let plan = TrainPlan {
        stages: vec![stage(2)],
        draft_vocab_size,
    };
    let a = tmp.path().join("a");
    train::<AD>(&m.model, &data, &plan, &a, &RunOptions::default()).unwrap();
    let read = |d: &Path| std::fs::read(d.join("stage1/model.safetensors")).unwrap();
    let stops = [
        RunOptions {
            stop_after_epochs: Some(1),
            ..Default::default()
        },
        RunOptions {
            stop_after_steps: Some(1),
            ..Default::default()
        },
    ];
    for (i, first) in stops.iter().enumerate() {
        let b = tmp.path().join(format!("b{i}"));
        let r = train::<AD>(&m.model, &data, &plan, &b, first).unwrap();
        assert_eq!(r[0].epochs.len(), 1 - i, "epochs done when stopped");
        train::<AD>(&m.model, &data, &plan, &b, &RunOptions::default()).unwrap();
        assert!(
            read(&a) == read(&b),
            "run resumed after {first:?} differs from the uninterrupted one"
        );
    }
}

#[test]
fn bad_training_input_is_an_error() {
    let m = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&m, &tmp.path().join("data"));
    let zero = TrainPlan {
        stages: vec![StageConfig {
            epochs: 0,
            ..stage(1)
        }],
        draft_vocab_size: None,
    };
    assert!(train::<AD>(&m.model, &data, &zero, tmp.path(), &RunOptions::default()).is_err());
    assert!(train::<AD>(
        &m.model,
        &data,
        &TrainPlan {
            stages: vec![],
            draft_vocab_size: None
        },
        tmp.path(),
        &RunOptions::default()
    )
    .is_err());
    assert!(
        ShardDataset::open(tmp.path().join("data"), 32).is_err(),
        "hidden-size mismatch must fail"
    );
}
