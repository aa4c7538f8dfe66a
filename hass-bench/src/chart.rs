//! An SVG bar chart of the benchmark: τ and speedup per set, one bar per head and
//! temperature. SVG keeps it dependency-free and renders in GitHub's README view.

use std::fmt::Write;

use crate::report::Summary;

const COLORS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#76b7b2", "#e15759", "#59a14f", "#edc948", "#b07aa1", "#9c755f",
];

/// Two panels (τ, then speedup with a line at 1×) over the sets of `summaries`.
pub fn svg(summaries: &[Summary]) -> String {
    let heads: Vec<&Summary> = summaries.iter().filter(|s| s.tau.is_some()).collect();
    let mut series: Vec<(String, f32)> = Vec::new();
    let mut sets: Vec<&str> = Vec::new();
    for s in &heads {
        let key = (s.method.clone(), s.temperature);
        if !series.contains(&key) {
            series.push(key);
        }
        if !sets.contains(&s.set.as_str()) {
            sets.push(&s.set);
        }
    }
    let (w, panel_h, top, left) = (900.0, 260.0, 40.0, 60.0);
    let plot_w = w - left - 20.0;
    let h = top + 2.0 * (panel_h + 60.0) + 20.0 * series.len() as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    type Metric = fn(&Summary) -> f64;
    let panels: [(&str, Metric, f64); 2] = [
        ("acceptance length τ", |s| s.tau.unwrap_or(0.0), 1.0),
        ("speedup over vanilla (×)", |s| s.speedup, 1.0),
    ];
    for (p, (title, metric, reference)) in panels.iter().enumerate() {
        let y0 = top + p as f64 * (panel_h + 60.0);
        let max = heads.iter().map(|s| metric(s)).fold(*reference, f64::max) * 1.15;
        let y = |v: f64| y0 + panel_h - v / max * panel_h;
        let _ = writeln!(
            out,
            r#"<text x="{left}" y="{}" font-size="14">{title}</text>"#,
            y0 - 10.0
        );
        for i in 0..=4 {
            let v = max * i as f64 / 4.0;
            let _ = writeln!(
                out,
                r##"<line x1="{left}" x2="{x2}" y1="{yv}" y2="{yv}" stroke="#ddd"/><text x="{tx}" y="{ty}" text-anchor="end">{v:.2}</text>"##,
                x2 = left + plot_w,
                yv = y(v),
                tx = left - 5.0,
                ty = y(v) + 4.0
            );
        }
        let _ = writeln!(
            out,
            r##"<line x1="{left}" x2="{x2}" y1="{yr}" y2="{yr}" stroke="#333" stroke-dasharray="4 3"/>"##,
            x2 = left + plot_w,
            yr = y(*reference)
        );
        let group_w = plot_w / sets.len().max(1) as f64;
        let bar_w = group_w * 0.8 / series.len().max(1) as f64;
        for (g, set) in sets.iter().enumerate() {
            let gx = left + g as f64 * group_w + group_w * 0.1;
            for (k, (method, t)) in series.iter().enumerate() {
                let Some(s) = heads
                    .iter()
                    .find(|s| s.set == *set && &s.method == method && s.temperature == *t)
                else {
                    continue;
                };
                let v = metric(s);
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{method} T={t} {set}: {v:.2}</title></rect>"#,
                    gx + k as f64 * bar_w,
                    y(v),
                    bar_w * 0.9,
                    (v / max * panel_h).max(0.0),
                    COLORS[k % COLORS.len()]
                );
            }
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{set}</text>"#,
                gx + group_w * 0.4,
                y0 + panel_h + 16.0
            );
        }
    }
    let ly = top + 2.0 * (panel_h + 60.0) - 20.0;
    for (k, (method, t)) in series.iter().enumerate() {
        let yy = ly + 20.0 * k as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{left}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{method}, T = {t}</text>"#,
            yy - 10.0,
            COLORS[k % COLORS.len()],
            left + 18.0,
            yy
        );
    }
    out.push_str("</svg>\n");
    out
}
