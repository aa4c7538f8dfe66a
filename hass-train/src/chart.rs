//! The chart of a training stage (`chart.svg` beside each checkpoint). The upper panel
//! shows the loss per optimizer step, raw and as a centred running mean, with the
//! held-out loss at the end of each epoch (epochs on the top axis); the lower panel shows
//! the held-out top-1 and top-3 accuracy per epoch in %, on its own axis since it does
//! not share the loss's scale. The loss axis names the weighted sum it plots rather than
//! a unit: the cross-entropy terms are in nats, the feature term (Smooth L1) is not.
//! plotters gives the axes and ticks that make this readable for little code, and its
//! SVG backend writes `<text>` elements, so neither the build nor the run needs fonts.

use std::ops::Range;
use std::path::Path;

use hass_core::{HassError, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::train::EvalMetrics;

const SIZE: (u32, u32) = (900, 760);
const MARGIN: i32 = 10;
/// Where the plots start: the margin plus the y axis's labels and description.
const PLOT_LEFT: i32 = 80;
const LEGEND_H: u32 = 32;
const LABEL_SIZE: u32 = 15;
const RAW: RGBColor = RGBColor(0xa0, 0xcb, 0xe8);
const SMOOTHED: RGBColor = RGBColor(0x1f, 0x4e, 0x8c);
const HELD_OUT: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const TOP1: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const TOP3: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
const FONT: &str = "sans-serif";

/// Half the window of the running mean: about 1/40 of the run on each side, at least 2.
fn half_window(steps: usize) -> usize {
    (steps / 40).max(2)
}

/// Centred running mean over `2 * half + 1` steps (fewer at the ends) of the finite
/// values; centred, so the smoothed curve does not lag behind the raw one.
fn running_mean(values: &[f64], half: usize) -> Vec<f64> {
    let mut prefix = vec![(0.0, 0usize)];
    for &v in values {
        let (sum, count) = *prefix.last().expect("starts non-empty");
        prefix.push(if v.is_finite() {
            (sum + v, count + 1)
        } else {
            (sum, count)
        });
    }
    (0..values.len())
        .map(|i| {
            let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(values.len()));
            let (sum, count) = (prefix[hi].0 - prefix[lo].0, prefix[hi].1 - prefix[lo].1);
            if count == 0 {
                f64::NAN
            } else {
                sum / count as f64
            }
        })
        .collect()
}

/// The span of the finite `values` with 5% room on each side (0..1 when there are none).
fn padded(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1.0) * 0.05
    };
    lo - pad..hi + pad
}

