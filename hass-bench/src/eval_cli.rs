//! `hass-bench eval`: loads the target and the heads, optionally sweeps the tree shape,
//! runs the benchmark with a progress bar and writes `results.json`, `results.md` and
//! `chart.svg`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use hass_core::tree::TreeParams;
use hass_infer::tuning::{AutoTree, ResolvedTree, TreeSpec};
use hass_models::assets::{ensure, find_data, Asset};
use hass_models::backend::backend_name;
use hass_models::{default_device, load_model, DefaultBackend, DraftHead, WeightDtype};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::chart;
use crate::eval::{run_methods, sampling, Method, QuestionResult, VANILLA};
use crate::prompts::{default_dir, load_set, Question, SETS};
use crate::report::{summaries, to_markdown, Summary, OVERALL};
use crate::sweep::{grid, sweep, SweepReport};

/// The committed SmolLM2 heads, used when the default model runs without `--head`.
const DEFAULT_HEADS: [(&str, &str); 3] = [
    ("eagle", "smollm2-eagle"),
    ("hass", "smollm2-hass"),
    ("hass-v8k-long", "smollm2-hass-v8k-long"),
];

#[derive(Args, Debug, Clone, Serialize)]
pub struct EvalArgs {
    /// HF model directory or .gguf [default: SmolLM2-135M-Instruct, fetched on first use]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Draft head as NAME=DIR (repeatable) [default for SmolLM2: the committed
    /// eagle=heads/smollm2-eagle, hass=heads/smollm2-hass and
    /// hass-v8k-long=heads/smollm2-hass-v8k-long]
    #[arg(long = "head")]
    pub heads: Vec<String>,
    /// Storage of the target's weight matrices: auto (a GGUF's quantized blocks as
    /// stored, on the CPU), q4_0, q4_1, q8_0, f16 or f32. Every storage runs decode and
    /// verify products through a batch-invariant kernel, so T = 0 outputs stay
    /// identical to vanilla.
    #[arg(long, default_value = "f16")]
    pub dtype: WeightDtype,
    /// Folder of the prompt sets [default: the repository's bench-prompts/]
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_values_t = SETS.map(String::from))]
    pub sets: Vec<String>,
    /// Questions per set (all when absent).
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    pub temperatures: Vec<f32>,
    /// Per turn (the reference uses 512).
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Tree: `auto` (per head, from this machine's measured costs and the head's
    /// acceptance; cached in $HASS_CACHE/tuning) or total_tokens,depth,top_k (total
    /// excludes the root).
    #[arg(long, default_value = "auto")]
    pub tree: TreeSpec,
    /// Untimed runs of every method on the first question before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seed of question i at T > 0 is seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// First find the fastest tree shape on a subset (with the first head), then
    /// benchmark with it.
    #[arg(long)]
    pub sweep: bool,
    /// Questions per set in the sweep (first turns only).
    #[arg(long, default_value_t = 1)]
    pub sweep_limit: usize,
    #[arg(long, default_value_t = 64)]
    pub sweep_max_new_tokens: usize,
    #[arg(long, value_delimiter = ',', default_value = "2,4,7,11,15,31")]
    pub sweep_total: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,5")]
    pub sweep_depth: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub sweep_top_k: Vec<usize>,
    /// Stop after the sweep.
    #[arg(long)]
    pub sweep_only: bool,
    /// Output folder for results.json, results.md, chart.svg.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
}

#[derive(Serialize)]
struct Report<'a> {
    model: String,
    backend: &'static str,
    cpus: usize,
    args: &'a EvalArgs,
    trees: &'a [HeadTree],
    sweep: Option<&'a SweepReport>,
    summaries: &'a [Summary],
    questions: &'a [QuestionResult],
}

/// The tree a head decoded with, and how `auto` chose it.
#[derive(Serialize)]
struct HeadTree {
    head: String,
    tree: TreeParams,
    auto: Option<AutoTree>,
}

