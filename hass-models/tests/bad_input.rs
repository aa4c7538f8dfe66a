//! Bad model directories give typed errors that name the problem, never a panic.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use hass_core::HassError;
use hass_models::load_hf_model;
use safetensors::{Dtype, SafeTensors};

/// (dtype, shape, bytes) of every tensor of the llama2 fixture.
fn fixture_tensors() -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixture_dir("llama2").join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

/// A model dir with the fixture config and the given tensors.
fn write_model(dir: &Path, tensors: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    std::fs::copy(
        fixture_dir("llama2").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn load_err(dir: &Path) -> HassError {
    load_hf_model::<B>(dir, &Default::default()).expect_err("loading must fail")
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    t.remove("model.layers.1.mlp.up_proj.weight");
    write_model(dir.path(), &t);
    match load_err(dir.path()) {
        HassError::MissingTensor { name, .. } => {
            assert_eq!(name, "model.layers.1.mlp.up_proj.weight")
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn untied_model_without_lm_head_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    t.remove("lm_head.weight");
    write_model(dir.path(), &t);
    assert!(
        matches!(load_err(dir.path()), HassError::MissingTensor { name, .. } if name == "lm_head.weight")
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    t.insert(
        "model.layers.2.mlp.up_proj.weight".into(),
        (Dtype::F32, vec![2], vec![0; 8]),
    );
    write_model(dir.path(), &t);
    match load_err(dir.path()) {
        HassError::UnexpectedTensor { name, .. } => {
            assert_eq!(name, "model.layers.2.mlp.up_proj.weight")
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn wrong_shape_reports_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    t.insert(
        "model.norm.weight".into(),
        (Dtype::F32, vec![32], vec![0; 128]),
    );
    write_model(dir.path(), &t);
    match load_err(dir.path()) {
        HassError::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "model.norm.weight");
            assert_eq!(expected, vec![64]);
            assert_eq!(found, vec![32]);
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    t.insert(
        "model.norm.weight".into(),
        (Dtype::I32, vec![64], vec![0; 256]),
    );
    write_model(dir.path(), &t);
    match load_err(dir.path()) {
        HassError::UnsupportedDType { name, dtype, .. } => {
            assert_eq!(name, "model.norm.weight");
            assert_eq!(dtype, "I32");
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn truncated_weights_file_is_malformed_at_every_cut() {
    let src = std::fs::read(fixture_dir("llama2").join("model.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir("llama2").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    for cut in [0, 4, 8, 100, src.len() / 2, src.len() - 1] {
        std::fs::write(dir.path().join("model.safetensors"), &src[..cut]).unwrap();
        let e = load_err(dir.path());
        assert!(
            matches!(e, HassError::MalformedFile { .. }),
            "cut {cut}: {e}"
        );
        assert!(
            e.to_string().contains("model.safetensors"),
            "cut {cut}: {e}"
        );
    }
}

#[test]
fn missing_files_and_bad_configs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(load_err(dir.path()), HassError::Io { .. }));
    std::fs::copy(
        fixture_dir("llama2").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    let cfg = std::fs::read_to_string(fixture_dir("llama2").join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"llama\"", "\"falcon\""),
    )
    .unwrap();
    assert!(load_err(dir.path()).to_string().contains("falcon"));
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"llama\"").unwrap();
    assert!(matches!(load_err(dir.path()), HassError::Config { .. }));
}

#[test]
fn bad_forward_arguments_are_errors() {
    let m = load_hf_model::<B>(fixture_dir("llama2"), &Default::default()).unwrap();
    let mut cache = m.new_cache(8);
    use hass_models::LogitRows;
    assert!(m
        .forward(&[], &[], &mut cache, None, LogitRows::Last)
        .is_err());
    assert!(m
        .forward(&[1, 2], &[0], &mut cache, None, LogitRows::Last)
        .is_err());
    assert!(m
        .forward(&[1, 2], &[0, 1], &mut cache, Some(&[true]), LogitRows::Last)
        .is_err());
    assert!(m
        .forward(&[600], &[0], &mut cache, None, LogitRows::Last)
        .is_err());
    assert!(m
        .forward(&[1], &[0], &mut cache, None, LogitRows::Rows(vec![3]))
        .is_err());
}
