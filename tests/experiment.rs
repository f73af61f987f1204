//! `batchnorm experiment NAME --quick` end to end: each writes config.json, its CSVs (a header and rows of
//! numbers, finite where the run did not diverge), a PNG plot and summary.md with a table; a bad name is
//! an error naming the choices.

use std::path::Path;
use std::process::Command;

fn run_quick(name: &str) -> tempdir::Dir {
    run_quick_with(name, &[])
}

fn run_quick_with(name: &str, extra: &[&str]) -> tempdir::Dir {
    // One flat folder name: the extra arguments may hold paths.
    let tag: String = extra
        .join("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let out = tempdir::Dir::new(&format!("{name}{tag}"));
    let status = Command::new(env!("CARGO_BIN_EXE_batchnorm"))
        .args(["experiment", name, "--quick", "--out"])
        .arg(&out.0)
        .args(extra)
        .status()
        .unwrap();
    assert!(status.success(), "{name} --quick failed");
    out
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("bn-exp-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Rows of a CSV after checking its header; every cell parses as a number.
fn csv(path: &Path, header: &str) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(header), "{}", path.display());
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|c| c.parse::<f64>().unwrap()).collect())
        .collect();
    assert!(!rows.is_empty(), "{} has no rows", path.display());
    rows
}

fn common_outputs(dir: &Path, name: &str, png: &str) {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["experiment"], name);
    assert_eq!(config["quick"], true);
    assert!(config["adapter"].as_str().unwrap().len() > 3);
    let bytes = std::fs::read(dir.join(png)).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png} is a PNG");
    let summary = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(
        summary.contains("| --- |"),
        "summary has a table:\n{summary}"
    );
    assert!(
        !summary.contains("NaN"),
        "summary holds real numbers:\n{summary}"
    );
}

fn finite(rows: &[Vec<f64>]) {
    for r in rows {
        assert!(r.iter().all(|v| v.is_finite()), "non-finite row {r:?}");
    }
}

#[test]
fn ioffe_mnist_quick() {
    let out = run_quick("ioffe-mnist");
    common_outputs(&out.0, "ioffe-mnist", "ioffe_mnist.png");
    for tag in ["bn", "nobn"] {
        let acc = csv(
            &out.0.join(format!("accuracy_{tag}.csv")),
            "step,train_loss,test_accuracy",
        );
        finite(&acc);
        assert!(acc.iter().all(|r| (0.0..=1.0).contains(&r[2])));
        let p = csv(
            &out.0.join(format!("sigmoid_input_{tag}.csv")),
            "step,p15,p50,p85",
        );
        finite(&p);
        assert!(
            p.iter().all(|r| r[1] <= r[2] && r[2] <= r[3]),
            "percentiles ordered"
        );
        assert_eq!(p.len(), acc.len());
    }
    let bn = csv(
        &out.0.join("accuracy_bn.csv"),
        "step,train_loss,test_accuracy",
    );
    assert!(
        bn.last().unwrap()[2] > 0.8,
        "the BN MLP learns in the quick run: {:?}",
        bn.last()
    );
}

#[test]
fn lr_sweep_quick() {
    let out = run_quick("lr-sweep");
    common_outputs(&out.0, "lr-sweep", "lr_sweep.png");
    for tag in ["bn", "nobn"] {
        for m in ["1", "5", "30"] {
            csv(
                &out.0.join(format!("curve_{tag}_x{m}.csv")),
                "step,train_loss,test_accuracy",
            );
        }
    }
    finite(&csv(
        &out.0.join("curve_bn_x1.csv"),
        "step,train_loss,test_accuracy",
    ));
}

#[test]
fn ics_quick() {
    let out = run_quick("ics");
    common_outputs(&out.0, "ics", "ics.png");
    for tag in ["bn", "nobn"] {
        let text = std::fs::read_to_string(out.0.join(format!("ics_{tag}.csv"))).unwrap();
        let header = text.lines().next().unwrap();
        assert!(
            header.starts_with("step,0.weight.l2_diff,0.weight.cosine,0.weight.grad_norm"),
            "{header}"
        );
        assert_eq!(header.split(',').count(), 1 + 3 * 4, "four Linear layers");
        let rows = csv(&out.0.join(format!("ics_{tag}.csv")), header);
        finite(&rows);
        for r in &rows {
            assert_eq!(r[1], 0.0, "the first layer has no earlier layer: no shift");
            assert!(r[4] > 0.0, "the second layer's gradient shifts");
            assert!(r[5] <= 1.0 + 1e-6 && r[5] > -1.0 - 1e-6, "a cosine");
        }
    }
}