/// For each `auto` tree, the tuner's decode-speed prediction next to what these
/// questions measured at T = 0 (decode phase, so prefill does not blur it).
fn predicted_vs_measured(trees: &[HeadTree], sums: &[Summary]) -> String {
    let overall = |method: &str| {
        sums.iter()
            .find(|s| s.temperature == 0.0 && s.set == OVERALL && s.method == method)
    };
    let mut out = String::new();
    for t in trees {
        let (Some(a), Some(s), Some(v)) = (&t.auto, overall(&t.head), overall(VANILLA)) else {
            continue;
        };
        out += &format!(
            "\n`--tree auto` for {}: predicted {:.1} decode tokens/s against vanilla's {:.1} \
             ({}); measured here at T = 0, {:.1} against {:.1} ({:.2}×).\n",
            t.head,
            a.choice.tokens_per_s,
            a.vanilla_tokens_per_s,
            if a.speculate {
                "speculates"
            } else {
                "decodes plainly"
            },
            s.decode_tokens_per_s,
            v.decode_tokens_per_s,
            s.decode_tokens_per_s / v.decode_tokens_per_s.max(1e-12)
        );
    }
    out
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{elapsed_precise}] {bar:30} {pos}/{len} (eta {eta})")
            .expect("valid template"),
    );
    pb.set_message(what.to_string());
    pb
}

