//! The `speed` benchmark runs end to end on a fixture model and reports consistent
//! numbers (no timing thresholds: this checks the benchmark, not the machine).

use std::path::PathBuf;

use hass_bench::speed::{run_speed, SpeedOptions};
use hass_models::load_hf_model;

#[test]
fn speed_report_is_complete_and_consistent() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama3");
    let model = load_hf_model::<burn::backend::Flex>(dir, &Default::default()).unwrap();
    let opts = SpeedOptions {
        prompt_tokens: 32,
        decode_tokens: 8,
        verify_sizes: vec![1, 4],
        repeats: 2,
    };
    let r = run_speed(&model, 0.0, &opts).unwrap();
    assert_eq!((r.prefill_tokens, r.decode_tokens), (32, 8));
    assert!(r.prefill_tokens_per_s > 0.0 && r.decode_tokens_per_s > 0.0);
    assert!(r.copy_bandwidth_gb_s > 0.0 && r.roofline_tokens_per_s > 0.0);
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        for t in r.core_round_trip_ns {
            assert!(t.is_some_and(|ns| ns > 0.0 && ns < 1e6), "round trip {t:?}");
        }
    }
    assert_eq!(
        r.verify.iter().map(|p| p.new_tokens).collect::<Vec<_>>(),
        vec![1, 4]
    );
    assert_eq!(r.verify[0].ratio_to_one, 1.0);
    let md = r.to_markdown();
    assert!(
        md.contains("decode / roofline") && md.contains("| 4 |"),
        "{md}"
    );
}