/// How many labels the epoch axes may have: one per whole epoch 0..=n, at most 11.
/// plotters then steps by 1, 2, 5, 10... epochs, so every label is a whole epoch.
fn epoch_labels(n: usize) -> usize {
    n.min(10) + 1
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn finite(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    points.filter(|(_, y)| y.is_finite()).collect()
}

/// A legend entry: a line of `color`, with a ring on it for series drawn with points.
struct Entry {
    label: String,
    color: RGBColor,
    ring: bool,
}

impl Entry {
    fn new(label: impl Into<String>, color: RGBColor, ring: bool) -> Self {
        Self {
            label: label.into(),
            color,
            ring,
        }
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult<T> = std::result::Result<T, DrawingAreaErrorKind<std::io::Error>>;

/// The legend of a panel as one row under it, from the plot's left edge: outside the
/// plot, so it never hides data.
fn legend_row(area: &Area, entries: &[Entry]) -> DrawResult<()> {
    let font = (FONT, LABEL_SIZE).into_font();
    let style = font.color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    let y = area.dim_in_pixel().1 as i32 / 2;
    let mut x = PLOT_LEFT;
    for e in entries {
        area.draw(&PathElement::new(
            [(x, y), (x + 24, y)],
            e.color.stroke_width(2),
        ))?;
        if e.ring {
            area.draw(&Circle::new((x + 12, y), 4, e.color.stroke_width(2)))?;
        }
        area.draw(&Text::new(e.label.as_str(), (x + 32, y), style.clone()))?;
        x += 32 + area.estimate_text_size(&e.label, &style)?.0 as i32 + 32;
    }
    Ok(())
}

/// A panel with room for its axes' labels: left and bottom, and top when `top_axis`.
fn panel<'a, 'b>(area: &'a Area<'b>, top_axis: bool) -> ChartBuilder<'a, 'a, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(MARGIN)
        .margin_right(30)
        .x_label_area_size(45)
        .y_label_area_size(PLOT_LEFT - MARGIN);
    if top_axis {
        builder.top_x_label_area_size(45);
    }
    builder
}

/// The chart as an SVG document.
fn render(step_losses: &[f64], epochs: &[EvalMetrics]) -> DrawResult<String> {
    let steps = step_losses.len();
    let n = epochs.len();
    // Room right of the last step and epoch, so their points are not cut by the frame.
    let step_end = steps.max(1) as f64 * 1.02;
    let epoch_end = n.max(1) as f64 * 1.02;
    let half = half_window(steps);
    let smoothed = running_mean(step_losses, half);
    let label = (FONT, LABEL_SIZE);
    let desc = (FONT, 16);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            &format!(
                "Draft-head training: {steps} optimizer step{}, {n} epoch{}",
                plural(steps),
                plural(n)
            ),
            (FONT, 24),
        )?;
        let (upper, rest) = root.split_vertically(370);
        let (upper_legend, rest) = rest.split_vertically(LEGEND_H);
        let (lower, lower_legend) = rest.split_vertically(rest.dim_in_pixel().1 - LEGEND_H);

        let losses = padded(
            step_losses
                .iter()
                .copied()
                .chain(epochs.iter().map(|e| e.loss)),
        );
        let mut chart = panel(&upper, true)
            .build_cartesian_2d(0.0..step_end, losses.clone())?
            .set_secondary_coord(0.0..epoch_end, losses);
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss = v_w·vloss + p_w·ploss + topk_w·topk_loss")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .label_style(label)
            .axis_desc_style(desc)
            .max_light_lines(0)
            .bold_line_style(BLACK.mix(0.1))
            .draw()?;
        chart
            .configure_secondary_axes()
            .x_desc("epoch (held-out loss at the end of each)")
            .x_labels(epoch_labels(n))
            .x_label_formatter(&|e| format!("{e:.0}"))
            .label_style(label)
            .axis_desc_style(desc)
            .draw()?;
        let per_step =
            |values: &[f64]| finite(values.iter().enumerate().map(|(i, &l)| ((i + 1) as f64, l)));
        chart.draw_series(LineSeries::new(per_step(step_losses), RAW.stroke_width(1)))?;
        chart.draw_series(LineSeries::new(
            per_step(&smoothed),
            SMOOTHED.stroke_width(2),
        ))?;
        let per_epoch = |metric: fn(&EvalMetrics) -> f64| {
            finite(
                epochs
                    .iter()
                    .enumerate()
                    .map(|(e, m)| ((e + 1) as f64, metric(m))),
            )
        };
        chart.draw_secondary_series(
            LineSeries::new(per_epoch(|m| m.loss), HELD_OUT.stroke_width(2)).point_size(4),
        )?;
        legend_row(
            &upper_legend,
            &[
                Entry::new("loss per step (raw)", RAW, false),
                Entry::new(
                    format!("running mean over {} steps (centred)", 2 * half + 1),
                    SMOOTHED,
                    false,
                ),
                Entry::new("held-out loss", HELD_OUT, true),
            ],
        )?;

        let top = epochs
            .iter()
            .flat_map(|e| [e.top1, e.top3])
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        // Up to the next 10% above the best value, so the lines do not touch the frame.
        let acc_end = ((top * 10.0).floor() + 1.0).min(10.0) * 10.0;
        let mut acc = panel(&lower, false).build_cartesian_2d(0.0..epoch_end, 0.0..acc_end)?;
        acc.configure_mesh()
            .x_desc("epoch")
            .y_desc("held-out accuracy (%)")
            .x_labels(epoch_labels(n))
            .x_label_formatter(&|e| format!("{e:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(label)
            .axis_desc_style(desc)
            .max_light_lines(0)
            .bold_line_style(BLACK.mix(0.1))
            .draw()?;
        acc.draw_series(
            LineSeries::new(per_epoch(|m| m.top1 * 100.0), TOP1.stroke_width(2)).point_size(4),
        )?;
        acc.draw_series(
            LineSeries::new(per_epoch(|m| m.top3 * 100.0), TOP3.stroke_width(2)).point_size(4),
        )?;
        legend_row(
            &lower_legend,
            &[
                Entry::new("top-1 accuracy", TOP1, true),
                Entry::new("top-3 accuracy", TOP3, true),
            ],
        )?;
        root.present()?;
    }
    Ok(svg)
}

/// Writes the chart to `path` (atomically).
pub fn write_chart(path: &Path, step_losses: &[f64], epochs: &[EvalMetrics]) -> Result<()> {
    let svg = render(step_losses, epochs)
        .map_err(|e| HassError::io(path, std::io::Error::other(e.to_string())))?;
    let tmp = path.with_extension("svg.tmp");
    std::fs::write(&tmp, svg).map_err(|e| HassError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HassError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(loss: f64, top1: f64) -> EvalMetrics {
        EvalMetrics {
            loss,
            vloss: 0.5,
            ploss: loss,
            topk_loss: 0.0,
            top1,
            top2: top1 + 0.05,
            top3: top1 + 0.08,
            kacc: vec![top1, 0.01, 0.0, 0.0, 0.0],
        }
    }

    /// The contents of the `<text>` elements, trimmed.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>')?.1.split_once("</text>"))
            .map(|(text, _)| text.trim())
            .collect()
    }

    #[test]
    fn running_mean_is_centred_and_skips_non_finite() {
        let s = running_mean(&[1.0, 2.0, f64::NAN, 4.0, 5.0], 1);
        assert_eq!(s, [1.5, 1.5, 3.0, 4.5, 4.5]);
        assert!(running_mean(&[f64::NAN], 2)[0].is_nan());
    }

    #[test]
    fn training_chart_has_axes_legend_and_title() {
        let steps: Vec<f64> = (0..30).map(|i| 3.0 / (1.0 + i as f64 * 0.1)).collect();
        let epochs = [metrics(2.1, 0.10), metrics(1.7, 0.14), metrics(1.5, 0.17)];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        write_chart(&path, &steps, &epochs).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "Draft-head training: 30 optimizer steps, 3 epochs",
            "optimizer step",
            "loss = v_w·vloss + p_w·ploss + topk_w·topk_loss",
            "epoch (held-out loss at the end of each)",
            "held-out accuracy (%)",
            "loss per step (raw)",
            "running mean over 5 steps (centred)",
            "held-out loss",
            "top-1 accuracy",
            "top-3 accuracy",
        ] {
            assert!(texts(&svg).contains(&text), "missing {text:?}");
        }
        assert!(!path.with_extension("svg.tmp").exists());
    }

    #[test]
    fn training_chart_renders_without_data() {
        let svg = render(&[], &[]).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(texts(&svg).contains(&"held-out accuracy (%)"));
    }
}
