//! Training data for the draft head: conversation corpora, chat rendering with a
//! loss mask on assistant replies, target-feature generation into safetensors shards
//! (resumable), and reading the shards back (spec §1.3, §3.1).
//!
//! ```text
//! read_sharegpt / read_jsonl  →  Vec<Conversation>
//! (answers::answer: the target's own assistant turns, written out as JSONL)
//! render_corpus (template + tokenizer)  →  Vec<Sample { input_ids, loss_mask }>
//! generate_shards (target forward)  →  dir/shard_NNNNN.safetensors + datagen.json
//! ShardDataset::open(dir, hidden)  →  get(i) → TrainSample, split(0.05)
//! ShiftedSample::new(&sample, max_len) (+ add_uniform_noise)  →  Batch::collate
//! ```

pub mod answers;
pub mod corpus;
pub mod datagen;
pub mod pipeline;
pub mod render;
pub mod shards;

pub use corpus::{
    read_corpus, read_jsonl, read_sharegpt, shuffle_conversations, Conversation, ReadReport,
};
pub use datagen::{
    generate_shards, sample_features, DatagenOptions, DatagenReport, Manifest, MANIFEST,
};
pub use pipeline::{Batch, ShiftedSample};
pub use render::{
    render_corpus, render_sample, RenderOptions, RenderReport, Sample, LLAMA2_SYSTEM_PROMPT,
};
pub use shards::{
    shard_file_name, split_indices, FeatureDtype, SampleRef, ShardDataset, Split, TrainSample,
};