#[test]
fn landscape_quick() {
    let out = run_quick("landscape");
    common_outputs(&out.0, "landscape", "landscape.png");
    for tag in ["bn", "nobn"] {
        let rows = csv(
            &out.0.join(format!("landscape_{tag}.csv")),
            "step,loss_min,loss_max,grad_diff_min,grad_diff_max,beta_smoothness",
        );
        finite(&rows);
        for r in &rows {
            assert!(r[1] <= r[2] && r[3] <= r[4] && r[5] > 0.0, "{r:?}");
        }
    }
}

/// Fashion-MNIST from `../shared/data` (beside the checkout, as on CI); MNIST's files otherwise (the same
/// IDX names and shapes: this test checks the CNN plumbing, not the accuracy).
fn fashion_mnist_dir() -> String {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/fashion-mnist");
    let dir = if shared.join("train-images-idx3-ubyte.gz").exists() {
        shared
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist")
    };
    dir.to_string_lossy().into_owned()
}

#[test]
fn ics_quick_cnn() {
    let data = fashion_mnist_dir();
    let out = run_quick_with(
        "ics",
        &["--model", "cnn", "--steps", "10", "--data-dir", &data],
    );
    common_outputs(&out.0, "ics", "ics.png");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.0.join("config.json")).unwrap()).unwrap();
    assert!(
        config["run"]["model"].as_str().unwrap().starts_with("cnn"),
        "{config}"
    );
    // conv, [BN,] ReLU, pool, conv, [BN,] ReLU, pool, flatten, linear: the weights of both convolutions
    // and the head.
    for (tag, layers) in [("bn", ["0", "4", "9"]), ("nobn", ["0", "3", "7"])] {
        let text = std::fs::read_to_string(out.0.join(format!("ics_{tag}.csv"))).unwrap();
        let header = text.lines().next().unwrap().to_string();
        let want: Vec<String> = std::iter::once("step".to_string())
            .chain(layers.iter().flat_map(|l| {
                ["l2_diff", "cosine", "grad_norm"].map(|m| format!("{l}.weight.{m}"))
            }))
            .collect();
        assert_eq!(header, want.join(","));
        let rows = csv(&out.0.join(format!("ics_{tag}.csv")), &header);
        finite(&rows);
        for r in &rows {
            assert_eq!(r[1], 0.0, "the first convolution has no earlier layer");
            assert!(
                r[4] > 0.0 && r[7] > 0.0,
                "later layers' gradients shift: {r:?}"
            );
        }
    }
}

