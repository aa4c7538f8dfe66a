//! The benchmark's chart (`chart.svg`, shown in the README): per prompt set, grouped
//! bars of τ and of the speed-up over vanilla (with a dashed line at 1×), one bar per
//! head and temperature. plotters gives the axes, ticks and labels that make it readable
//! for little code, and its SVG backend writes `<text>` elements, so neither the build
//! nor the run needs fonts; GitHub renders the SVG inline.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Summary;

/// One hue per head; later temperatures get lighter shades of it.
const HUES: [RGBColor; 8] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xed, 0xc9, 0x48),
];
const WIDTH: u32 = 900;
const TITLE_H: u32 = 45;
const PANEL_H: u32 = 300;
const LEGEND_ROW_H: u32 = 26;
const LEGEND_COLUMNS: usize = 3;
const MARGIN: i32 = 10;
/// Where the plots start: the margin plus the y axis's labels and description.
const PLOT_LEFT: i32 = 80;
const FONT: &str = "sans-serif";
const LABEL_SIZE: u32 = 15;
const REFERENCE: RGBAColor = RGBAColor(0, 0, 0, 0.75);
/// Dash and gap of the line at 1×, in pixels.
const DASH: i32 = 8;
const GAP: i32 = 5;
const VANILLA_LINE: &str = "vanilla (speed-up 1×)";

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult<T> = Result<T, DrawingAreaErrorKind<std::io::Error>>;
type Metric = fn(&Summary) -> f64;

/// One bar per set: a head at one temperature.
struct Series {
    method: String,
    temperature: f32,
    color: RGBColor,
}

/// `color` mixed with white by `f` (0: unchanged, 1: white).
fn lighten(color: RGBColor, f: f64) -> RGBColor {
    let mix = |c: u8| (c as f64 + (255.0 - c as f64) * f).round() as u8;
    RGBColor(mix(color.0), mix(color.1), mix(color.2))
}

/// A panel of grouped bars: `metric` of each series on each set, with a dashed line at
/// `reference` when given.
fn bars(
    area: &Area,
    y_desc: &str,
    heads: &[&Summary],
    sets: &[&str],
    series: &[Series],
    metric: Metric,
    reference: Option<f64>,
) -> DrawResult<()> {
    let top = heads
        .iter()
        .map(|s| metric(s))
        .chain(reference)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.15;
    let n = sets.len().max(1);
    let x_end = n as f64 - 0.5;
    let mut chart = ChartBuilder::on(area)
        .margin(MARGIN)
        .margin_right(20)
        .x_label_area_size(35)
        .y_label_area_size(PLOT_LEFT - MARGIN)
        .build_cartesian_2d(-0.5..x_end, 0.0..top)?;
    // At most one label per set, so plotters puts them at the whole numbers: the groups.
    let set_name = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            sets.get(i as usize)
                .copied()
                .unwrap_or_default()
                .to_string()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&set_name)
        .y_desc(y_desc)
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style((FONT, LABEL_SIZE))
        .axis_desc_style((FONT, 16))
        .max_light_lines(0)
        .bold_line_style(BLACK.mix(0.1))
        .draw()?;
    // Bars share 80% of a group's width, but are no wider than a quarter of it.
    let bar = (0.8 / series.len().max(1) as f64).min(0.25);
    let group = bar * series.len() as f64;
    for (k, s) in series.iter().enumerate() {
        chart.draw_series(sets.iter().enumerate().filter_map(|(g, set)| {
            let v = heads
                .iter()
                .find(|h| h.set == *set && h.method == s.method && h.temperature == s.temperature)
                .map(|h| metric(h))
                .filter(|v| v.is_finite())?;
            let x0 = g as f64 - group / 2.0 + k as f64 * bar;
            Some(Rectangle::new(
                [(x0 + bar * 0.05, 0.0), (x0 + bar * 0.95, v)],
                s.color.filled(),
            ))
        }))?;
    }
    if let Some(r) = reference {
        chart.draw_series(DashedLineSeries::new(
            [(-0.5, r), (x_end, r)],
            DASH,
            GAP,
            REFERENCE.stroke_width(2),
        ))?;
    }
    Ok(())
}

