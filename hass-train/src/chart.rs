//! A small SVG chart of a training run: the per-step loss and, per epoch, the
//! held-out loss and top-1 accuracy. Hand-written SVG keeps the dependency list short.

use std::path::Path;

use hass_core::{HassError, Result};

use crate::train::EvalMetrics;

const W: f64 = 720.0;
const H: f64 = 260.0;
const PAD: f64 = 40.0;

fn polyline(values: &[f64], x0: f64, width: f64, lo: f64, hi: f64, color: &str) -> String {
    if values.is_empty() {
        return String::new();
    }
    let span = (hi - lo).max(1e-12);
    let n = (values.len().max(2) - 1) as f64;
    let pts: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = x0 + width * i as f64 / n;
            let y = PAD + (H - 2.0 * PAD) * (1.0 - (v - lo) / span);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
        pts.join(" ")
    )
}

fn panel(title: &str, x0: f64, series: &[(&str, &str, Vec<f64>)]) -> String {
    let width = W / 2.0 - 2.0 * PAD;
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let mut s = format!(
        "<rect x=\"{x0}\" y=\"{PAD}\" width=\"{width}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>\n\
         <text x=\"{x0}\" y=\"{}\" font-size=\"13\">{title}</text>\n\
         <text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{hi:.3}</text>\n\
         <text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{lo:.3}</text>\n",
        H - 2.0 * PAD,
        PAD - 8.0,
        x0 - 3.0,
        PAD + 10.0,
        x0 - 3.0,
        H - PAD
    );
    for (i, (name, color, values)) in series.iter().enumerate() {
        s += &polyline(values, x0, width, lo, hi, color);
        s += &format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{color}\">{name}</text>\n",
            x0 + 8.0,
            H - PAD + 16.0 + 13.0 * i as f64
        );
    }
    s
}

/// Writes the chart to `path` (atomically).
pub fn write_chart(path: &Path, step_losses: &[f64], epochs: &[EvalMetrics]) -> Result<()> {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        H + 30.0
    );
    svg += &panel(
        "training loss per step",
        PAD + 10.0,
        &[("train loss", "#1f77b4", step_losses.to_vec())],
    );
    svg += &panel(
        "held-out, per epoch",
        W / 2.0 + PAD,
        &[
            (
                "test loss",
                "#d62728",
                epochs.iter().map(|e| e.loss).collect(),
            ),
            (
                "test top-1 accuracy",
                "#2ca02c",
                epochs.iter().map(|e| e.top1).collect(),
            ),
        ],
    );
    svg += "</svg>\n";
    let tmp = path.with_extension("svg.tmp");
    std::fs::write(&tmp, svg).map_err(|e| HassError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HassError::io(path, e))
}