fn parse_heads(args: &EvalArgs, default_model: bool) -> Result<Vec<(String, PathBuf)>> {
    if args.heads.is_empty() {
        if !default_model {
            bail!("give the draft heads of this model with --head NAME=DIR");
        }
        return DEFAULT_HEADS
            .iter()
            .map(|(n, d)| {
                let dir = find_data(
                    &format!("heads/{d}"),
                    "or give the heads with --head NAME=DIR",
                )?;
                Ok((n.to_string(), dir))
            })
            .collect();
    }
    args.heads
        .iter()
        .map(|h| match h.split_once('=') {
            Some((n, d)) if !n.is_empty() && n != crate::eval::VANILLA => {
                Ok((n.to_string(), PathBuf::from(d)))
            }
            _ => bail!("--head takes NAME=DIR (NAME not `vanilla`), got `{h}`"),
        })
        .collect()
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs `hass-bench eval`.
pub fn run_eval(args: EvalArgs) -> Result<()> {
    let default_model = args.model.is_none();
    let path = match &args.model {
        Some(p) => p.clone(),
        None => ensure(Asset::SmolLm2)?,
    };
    let target = load_model::<DefaultBackend>(&path, &default_device(), args.dtype)
        .with_context(|| format!("loading {}", path.display()))?;
    let head_dirs = parse_heads(&args, default_model)?;
    let heads: Vec<(String, DraftHead<DefaultBackend>)> = head_dirs
        .iter()
        .map(|(n, d)| {
            let head = DraftHead::load(d, &target.model)
                .with_context(|| format!("loading head `{n}` from {}", d.display()))?;
            Ok((n.clone(), head))
        })
        .collect::<Result<_>>()?;
    if heads.is_empty() {
        bail!("no draft heads");
    }
    let dir = match &args.prompts {
        Some(d) => d.clone(),
        None => default_dir()?,
    };
    let mut questions: Vec<(String, Question)> = Vec::new();
    for set in &args.sets {
        for q in load_set(&dir, set, args.limit)? {
            questions.push((set.clone(), q));
        }
    }
    let dtype = format!("{:?}", args.dtype).to_lowercase();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    eprintln!(
        "model {} ({} weights, {} backend); heads: {}; {} questions",
        path.display(),
        dtype,
        backend_name(),
        heads
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        questions.len()
    );

    let mut sweep_report = None;
    let mut spec = args.tree;
    if args.sweep {
        let subset: Vec<(String, Question)> = args
            .sets
            .iter()
            .flat_map(|s| {
                questions
                    .iter()
                    .filter(move |(qs, _)| qs == s)
                    .take(args.sweep_limit)
            })
            .cloned()
            .collect();
        let shapes = grid(&args.sweep_total, &args.sweep_depth, &args.sweep_top_k);
        let pb = bar(subset.len() * (shapes.len() + 1), "sweep");
        let r = sweep(
            &target,
            &heads[0].1,
            &subset,
            &shapes,
            args.sweep_max_new_tokens,
            || pb.inc(1),
        )?;
        pb.finish();
        let md = r.to_markdown();
        println!("{md}");
        write(&args.out.join("sweep.md"), &md)?;
        let best = r.best();
        println!(
            "best tree on this machine: total_tokens {}, depth {}, top_k {}\n",
            best.total_tokens, best.depth, best.top_k
        );
        spec = TreeSpec::Fixed(best);
        sweep_report = Some(r);
        if args.sweep_only {
            return Ok(());
        }
    }

    let mut trees = Vec::new();
    for ((name, head), (_, dir)) in heads.iter().zip(&head_dirs) {
        // A benchmark measures the head even where `auto` would decode plainly: it
        // runs the best tree, and the report says what `auto` decided.
        let ResolvedTree { tree, auto } = spec.resolve(&target, head, dir, args.dtype)?;
        if let Some(a) = &auto {
            eprintln!("{name}: {a}");
        }
        trees.push(HeadTree {
            head: name.clone(),
            tree,
            auto,
        });
    }
    let mut methods = vec![Method::vanilla()];
    for ((name, head), t) in heads.iter().zip(&trees) {
        methods.push(Method {
            name: name.clone(),
            head: Some((head, t.tree)),
        });
    }
    if let Some((set, q)) = questions.first() {
        for _ in 0..args.warmup {
            run_methods(&target, &methods, set, q, sampling(0.0, 0, 0)?, 32)?;
        }
    }
    let pb = bar(
        questions.len() * args.temperatures.len() * methods.len(),
        "eval",
    );
    let start = Instant::now();
    let mut results = Vec::new();
    for &t in &args.temperatures {
        for (i, (set, q)) in questions.iter().enumerate() {
            let rs = run_methods(
                &target,
                &methods,
                set,
                q,
                sampling(t, args.seed, i)?,
                args.max_new_tokens,
            )?;
            pb.inc(rs.len() as u64);
            results.extend(rs);
        }
    }
    pb.finish();
    let sums = summaries(&results);
    let md = format!(
        "{}\nModel `{}` ({} weights), backend {}, {} CPUs; trees (total_tokens,depth,top_k) {}; \
         ≤ {} new tokens per turn; {} questions per temperature; wall time {:.0} s.\n",
        to_markdown(&sums),
        path.file_name()
            .map_or(path.display().to_string(), |f| f.to_string_lossy().into()),
        dtype,
        backend_name(),
        cpus,
        trees
            .iter()
            .map(|t| format!(
                "{} {},{},{}{}",
                t.head,
                t.tree.total_tokens,
                t.tree.depth,
                t.tree.top_k,
                t.auto.as_ref().map_or(String::new(), |a| format!(
                    " (auto, predicted τ {:.2}, {:.1} vs vanilla {:.1} tokens/s{})",
                    a.choice.expected_tau,
                    a.choice.tokens_per_s,
                    a.vanilla_tokens_per_s,
                    if a.speculate {
                        ""
                    } else {
                        "; auto would decode plainly"
                    }
                ))
            ))
            .collect::<Vec<_>>()
            .join(", "),
        args.max_new_tokens,
        questions.len(),
        start.elapsed().as_secs_f64()
    ) + &predicted_vs_measured(&trees, &sums);
    println!("{md}");
    write(&args.out.join("results.md"), &md)?;
    write(&args.out.join("chart.svg"), &chart::svg(&sums))?;
    let report = Report {
        model: path.display().to_string(),
        backend: backend_name(),
        cpus,
        args: &args,
        trees: &trees,
        sweep: sweep_report.as_ref(),
        summaries: &sums,
        questions: &results,
    };
    write(
        &args.out.join("results.json"),
        &serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!(
        "wrote {}/results.{{json,md}} and chart.svg",
        args.out.display()
    );
    let broken: Vec<String> = results
        .iter()
        .filter(|r| r.identical_to_vanilla == Some(false))
        .map(|r| format!("{} {} ({})", r.set, r.question_id, r.method))
        .collect();
    if !broken.is_empty() {
        bail!(
            "at T = 0 these outputs differ from vanilla (losslessness violated): {}",
            broken.join(", ")
        );
    }
    Ok(())
}