fn draw(area: &Area, heads: &[&Summary], sets: &[&str], series: &[Series]) -> DrawResult<()> {
    area.fill(&WHITE)?;
    let (title, rest) = area.split_vertically(TITLE_H);
    title.draw(&Text::new(
        "τ and speed-up over vanilla per prompt set",
        (WIDTH as i32 / 2, TITLE_H as i32 / 2),
        (FONT, 24)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    let (tau, rest) = rest.split_vertically(PANEL_H);
    let (speedup, legend) = rest.split_vertically(PANEL_H);
    bars(
        &tau,
        "τ (tokens per round)",
        heads,
        sets,
        series,
        |s| s.tau.unwrap_or(f64::NAN),
        None,
    )?;
    bars(
        &speedup,
        "speed-up vs vanilla (×)",
        heads,
        sets,
        series,
        |s| s.speedup,
        Some(1.0),
    )?;
    let column = (WIDTH as i32 - PLOT_LEFT) / LEGEND_COLUMNS as i32;
    let style = (FONT, LABEL_SIZE)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    // Where entry k's marker starts: left to right, then the next row.
    let cell = |k: usize| {
        (
            PLOT_LEFT + (k % LEGEND_COLUMNS) as i32 * column,
            ((k / LEGEND_COLUMNS) as u32 * LEGEND_ROW_H + LEGEND_ROW_H / 2) as i32,
        )
    };
    for (k, s) in series.iter().enumerate() {
        let (x, y) = cell(k);
        legend.draw(&Rectangle::new(
            [(x, y - 7), (x + 14, y + 7)],
            s.color.filled(),
        ))?;
        legend.draw(&Text::new(
            format!("{}, T = {}", s.method, s.temperature),
            (x + 22, y),
            style.clone(),
        ))?;
    }
    // The last entry: the dashed line of the speed-up panel.
    let (x, y) = cell(series.len());
    for dash in [0, DASH + GAP] {
        legend.draw(&PathElement::new(
            [(x + dash, y), (x + dash + DASH, y)],
            REFERENCE.stroke_width(2),
        ))?;
    }
    legend.draw(&Text::new(VANILLA_LINE, (x + 2 * DASH + GAP + 8, y), style))?;
    area.present()
}

/// Two panels (τ, then speed-up with a dashed line at 1×) of bars grouped by the sets of
/// `summaries`, one bar per head and temperature; vanilla, which has no τ, is left out.
pub fn svg(summaries: &[Summary]) -> String {
    let heads: Vec<&Summary> = summaries.iter().filter(|s| s.tau.is_some()).collect();
    let mut methods: Vec<&str> = Vec::new();
    let mut temperatures: Vec<f32> = Vec::new();
    let mut pairs: Vec<(&str, f32)> = Vec::new();
    let mut sets: Vec<&str> = Vec::new();
    for s in &heads {
        if !methods.contains(&s.method.as_str()) {
            methods.push(&s.method);
        }
        if !temperatures.contains(&s.temperature) {
            temperatures.push(s.temperature);
        }
        if !pairs.contains(&(s.method.as_str(), s.temperature)) {
            pairs.push((&s.method, s.temperature));
        }
        if !sets.contains(&s.set.as_str()) {
            sets.push(&s.set);
        }
    }
    let series: Vec<Series> = pairs
        .iter()
        .map(|&(method, temperature)| {
            let m = methods.iter().position(|&x| x == method).unwrap_or(0);
            let t = temperatures
                .iter()
                .position(|&x| x == temperature)
                .unwrap_or(0);
            Series {
                method: method.to_string(),
                temperature,
                color: lighten(
                    HUES[m % HUES.len()],
                    0.55 * t as f64 / temperatures.len() as f64,
                ),
            }
        })
        .collect();
    let rows = (series.len() + 1).div_ceil(LEGEND_COLUMNS) as u32;
    let height = TITLE_H + 2 * PANEL_H + rows * LEGEND_ROW_H + 10;
    let mut out = String::new();
    {
        let area = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
        draw(&area, &heads, &sets, &series).expect("drawing into a String does not fail");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(
        set: &str,
        method: &str,
        temperature: f32,
        tau: Option<f64>,
        speedup: f64,
    ) -> Summary {
        Summary {
            temperature,
            set: set.into(),
            method: method.into(),
            questions: 2,
            new_tokens: 100,
            tau,
            tokens_per_s: 50.0 * speedup,
            speedup,
            decode_tokens_per_s: 60.0 * speedup,
            identical_to_vanilla: None,
            draft_ms_per_round: None,
            verify_ms_per_round: None,
            other_ms_per_round: None,
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
    fn bench_chart_has_axes_sets_and_legend() {
        let mut s = Vec::new();
        for t in [0.0, 1.0] {
            for (set, base) in [("mt_bench", 1.5), ("humaneval", 1.8), ("overall", 1.6)] {
                s.push(summary(set, "vanilla", t, None, 1.0));
                s.push(summary(set, "eagle", t, Some(base), 0.95));
                s.push(summary(set, "hass", t, Some(base + 0.2), 1.1));
            }
        }
        let svg = svg(&s);
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        let texts = texts(&svg);
        for text in [
            "τ and speed-up over vanilla per prompt set",
            "τ (tokens per round)",
            "speed-up vs vanilla (×)",
            VANILLA_LINE,
            "mt_bench",
            "humaneval",
            "overall",
            "eagle, T = 0",
            "hass, T = 0",
            "eagle, T = 1",
            "hass, T = 1",
        ] {
            assert!(texts.contains(&text), "missing {text:?} in {texts:?}");
        }
        assert!(!texts.iter().any(|t| t.starts_with("vanilla,")));
        // 4 series on 3 sets in 2 panels, their legend and the white background.
        assert_eq!(svg.matches("<rect").count(), 4 * 3 * 2 + 4 + 1, "{svg}");
    }

    #[test]
    fn bench_chart_renders_without_heads() {
        let svg = svg(&[summary("mt_bench", "vanilla", 0.0, None, 1.0)]);
        assert!(svg.starts_with("<svg") && texts(&svg).contains(&"τ (tokens per round)"));
    }
}