/// `landscape --model cnn --dataset cifar10` on small synthetic CIFAR-10 batch files (150 training and
/// 10 test records of random pixels): the CNN takes `[3, 32, 32]` samples and the settings say so.
#[test]
fn landscape_cnn_runs_on_cifar10_files() {
    use rand::{Rng, SeedableRng};
    let data = tempdir::Dir::new("cifar10-files");
    std::fs::create_dir_all(&data.0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut file = |records: usize| -> Vec<u8> {
        (0..records)
            .flat_map(|_| {
                let mut r = vec![rng.random_range(0..10u8)];
                r.extend((0..3072).map(|_| rng.random::<u8>()));
                r
            })
            .collect()
    };
    for k in 1..=5 {
        std::fs::write(data.0.join(format!("data_batch_{k}.bin")), file(30)).unwrap();
    }
    std::fs::write(data.0.join("test_batch.bin"), file(10)).unwrap();
    let out = run_quick_with(
        "landscape",
        &[
            "--model",
            "cnn",
            "--dataset",
            "cifar10",
            "--steps",
            "2",
            "--data-dir",
            data.0.to_str().unwrap(),
        ],
    );
    common_outputs(&out.0, "landscape", "landscape.png");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.0.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dataset"], "cifar10");
    for tag in ["bn", "nobn"] {
        let rows = csv(
            &out.0.join(format!("landscape_{tag}.csv")),
            "step,loss_min,loss_max,grad_diff_min,grad_diff_max,beta_smoothness",
        );
        finite(&rows);
    }
    // The MLP experiments keep to MNIST.
    let err = Command::new(env!("CARGO_BIN_EXE_batchnorm"))
        .args(["experiment", "lr-sweep", "--quick", "--dataset", "cifar10"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    let msg = String::from_utf8_lossy(&err.stderr);
    assert!(msg.contains("needs --model cnn"), "{msg}");
}

#[test]
fn mlp_experiments_refuse_the_cnn() {
    let out = Command::new(env!("CARGO_BIN_EXE_batchnorm"))
        .args(["experiment", "ioffe-mnist", "--quick", "--model", "cnn"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ioffe-mnist") && err.contains("--model mlp"),
        "{err}"
    );
}

/// A curve CSV (`step,train_loss,train_accuracy,test_accuracy`): finite, accuracies in [0, 1], losses
/// positive, and the test accuracy not constant (the run really trained).
fn curve(path: &Path) -> Vec<Vec<f64>> {
    let rows = csv(path, "step,train_loss,train_accuracy,test_accuracy");
    finite(&rows);
    for r in &rows {
        assert!(r[1] > 0.0, "{}: loss {r:?}", path.display());
        assert!(
            (0.0..=1.0).contains(&r[2]) && (0.0..=1.0).contains(&r[3]),
            "{r:?}"
        );
    }
    assert!(
        rows.iter().any(|r| r[3] != rows[0][3]),
        "{}: constant test accuracy",
        path.display()
    );
    rows
}

#[test]
fn noisy_bn_quick() {
    let out = run_quick("noisy-bn");
    common_outputs(&out.0, "noisy-bn", "noisy_bn.png");
    let png = std::fs::read(out.0.join("noisy_bn_activations.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.0.join("config.json")).unwrap()).unwrap();
    assert!(config["noise"].as_str().unwrap().contains("y = x*s + m"));
    let mut medians = Vec::new();
    for tag in ["standard", "bn", "noisy_bn", "noise_no_bn"] {
        let rows = curve(&out.0.join(format!("curve_{tag}.csv")));
        let acts = csv(
            &out.0.join(format!("activation_{tag}.csv")),
            "step,p15,p50,p85",
        );
        finite(&acts);
        assert_eq!(acts.len(), rows.len(), "{tag}: one distribution per point");
        assert!(
            acts.iter().all(|r| r[1] <= r[2] && r[2] <= r[3]),
            "{tag}: ordered"
        );
        medians.push(acts.iter().map(|r| r[2]).collect::<Vec<_>>());
    }
    // BN and noisy BN learn in the quick run; the noise changes the followed unit's distribution.
    for tag in ["bn", "noisy_bn"] {
        let rows = curve(&out.0.join(format!("curve_{tag}.csv")));
        assert!(
            rows.last().unwrap()[3] > 0.8,
            "{tag} learns: {:?}",
            rows.last()
        );
    }
    assert_ne!(
        medians[1], medians[2],
        "noise changes the BN output's distribution"
    );
}

#[test]
fn precise_bn_quick() {
    let out = run_quick("precise-bn");
    common_outputs(&out.0, "precise-bn", "precise_bn.png");
    let mut gaps = Vec::new();
    for b in [60, 1000] {
        let rows = csv(
            &out.0.join(format!("precise_b{b}.csv")),
            "step,train_loss,train_accuracy,ema_test_accuracy,precise_test_accuracy",
        );
        finite(&rows);
        assert_eq!(rows.len(), 2, "batch {b}: two evaluation points");
        for r in &rows {
            assert!(
                r[1] > 0.0 && r[2..].iter().all(|a| (0.0..=1.0).contains(a)),
                "{r:?}"
            );
            gaps.push(r[4] - r[3]);
        }
        assert!(rows.last().unwrap()[4] > 0.5, "batch {b} learns: {rows:?}");
    }
    assert!(
        gaps.iter().any(|&g| g != 0.0),
        "PreciseBN and EMA statistics give different accuracies somewhere: {gaps:?}"
    );
}

#[test]
fn batch_size_quick() {
    let out = run_quick("batch-size");
    common_outputs(&out.0, "batch-size", "batch_size.png");
    let sweep = csv(
        &out.0.join("nbs_sweep.csv"),
        "nbs,frozen_bn,train_accuracy,test_population,test_minibatch",
    );
    finite(&sweep);
    let nbs: Vec<f64> = sweep.iter().map(|r| r[0]).collect();
    assert_eq!(nbs, [2.0, 4.0, 8.0, 16.0, 64.0, 2.0]);
    assert_eq!(sweep[5][1], 1.0, "the last row is the FrozenBN run");
    for r in &sweep {
        assert!(r[2..].iter().all(|a| (0.0..=1.0).contains(a)), "{r:?}");
    }
    assert!(sweep[4][3] > 0.6, "NBS 64 learns: {:?}", sweep[4]);
    assert!(
        sweep.iter().any(|r| r[3] != r[4]),
        "population and mini-batch statistics differ somewhere: {sweep:?}"
    );
    for tag in ["nbs2", "nbs4", "nbs8", "nbs16", "nbs64", "nbs2_frozen"] {
        curve(&out.0.join(format!("curve_{tag}.csv")));
    }
}

#[test]
fn unknown_experiment_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_batchnorm"))
        .args(["experiment", "no-such-thing", "--quick"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown experiment 'no-such-thing'") && err.contains("ioffe-mnist"),
        "{err}"
    );
}
