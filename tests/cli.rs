//! The `batchnorm` binary as users run it: `info`, `demo`, `parity` on safetensors files (results
//! against the f64 reference, and one test per bad input), `bench`'s plan skipping, and `train`.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use batchnorm::reference::batchnorm as reference;
use batchnorm::tensor::Layout;
use common::*;
use safetensors::{Dtype, SafeTensors};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_batchnorm"))
}

fn write_input(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)], meta: &[(&str, &str)]) {
    write_safetensors(path, Dtype::F32, tensors, meta);
}

/// Every floating output widened to f64, with the dtype it was written in.
fn read_output_f64(path: &Path) -> HashMap<String, (Dtype, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals = match v.dtype() {
                Dtype::I64 => vec![i64::from_le_bytes(v.data().try_into().unwrap()) as f64],
                Dtype::F64 => bytemuck::pod_collect_to_vec(v.data()),
                Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(v.data())
                    .into_iter()
                    .map(f64::from)
                    .collect(),
                d => panic!("{name}: unexpected dtype {d:?}"),
            };
            (name, (v.dtype(), vals))
        })
        .collect()
}

/// The outputs of an f32 run (every floating tensor F32, so the f32 values are exact).
fn read_output(path: &Path) -> HashMap<String, Vec<f32>> {
    read_output_f64(path)
        .into_iter()
        .map(|(name, (dtype, vals))| {
            assert!(
                matches!(dtype, Dtype::F32 | Dtype::I64),
                "{name}: {dtype:?}"
            );
            (name, vals.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

fn parity(input: &Path, output: &Path) -> std::process::Output {
    bin()
        .args(["parity", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap()
}

/// Training step with momentum=None and num_batches_tracked=3, NCHW, with dy: every output against the
/// reference; then eval in NHWC and an untracked NC case.
#[test]
fn parity_matches_the_reference() {
    let scratch = ScratchDir::new("cli");
    let seed = seed();
    let mut rng = rng(seed);
    struct Run {
        shape: Vec<usize>,
        layout: Layout,
        training: bool,
        track: bool,
        momentum: Option<f64>,
    }
    let runs = [
        Run {
            shape: vec![4, 3, 5, 7],
            layout: Layout::Nchw,
            training: true,
            track: true,
            momentum: None,
        },
        Run {
            shape: vec![4, 5, 7, 3],
            layout: Layout::Nhwc,
            training: false,
            track: true,
            momentum: Some(0.1),
        },
        Run {
            shape: vec![9, 6],
            layout: Layout::Nc,
            training: true,
            track: false,
            momentum: Some(0.3),
        },
    ];
    for (k, run) in runs.iter().enumerate() {
        let d = run.layout.dims(&run.shape).unwrap();
        let x = normal(&mut rng, d.numel(), 1.0, 2.0);
        let dy = normal(&mut rng, d.numel(), 0.0, 1.0);
        let w = uniform(&mut rng, d.c, 0.5, 1.5);
        let b = uniform(&mut rng, d.c, -1.0, 1.0);
        let rm = uniform(&mut rng, d.c, -0.5, 0.5);
        let rv = uniform(&mut rng, d.c, 0.5, 2.0);
        let mut tensors = vec![
            ("x", run.shape.clone(), x.clone()),
            ("dy", run.shape.clone(), dy.clone()),
            ("weight", vec![d.c], w.clone()),
            ("bias", vec![d.c], b.clone()),
        ];
        if run.track {
            tensors.push(("running_mean", vec![d.c], rm.clone()));
            tensors.push(("running_var", vec![d.c], rv.clone()));
        }
        let momentum = run.momentum.map_or("none".to_string(), |m| m.to_string());
        let training = run.training.to_string();
        let track = run.track.to_string();
        let meta = [
            ("layout", run.layout.name()),
            ("eps", "1e-5"),
            ("momentum", momentum.as_str()),
            ("training", training.as_str()),
            ("track_running_stats", track.as_str()),
            ("num_batches_tracked", "3"),
        ];
        let (input, output) = (
            scratch.join(format!("in{k}.safetensors")),
            scratch.join(format!("out{k}.safetensors")),
        );
        write_input(&input, &tensors, &meta);
        let out = parity(&input, &output);
        assert!(
            out.status.success(),
            "seed={seed}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = read_output(&output);

        let mut running = reference::RunningStats {
            mean: f64s(&rm),
            var: f64s(&rv),
            num_batches_tracked: 3,
        };
        let (w64, b64) = (f64s(&w), f64s(&b));
        let f = reference::forward(
            &f64s(&x),
            &run.shape,
            run.layout,
            Some(&w64),
            Some(&b64),
            run.track.then_some(&mut running),
            run.training,
            run.momentum,
            1e-5,
        )
        .unwrap();
        let g = reference::backward(
            &f64s(&x),
            &f64s(&dy),
            &run.shape,
            run.layout,
            Some(&w64),
            &f.mean,
            &f.invstd,
            f.batch_stats,
        )
        .unwrap();
        let tol = 1e-4;
        assert!(
            max_rel_err(&got["y"], &f.y) <= tol,
            "seed={seed} run {k}: y"
        );
        assert!(
            max_rel_err(&got["dx"], &g.dx) <= tol,
            "seed={seed} run {k}: dx"
        );
        assert!(
            max_err_scaled(&got["dweight"], &g.dweight) <= tol,
            "seed={seed} run {k}: dweight"
        );
        assert!(
            max_err_scaled(&got["dbias"], &g.dbias) <= tol,
            "seed={seed} run {k}: dbias"
        );
        assert_eq!(
            got.contains_key("save_mean"),
            f.batch_stats,
            "run {k}: save_mean presence"
        );
        if f.batch_stats {
            assert!(
                max_rel_err(&got["save_mean"], &f.mean) <= tol,
                "seed={seed} run {k}: save_mean"
            );
            assert!(
                max_rel_err(&got["save_invstd"], &f.invstd) <= tol,
                "seed={seed} run {k}: save_invstd"
            );
        }
        assert_eq!(
            got.contains_key("running_mean"),
            run.track,
            "run {k}: running stats presence"
        );
        if run.track {
            assert!(
                max_rel_err(&got["running_mean"], &running.mean) <= tol,
                "seed={seed} run {k}: running_mean"
            );
            assert!(
                max_rel_err(&got["running_var"], &running.var) <= tol,
                "seed={seed} run {k}: running_var"
            );
            assert_eq!(
                got["num_batches_tracked"],
                vec![running.num_batches_tracked as f32],
                "run {k}: nbt"
            );
        }
    }
}

/// F64 inputs at mean 1e4 (spread 1), as a PyTorch module in double precision would hand them over:
/// every output comes back F64 and within 1e-5 of the f64 reference, where rounding x to f32 first
/// would put y ~5e-4 off. Running means the engine does not move (eval; momentum 0) come back exactly.
#[test]
fn parity_keeps_f64_inputs_at_f64_accuracy() {
    use rand::Rng;
    let scratch = ScratchDir::new("cli");
    let seed = seed();
    let mut rng = rng(seed);
    let rel = |got: &[f64], want: &[f64]| {
        assert_eq!(got.len(), want.len());
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
            .fold(
                0.0f64,
                |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
            )
    };
    let scaled = |got: &[f64], want: &[f64]| {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / scale)
            .fold(
                0.0f64,
                |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
            )
    };
    // (shape, layout, training, momentum, running_mean given)
    let runs = [
        (vec![5, 3, 7, 11], Layout::Nchw, true, 0.1, true),
        (vec![4, 5, 7, 3], Layout::Nhwc, false, 0.1, false),
        (vec![13, 6], Layout::Nc, true, 0.0, true),
    ];
    for (k, (shape, layout, training, momentum, rm_given)) in runs.into_iter().enumerate() {
        let d = layout.dims(&shape).unwrap();
        let near = |rng: &mut rand::rngs::StdRng, n: usize, mean: f64, spread: f64| -> Vec<f64> {
            normal(rng, n, 0.0, 1.0)
                .into_iter()
                .map(|v| mean + spread * v as f64 + rng.random_range(-1e-6..1e-6))
                .collect()
        };
        let x = near(&mut rng, d.numel(), 1e4, 1.0);
        let dy = near(&mut rng, d.numel(), 0.0, 1.0);
        let w = near(&mut rng, d.c, 1.0, 0.2);
        let b = near(&mut rng, d.c, 0.0, 0.5);
        let rm = near(&mut rng, d.c, 1e4, 0.3);
        let rv: Vec<f64> = (0..d.c).map(|_| rng.random_range(0.5..2.0)).collect();
        let mut tensors = vec![
            ("x", shape.clone(), x.clone()),
            ("dy", shape.clone(), dy.clone()),
            ("weight", vec![d.c], w.clone()),
            ("bias", vec![d.c], b.clone()),
            ("running_var", vec![d.c], rv.clone()),
        ];
        if rm_given {
            tensors.push(("running_mean", vec![d.c], rm.clone()));
        }
        let momentum_s = momentum.to_string();
        let training_s = training.to_string();
        let meta = [
            ("layout", layout.name()),
            ("momentum", momentum_s.as_str()),
            ("training", training_s.as_str()),
        ];
        let (input, output) = (
            scratch.join(format!("in{k}.safetensors")),
            scratch.join(format!("out{k}.safetensors")),
        );
        write_safetensors(&input, Dtype::F64, &tensors, &meta);
        let out = parity(&input, &output);
        assert!(
            out.status.success(),
            "seed={seed}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = read_output_f64(&output);
        for (name, (dtype, _)) in &got {
            let want = if name == "num_batches_tracked" {
                Dtype::I64
            } else {
                Dtype::F64
            };
            assert_eq!(*dtype, want, "run {k}: {name} written as {dtype:?}");
        }

        let mut running = reference::RunningStats {
            mean: if rm_given { rm.clone() } else { vec![0.0; d.c] },
            var: rv.clone(),
            num_batches_tracked: 0,
        };
        let f = reference::forward(
            &x,
            &shape,
            layout,
            Some(&w),
            Some(&b),
            Some(&mut running),
            training,
            Some(momentum),
            1e-5,
        )
        .unwrap();
        let g = reference::backward(
            &x,
            &dy,
            &shape,
            layout,
            Some(&w),
            &f.mean,
            &f.invstd,
            f.batch_stats,
        )
        .unwrap();
        let tol = 1e-5;
        let check = |name: &str, err: f64| {
            assert!(
                err <= tol,
                "seed={seed} run {k}: {name} error {err:.2e} > {tol:.0e}"
            );
        };
        check("y", rel(&got["y"].1, &f.y));
        check("dx", scaled(&got["dx"].1, &g.dx));
        check("dweight", scaled(&got["dweight"].1, &g.dweight));
        check("dbias", scaled(&got["dbias"].1, &g.dbias));
        check("running_mean", rel(&got["running_mean"].1, &running.mean));
        check("running_var", rel(&got["running_var"].1, &running.var));
        if training {
            check("save_mean", rel(&got["save_mean"].1, &f.mean));
            check("save_invstd", rel(&got["save_invstd"].1, &f.invstd));
        }
        if !training || momentum == 0.0 {
            assert_eq!(
                got["running_mean"].1, running.mean,
                "seed={seed} run {k}: a running mean the engine leaves must come back exactly"
            );
        }
    }
}

fn parity_error(tensors: &[(&str, Vec<usize>, Vec<f32>)], meta: &[(&str, &str)], expect: &str) {
    let scratch = ScratchDir::new("cli");
    let input = scratch.join(format!("bad-{}.safetensors", expect.len()));
    let output = scratch.join("never-written.safetensors");
    write_input(&input, tensors, meta);
    let out = parity(&input, &output);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for '{expect}'");
    assert!(stderr.contains(expect), "stderr lacks '{expect}': {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(!output.exists(), "an output was written for bad input");
}

#[test]
fn parity_rejects_bad_input() {
    let scratch = ScratchDir::new("cli");
    let x = |shape: &[usize]| ("x", shape.to_vec(), vec![0.5f32; shape.iter().product()]);
    parity_error(
        &[("dy", vec![2, 3], vec![0.0; 6])],
        &[],
        "missing tensor 'x'",
    );
    parity_error(
        &[x(&[4, 3, 2]), ("weight", vec![4], vec![1.0; 4])],
        &[],
        "tensor 'weight'",
    );
    parity_error(
        &[x(&[4, 3, 2]), ("dy", vec![4, 3], vec![1.0; 12])],
        &[],
        "tensor 'dy'",
    );
    parity_error(&[x(&[4, 3, 2])], &[("eps", "-1e-5")], "eps must be >= 0");
    // PyTorch: "batch_norm eps must be positive during training"; eps 0 in eval runs.
    parity_error(&[x(&[4, 3, 2])], &[("eps", "0")], "eps must be > 0");
    parity_error(
        &[x(&[4, 3, 2])],
        &[("momentum", "inf")],
        "momentum must be finite",
    );
    parity_error(&[x(&[4, 3, 2])], &[("layout", "NWHC")], "unknown layout");
    parity_error(
        &[x(&[1, 3])],
        &[("layout", "NC")],
        "more than 1 value per channel",
    );
    parity_error(&[x(&[1, 3, 1, 1])], &[], "more than 1 value per channel");
    parity_error(
        &[x(&[4, 3])],
        &[("virtual_batch", "2")],
        "unknown metadata key",
    );
    parity_error(
        &[x(&[4, 3])],
        &[("layout", "NC"), ("training", "maybe")],
        "'training'",
    );
    // Not a safetensors file at all.
    let path = scratch.join("garbage.safetensors");
    std::fs::write(&path, b"not a tensor file").unwrap();
    let out = parity(&path, &scratch.join("out.safetensors"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a safetensors file"));
}

#[test]
fn info_names_the_adapter() {
    let out = bin().arg("info").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for field in [
        "adapter",
        "backend",
        "device type",
        "driver",
        "max_storage_buffer_binding_size",
    ] {
        assert!(stdout.contains(field), "info lacks '{field}': {stdout}");
    }
}

/// No matching adapter: a typed error that says how to get one.
#[test]
fn error_no_adapter() {
    let out = bin()
        .arg("info")
        .env("WGPU_ADAPTER_NAME", "no-such-adapter-xyz")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no GPU adapter found"), "{stderr}");
    assert!(stderr.contains("mesa-vulkan-drivers"), "{stderr}");
}

/// `bench --plan` with plans that cannot run a shape on this device skips them with the planner's
/// reason and runs the rest: the resident plan never takes channel-last tensors, and on a CPU device
/// the fused plan would walk 10 240 rows per invocation, past lavapipe's loop limit (a typed
/// `LimitExceeded` that used to end the whole bench).
#[test]
fn bench_skips_plans_that_do_not_apply() {
    let dir = ScratchDir::new("bench-skips");
    let json = dir.join("rows.json");
    let out = bin()
        .args(["bench", "--quick", "--plan", "auto", "fused", "resident"])
        .args(["--shape", "40,16,64,64", "--layout", "nhwc", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Resident skipped for NHWC"), "{stdout}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let plans: Vec<&str> = rows.iter().map(|r| r["plan"].as_str().unwrap()).collect();
    let cpu = gpu().adapter_info().device_type == wgpu::DeviceType::Cpu;
    // The automatic plan's three ops, and the fused plan's three where the device can run it.
    assert_eq!(rows.len(), if cpu { 3 } else { 6 }, "{plans:?}");
    if cpu {
        assert!(stdout.contains("Fused skipped for NHWC"), "{stdout}");
        assert!(stdout.contains("65 535"), "{stdout}");
    }
    for r in &rows {
        assert!(r["median_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn demo_reports_small_errors() {
    let out = bin().args(["demo", "--shape", "6,5,7,3"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for layout in ["NCHW", "NHWC", "NC"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(layout))
            .unwrap_or_else(|| panic!("{stdout}"));
        // Columns end with: y err, dx err, dw err, ms.
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let errs: Vec<f64> = tokens[tokens.len() - 4..tokens.len() - 1]
            .iter()
            .map(|t| t.parse::<f64>().unwrap_or(f64::INFINITY))
            .collect();
        assert!(errs.iter().all(|e| *e < 1e-4), "{line}");
    }
}

fn train(args: &[&str]) -> std::process::Output {
    bin().arg("train").args(args).output().unwrap()
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

/// The `step` column of metrics.csv.
fn metric_steps(dir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "step,train_loss,train_accuracy,test_loss,test_accuracy,lr,train_seconds"
    );
    lines
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect()
}

/// A short Adam run with a cosine schedule writes the run folder (summary fields, metrics, checkpoint
/// with Adam's state under PyTorch-like names); resumed for more steps, its training time accumulates
/// and its metrics continue; resuming with the other optimizer is refused.
#[test]
fn train_writes_the_run_folder_and_resumes() {
    let scratch = ScratchDir::new("cli");
    let dir = scratch.join("run-adam");
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let common = [
        "--train-subset",
        "600",
        "--batch-size",
        "30",
        "--eval-every",
        "10",
        "--log-every",
        "5",
        "--optimizer",
        "adam",
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        "2",
        "--out",
        d,
    ];
    let out = train(&[&common[..], &["--steps", "20"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("test accuracy"));
    // stderr is not a terminal here: plain progress lines at each evaluation.
    assert!(
        stderr.contains("step     10/20") && stderr.contains("test acc"),
        "{stderr}"
    );
    let s = summary(&dir);
    for key in [
        "model",
        "dataset",
        "bn",
        "steps",
        "batch_size",
        "lr",
        "optimizer",
        "lr_schedule",
        "seed",
        "final_test_accuracy",
        "train_seconds",
        "samples_per_second",
        "adapter",
        "peak_rss_bytes",
        "fused_bn_relu_layers",
    ] {
        assert!(s.get(key).is_some(), "summary lacks {key}: {s}");
    }
    // The MLP's BatchNorms feed sigmoids: nothing to fuse.
    assert_eq!(s["fused_bn_relu_layers"], serde_json::json!([]), "{s}");
    assert!(s["optimizer"].as_str().unwrap().starts_with("adam("), "{s}");
    assert_eq!(s["lr_schedule"], "cosine(total=20, warmup=2)");
    assert_eq!(s["lr"].as_f64(), Some(1e-3f32 as f64));
    let acc = s["final_test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{s}");
    // The pipelines were built while the data loaded (the warm-up guessed the run's shapes from the
    // dataset's published ones): none while training and evaluating.
    let setup = |key: &str| s[key].as_u64().unwrap_or_else(|| panic!("{key}: {s}"));
    assert!(setup("pipelines_built_in_setup") > 0, "{s}");
    assert_eq!(setup("pipelines_built_after_setup"), 0, "{s}");
    assert!(s["setup_seconds"].as_f64().unwrap() > 0.0, "{s}");
    // The first step (which records a twin for the prebuild and finds its pipelines built) is timed
    // apart; the steady rate excludes it, so it is above the overall one.
    let first = s["first_step_seconds"]
        .as_f64()
        .expect("first_step_seconds");
    let train_seconds = s["train_seconds"].as_f64().unwrap();
    assert!(first > 0.0 && first < train_seconds, "{s}");
    let steady = s["steady_samples_per_second"]
        .as_f64()
        .expect("steady rate");
    assert!(steady > s["samples_per_second"].as_f64().unwrap(), "{s}");
    // The median over the windows between read-backs but the first (steps 6-10, 11-15, 16-20).
    let median = s["median_window_samples_per_second"]
        .as_f64()
        .expect("median window rate");
    // Both measure the same steps, one as a mean, one as a median of three windows.
    assert!(median > steady / 3.0 && median < steady * 3.0, "{s}");
    assert!(s["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{s}");
    let first_seconds = s["train_seconds"].as_f64().unwrap();
    assert!(first_seconds > 0.0);
    assert_eq!(metric_steps(&dir), [5, 10, 15, 20]);
    let png = std::fs::read(dir.join("training.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "training.png is not a PNG"
    );

    let ckpt = batchnorm::train::checkpoint::load(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ckpt.step, 20);
    let state = |k: &str| {
        ckpt.optimizer
            .iter()
            .find(|t| t.0 == k)
            .map(|t| t.2.clone())
    };
    assert_eq!(state("optimizer.0.weight.step"), Some(vec![20.0]));
    assert!(state("optimizer.0.weight.exp_avg_sq").is_some_and(|v| v.len() == 78400));
    assert_eq!(ckpt.meta["optimizer"], "adam");

    let resume = dir.join("checkpoint.safetensors");
    let resume = resume.to_str().unwrap();
    let out = train(&[&common[..], &["--steps", "30", "--resume", resume]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&dir);
    assert_eq!(s["resumed_from_step"], 20);
    assert!(s["train_seconds"].as_f64().unwrap() > first_seconds, "{s}");
    assert_eq!(metric_steps(&dir), [5, 10, 15, 20, 25, 30]);

    let mut sgd = common.to_vec();
    sgd[9] = "sgd";
    let out = train(&[&sgd[..], &["--steps", "40", "--resume", resume]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--optimizer adam"), "{stderr}");

    // Another batch size or dataset than the checkpoint's is refused by name.
    let bs = common.iter().position(|a| *a == "--batch-size").unwrap() + 1;
    let mut other_batch = common.to_vec();
    other_batch[bs] = "7";
    let out = train(&[&other_batch[..], &["--steps", "40", "--resume", resume]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--batch-size"), "{stderr}");
    let out = train(
        &[
            &common[..],
            // Fashion-MNIST's files have MNIST's names and format: the shipped MNIST stands in.
            &[
                "--steps",
                "40",
                "--resume",
                resume,
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist"),
            ],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--dataset mnist"), "{stderr}");
}

/// A learning rate multiplied by 1e36 after step 10 diverges (a NaN loss by step 13 or so): the run stops with a message naming the
/// step, a non-zero exit code, and the step-10 checkpoint intact.
#[test]
fn train_stops_on_a_diverging_loss_and_keeps_the_checkpoint() {
    let scratch = ScratchDir::new("cli");
    let dir = scratch.join("run-diverge");
    let _ = std::fs::remove_dir_all(&dir);
    let out = train(&[
        "--train-subset",
        "600",
        "--batch-size",
        "30",
        "--steps",
        "40",
        "--eval-every",
        "10",
        "--log-every",
        "1",
        "--lr",
        "0.1",
        "--lr-schedule",
        "step",
        "--lr-step-every",
        "10",
        "--lr-gamma",
        "1e36",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("training diverged"), "{stderr}");
    let step: u64 = stderr
        .split("at step ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no step named: {stderr}"));
    assert!((11..=40).contains(&step), "{stderr}");
    assert!(stderr.contains("step 10, is left as it was"), "{stderr}");
    let ckpt = batchnorm::train::checkpoint::load(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ckpt.step, 10);
    assert!(ckpt
        .model
        .tensors
        .iter()
        .chain(&ckpt.optimizer)
        .all(|t| t.2.iter().all(|v| v.is_finite())));
    assert!(!dir.join("summary.json").exists());
}

/// `--dataset cifar10` end to end on small synthetic batch files: the MLP takes 3072 inputs per example.
#[test]
fn train_runs_on_cifar10_files() {
    let scratch = ScratchDir::new("cli");
    let data = scratch.join("cifar10");
    std::fs::create_dir_all(&data).unwrap();
    let mut rng = rng(seed());
    let file = |records: usize, rng: &mut rand::rngs::StdRng| -> Vec<u8> {
        use rand::Rng;
        (0..records)
            .flat_map(|_| {
                let mut r = vec![rng.random_range(0..10u8)];
                r.extend((0..3072).map(|_| rng.random::<u8>()));
                r
            })
            .collect()
    };
    for k in 1..=5 {
        std::fs::write(data.join(format!("data_batch_{k}.bin")), file(8, &mut rng)).unwrap();
    }
    // As many test examples as the batch size: evaluation reuses the training step's pipelines, which
    // lavapipe compiles slowly.
    std::fs::write(data.join("test_batch.bin"), file(10, &mut rng)).unwrap();
    let dir = scratch.join("run-cifar10");
    let out = train(&[
        "--dataset",
        "cifar10",
        "--data-dir",
        data.to_str().unwrap(),
        "--batch-size",
        "10",
        "--steps",
        "4",
        "--log-every",
        "2",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&dir);
    assert_eq!(s["model"], "mlp-3072-100-100-100-10-bn");
    assert_eq!(s["dataset"], "cifar10");
    // Without --data-dir, the message says what to pass.
    let out = train(&["--dataset", "cifar10"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("needs --data-dir"),
        "{stderr}"
    );
}
